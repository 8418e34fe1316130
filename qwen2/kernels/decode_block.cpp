// One decoder block of a decode step in one call: the same ATen ops and qwen2 kernels, in the same
// order, as the eager `Block.forward` (qwen2/model/transformer.py) runs them, so the result is bit for bit the
// same; only the Python between them is gone.
//
// Why: a decode step of the 0.5B model makes ~40 op calls per layer, and from Python each costs a
// few microseconds of interpreter and dispatch on top of its work; ~6-9 ms of a ~30 ms step went
// there. From C++ an op call costs ~1 us.
//
//   h = rms_norm(x, input_layernorm)          x * rsqrt(mean(x^2) + eps), then weight * that
//   q, k, v = h @ Wq^T + bq, h @ Wk^T + bk, h @ Wv^T + bv
//   y = decode_attention(q, k, v, ...)        RoPE, cache write, attention (decode_attention.cpp)
//   x = x + y @ Wo^T
//   h = rms_norm(x, post_attention_layernorm)
//   x = x + (silu(h @ Wg^T) * (h @ Wu^T)) @ Wd^T
//
// Each linear is one of the layouts the kernel files register (layer_kinds.h: this file names none of
// them), called as `QuantLinear.forward` calls its op (then the bias added in place), or a plain fp32
// nn.Linear (at::linear, kind 0). A linear may carry a low-rank update of its output, as LoRA adapters
// served per row add it (`qwen2.adapters.MultiLoRALinear.forward`, in the same ops):
//   y = y + ((x @ A^T) * mask) @ Bt           A (R, in), Bt (R, out): the active adapters' rank slots;
//                                             mask (B, R): 1 on each row's own adapter's slots
// Arguments, as `qwen2.runtime.native.block_weights` lays them out:
//   tensors  [input_layernorm weight, post_attention_layernorm weight, then for each linear of
//            q, k, v, o, gate, up, down: three layout tensors (unused ones empty) and its bias (or empty)]
//   meta     [heads, kv heads, head_dim, then for each linear: kind, group_size, digits]
//   updates  [] when no linear has an update, else for each linear A, Bt, mask (all three empty for none)
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "layer_kinds.h"

namespace {

constexpr int kLinears = 7;  // q, k, v, o, gate, up, down
constexpr int64_t kDense = 0;  // a plain fp32 nn.Linear: at::linear, its bias fused as nn.Linear fuses it

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using AttentionOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const c10::optional<at::Tensor>&, double);

struct Linear {
  int64_t kind;
  qwen2::LayerArgs args;
  const at::Tensor* bias;
  const at::Tensor* update;  // A, Bt, mask; nullptr for none
  int64_t batch;             // B of x's (B * T) rows, which the update's mask has one row each

  // x (M, K) contiguous fp32 -> (M, N)
  at::Tensor operator()(const at::Tensor& x) const {
    at::Tensor y = base(x);
    if (update == nullptr) return y;
    const at::Tensor &A = update[0], &Bt = update[1], &mask = update[2];
    const at::Tensor h = at::mm(x, A.t()).view({batch, -1, A.size(0)}) * mask.unsqueeze(1);  // (B, T, R)
    return at::addmm(y, h.view({x.size(0), A.size(0)}), Bt);
  }

  at::Tensor base(const at::Tensor& x) const {
    if (kind == kDense) return at::linear(x, *args.a, bias->numel() ? *bias : at::Tensor());
    at::Tensor y = qwen2::layer_kind(kind)(x, args);
    return bias->numel() ? y.add_(*bias) : y;
  }
};

// As qwen2.model.RMSNorm computes it in fp32: x * rsqrt(mean(x^2) + eps), then weight * that.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return weight * (x * at::rsqrt(x.pow(2).mean(-1, true) + eps));
}

at::Tensor decode_block(const at::Tensor& x, at::TensorList tensors, at::IntArrayRef meta, at::TensorList updates,
                        double eps, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& cache_k,
                        const at::Tensor& cache_v, const at::Tensor& slots, const c10::optional<at::Tensor>& key_mask,
                        double scale) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 (B, T, C)");
  TORCH_CHECK(tensors.size() == 2 + 4 * kLinears && meta.size() == 3 + 3 * kLinears,
              "decode_block takes 30 tensors and 24 ints (see qwen2.runtime.native.block_weights)");
  TORCH_CHECK(updates.empty() || updates.size() == 3 * kLinears, "decode_block takes no updates or 21 tensors");
  static auto attention = op<AttentionOp>("qwen2_kernels::decode_attention");
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), nh = meta[0], nkv = meta[1], hs = meta[2];
  Linear lin[kLinears];
  for (int i = 0; i < kLinears; ++i) {
    const at::Tensor* t = &tensors[2 + 4 * i];
    const at::Tensor* update = updates.empty() || !updates[3 * i].numel() ? nullptr : &updates[3 * i];
    TORCH_CHECK(update == nullptr || update[2].size(0) == B, "a low-rank update's mask has ", update[2].size(0),
                " rows for a batch of ", B);
    lin[i] = Linear{meta[3 + 3 * i], {t, t + 1, t + 2, meta[4 + 3 * i], meta[5 + 3 * i]}, t + 3, update, B};
  }
  const at::Tensor rows = x.view({B * T, C});
  at::Tensor h = rms_norm(rows, tensors[0], eps);
  const at::Tensor q = lin[0](h), k = lin[1](h), v = lin[2](h);
  const at::Tensor y = attention.call(q.view({B, T, nh, hs}), k.view({B, T, nkv, hs}), v.view({B, T, nkv, hs}), cos, sin,
                                      cache_k, cache_v, slots, key_mask, scale);  // (B, nh, T, hs)
  const at::Tensor out = rows + lin[3](y.transpose(1, 2).reshape({B * T, nh * hs}));
  h = rms_norm(out, tensors[1], eps);
  return (out + lin[6](at::silu(lin[4](h)) * lin[5](h))).view({B, T, C});
}

// Every block of the decode step, one after another: block l takes tensors [30 l, 30 l + 30), meta
// [24 l, 24 l + 24), updates [21 l, 21 l + 21) (when there are any) and layer l of the caches
// (L, B, nkv, S, hs); the other arguments are the same for every layer (qwen2.runtime.native lays
// them out). Why: the Python loop over the blocks, and the arguments each block call gathers, cost
// ~1 ms of a 0.5B decode step.
at::Tensor decode_layers(const at::Tensor& x, at::TensorList tensors, at::IntArrayRef meta, at::TensorList updates,
                         double eps, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& cache_k,
                         const at::Tensor& cache_v, const at::Tensor& slots, const c10::optional<at::Tensor>& key_mask,
                         double scale) {
  constexpr int64_t kTensors = 2 + 4 * kLinears, kMeta = 3 + 3 * kLinears, kUpdates = 3 * kLinears;
  const int64_t L = cache_k.size(0);
  TORCH_CHECK(cache_v.size(0) == L && static_cast<int64_t>(tensors.size()) == L * kTensors &&
                  static_cast<int64_t>(meta.size()) == L * kMeta &&
                  (updates.empty() || static_cast<int64_t>(updates.size()) == L * kUpdates),
              "decode_layers takes ", kTensors, " tensors, ", kMeta, " ints and no or ", kUpdates,
              " updates per cache layer");
  at::Tensor h = x;
  for (int64_t l = 0; l < L; ++l)
    h = decode_block(h, tensors.slice(l * kTensors, kTensors), meta.slice(l * kMeta, kMeta),
                     updates.empty() ? updates : updates.slice(l * kUpdates, kUpdates), eps, cos, sin,
                     cache_k.select(0, l), cache_v.select(0, l), slots, key_mask, scale);
  return h;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen2_kernels, m) {
  m.def("decode_block(Tensor x, Tensor[] tensors, int[] meta, Tensor[] updates, float eps, Tensor cos, Tensor sin, "
        "Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor slots, Tensor? key_mask, float scale) -> Tensor");
  m.def("decode_layers(Tensor x, Tensor[] tensors, int[] meta, Tensor[] updates, float eps, Tensor cos, Tensor sin, "
        "Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor slots, Tensor? key_mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwen2_kernels, CPU, m) {
  m.impl("decode_block", &decode_block);
  m.impl("decode_layers", &decode_layers);
}
