// The decode step's attention, fused with what surrounds it: RoPE on the new queries and keys, the
// keys and values written into the KV cache, attention of the new queries over the cache. fp32, x86 AVX2.
//
// Why: for one query per row, PyTorch's CPU flash-attention kernel spends most of its time on
// set-up around a few microseconds of arithmetic, and the RoPE and cache writes around it are ~20
// small ops per layer; a decode step pays all of it once per layer (24-28 times per token).
//
// Query t of row b sits at cache slot slots[b] + t, where its key and value are written, and sees
// the keys s <= its slot with key_mask[b, t, s] true (no mask: all of them). Keys it may not see are
// skipped, not weighted by exp(-inf): the softmax runs over the visible keys only, in slot order,
// with the same lane layout whatever their slots are. So a result depends only on which keys a query
// sees: a left-padded row of a batch computes bit for bit what the row alone computes, and query t of
// a T-query call what a one-query call at that slot computes (speculative verification relies on it).
//
//   q', k' = x * cos + rotate_half(x) * sin   (two products and a sum, as PyTorch computes it: the
//                                              cached keys equal those the eager prefill writes)
//   scores_i = scale * q' . k'_i  over the visible keys i     (fp32)
//   p_i = exp(scores_i - max) / sum_j exp(scores_j - max)      (max, sum and exp in fp32)
//   out = sum_i p_i v_i                                        (accumulated in slot order)
//
// GQA: query head h reads kv head h / (nh / nkv). Shapes: q (B, T, nh, hs), k and v (B, T, nkv, hs),
// cos and sin (B, T, hs), the cache (B, nkv, max_len, hs); any strides with the head dim contiguous;
// hs a multiple of 16 (RoPE pairs dims d and d + hs / 2 eight at a time).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

// No fused multiply-adds where the code asks for a product and a sum (GCC would contract them): RoPE
// must round as PyTorch's separate mul and add kernels do.
#pragma GCC optimize("fp-contract=off")

namespace {

inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// e^x, 8 lanes, for x <= 0 (scores minus their max): x = n ln2 + r with |r| <= ln2 / 2, e^r by
// Cephes' expf polynomial (~1 ulp), 2^n through the exponent bits. x is clamped at -87 so that 2^n
// stays a normal number: e^-87 ~ 1.6e-38 is as good as 0 next to the max's weight of 1.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: r stays exact
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 e_r = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(e_r, _mm256_castsi256_ps(two_n));
}

inline float dot(const float* a, const float* b, int64_t hs) {
  __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b));
  for (int64_t d = 8; d < hs; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
  return sum8(acc);
}

// Lane i = the sum of the lanes of a[i].
inline __m256 sum8x8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// weights[0..n) <- exp(weights - max); returns their sum. Lane i % 8 takes weight i: the layout
// depends on n alone.
float exp_and_sum(float* w, int64_t n) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(w + i));
  float top = max8(m);
  for (int64_t j = i; j < n; ++j) top = std::max(top, w[j]);
  const __m256 top8 = _mm256_set1_ps(top);
  __m256 total = _mm256_setzero_ps();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(w + i), top8));
    _mm256_storeu_ps(w + i, e);
    total = _mm256_add_ps(total, e);
  }
  if (i < n) {  // the tail through a padded copy; only its first n - i lanes are kept and summed
    alignas(32) float tail[8] = {0};
    std::copy(w + i, w + n, tail);
    _mm256_store_ps(tail, exp8(_mm256_sub_ps(_mm256_load_ps(tail), top8)));
    std::fill(tail + (n - i), tail + 8, 0.0f);
    std::copy(tail, tail + (n - i), w + i);
    total = _mm256_add_ps(total, _mm256_load_ps(tail));
  }
  return sum8(total);
}

struct Strided {  // a 4-d tensor with a contiguous last dim
  float* p;
  int64_t s0, s1, s2;
  explicit Strided(const at::Tensor& t) : p(t.data_ptr<float>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  float* at(int64_t i, int64_t j, int64_t k) const { return p + i * s0 + j * s1 + k * s2; }
};

// out = x * cos + rotate_half(x) * sin for one head: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin),
// each term a rounded product and their sum rounded, as PyTorch's mul, mul, add compute it.
void rope(const float* x, const float* cos, const float* sin, int64_t hs, float* out) {
  const int64_t half = hs / 2;
  for (int64_t d = 0; d < half; d += 8) {
    const __m256 x1 = _mm256_loadu_ps(x + d), x2 = _mm256_loadu_ps(x + half + d);
    const __m256 minus_x2 = _mm256_sub_ps(_mm256_setzero_ps(), x2);  // exact: -x2 * sin = -(x2 * sin)
    _mm256_storeu_ps(out + d, _mm256_add_ps(_mm256_mul_ps(x1, _mm256_loadu_ps(cos + d)),
                                            _mm256_mul_ps(minus_x2, _mm256_loadu_ps(sin + d))));
    _mm256_storeu_ps(out + half + d, _mm256_add_ps(_mm256_mul_ps(x2, _mm256_loadu_ps(cos + half + d)),
                                                   _mm256_mul_ps(x1, _mm256_loadu_ps(sin + half + d))));
  }
}

// w[j] = scale * q . k[slots[j]] for the n visible keys, eight keys at a time (one accumulator each).
void scores(const float* q, const Strided& k, int64_t b, int64_t kvh, const int32_t* slots, int64_t n, int64_t hs,
            float scale, float* w) {
  const __m256 scale8 = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const float* keys[8];
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) keys[i] = k.at(b, kvh, slots[j + i]), acc[i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < hs; d += 8) {
      const __m256 q8 = _mm256_loadu_ps(q + d);
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(keys[i] + d), q8, acc[i]);
    }
    _mm256_storeu_ps(w + j, _mm256_mul_ps(sum8x8(acc), scale8));
  }
  for (; j < n; ++j) w[j] = scale * dot(q, k.at(b, kvh, slots[j]), hs);
}

// out += sum_j w[j] v[slots[j]] for j in [0, n), in order, 64 dims at a time in registers. Called tile
// after tile of keys, it performs the very same fused multiply-adds in the same order as one call over
// all of them: the running sums only pass through `out` between tiles.
void add_weighted_values(const float* w, const Strided& v, int64_t b, int64_t kvh, const int32_t* slots, int64_t n,
                         int64_t hs, float* out) {
  for (int64_t d0 = 0; d0 < hs; d0 += 64) {
    const int chunks = static_cast<int>(std::min<int64_t>(64, hs - d0) / 8);
    __m256 acc[8];
    for (int c = 0; c < chunks; ++c) acc[c] = _mm256_loadu_ps(out + d0 + 8 * c);
    for (int64_t j = 0; j < n; ++j) {
      const __m256 wj = _mm256_set1_ps(w[j]);
      const float* vp = v.at(b, kvh, slots[j]) + d0;
      for (int c = 0; c < chunks; ++c) acc[c] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(vp + 8 * c), acc[c]);
    }
    for (int c = 0; c < chunks; ++c) _mm256_storeu_ps(out + d0 + 8 * c, acc[c]);
  }
}

// Keys are taken kKeyTile at a time by every query head of a GQA group in turn, so each tile of keys
// (and then of values) is read from memory once per group, not once per head: 32 KB at head_dim 128,
// it stays in L1 meanwhile. A multiple of 8, so `scores` blocks the keys as one call over all would.
constexpr int64_t kKeyTile = 64;

// The attention of query t of row b for the query heads of kv head kvh, over the n visible keys.
void attend_group(const float* rotated, const Strided& k, const Strided& v, int64_t b, int64_t kvh, int64_t group,
                  const int32_t* slots, int64_t n, int64_t hs, float scale, float* weights, float* out) {
  for (int64_t j0 = 0; j0 < n; j0 += kKeyTile)
    for (int64_t h = 0; h < group; ++h)
      scores(rotated + h * hs, k, b, kvh, slots + j0, std::min(kKeyTile, n - j0), hs, scale, weights + h * n + j0);
  std::vector<float> totals(group);
  for (int64_t h = 0; h < group; ++h) {
    totals[h] = exp_and_sum(weights + h * n, n);
    std::fill(out + h * hs, out + (h + 1) * hs, 0.0f);
  }
  for (int64_t j0 = 0; j0 < n; j0 += kKeyTile)
    for (int64_t h = 0; h < group; ++h)
      add_weighted_values(weights + h * n + j0, v, b, kvh, slots + j0, std::min(kKeyTile, n - j0), hs, out + h * hs);
  for (int64_t h = 0; h < group; ++h) {
    const __m256 total8 = _mm256_set1_ps(totals[h]);
    for (int64_t d = 0; d < hs; d += 8)
      _mm256_storeu_ps(out + h * hs + d, _mm256_div_ps(_mm256_loadu_ps(out + h * hs + d), total8));
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                            const at::Tensor& sin, const at::Tensor& cache_k, const at::Tensor& cache_v,
                            const at::Tensor& slots, const c10::optional<at::Tensor>& key_mask, double scale) {
  for (const at::Tensor* t : {&q, &k, &v, &cos, &sin, &cache_k, &cache_v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->stride(-1) == 1, "q, k, v, cos, sin and the cache must be fp32 "
                "with a contiguous last dim");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && cache_k.dim() == 4, "q, k, v must be (B, T, heads, "
              "head_dim), the cache (B, nkv, max_len, head_dim)");
  const int64_t B = q.size(0), T = q.size(1), nh = q.size(2), hs = q.size(3);
  const int64_t nkv = k.size(2), max_len = cache_k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(1) == T && k.size(3) == hs && nh % nkv == 0,
              "k and v must be (B, T, nkv, head_dim) with nkv dividing the query heads");
  TORCH_CHECK(cache_k.sizes() == cache_v.sizes() && cache_k.size(0) == B && cache_k.size(1) == nkv &&
              cache_k.size(3) == hs, "the cache must be (B, nkv, max_len, head_dim)");
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.size(0) == B && cos.size(1) == T &&
              cos.size(2) == hs, "cos and sin must be (B, T, head_dim)");
  TORCH_CHECK(hs % 16 == 0, "head_dim must be a multiple of 16");
  const at::Tensor slot = slots.to(at::kLong).contiguous();
  TORCH_CHECK(slot.dim() == 1 && slot.size(0) == B, "slots must be (B,)");
  const int64_t* sp = slot.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(0 <= sp[b] && sp[b] + T <= max_len, "slot ", sp[b], " + ", T, " new tokens do not fit the cache");
  const bool* mp = nullptr;
  int64_t mb = 0, mt = 0, ms = 0;
  if (key_mask.has_value()) {
    const at::Tensor& m = *key_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 3 && m.size(0) == B && m.size(1) == T,
                "key_mask must be bool (B, T, S)");
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(sp[b] + T <= m.size(2), "key_mask must cover every slot up to the last new token's");
    mp = m.data_ptr<bool>();
    mb = m.stride(0), mt = m.stride(1), ms = m.stride(2);
  }
  const Strided qs(q), ks(k), vs(v), cs(cos.unsqueeze(2)), ss(sin.unsqueeze(2)), ck(cache_k), cv(cache_v);
  // Rotated queries; rotated keys and values into the cache (a few KB: one thread).
  auto rotated = at::empty({B, T, nh, hs}, q.options());
  float* rp = rotated.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const float *c = cs.at(b, t, 0), *s = ss.at(b, t, 0);
      for (int64_t h = 0; h < nh; ++h) rope(qs.at(b, t, h), c, s, hs, rp + ((b * T + t) * nh + h) * hs);
      for (int64_t h = 0; h < nkv; ++h) {
        rope(ks.at(b, t, h), c, s, hs, ck.at(b, h, sp[b] + t));
        std::copy(vs.at(b, t, h), vs.at(b, t, h) + hs, cv.at(b, h, sp[b] + t));
      }
    }
  }
  // (B, T, nh, hs) in memory, returned as (B, nh, T, hs): the caller's transpose + reshape to
  // (B, T, nh * hs) for o_proj is then free.
  auto out = at::empty({B, T, nh, hs}, q.options());
  float* op = out.data_ptr<float>();
  const int64_t group = nh / nkv;
  const float fscale = static_cast<float>(scale);
  // One task per (row, query, kv head): the query heads of a group read the same keys while cached.
  at::parallel_for(0, B * T * nkv, 1, [&](int64_t i0, int64_t i1) {
    thread_local std::vector<float> weights;
    thread_local std::vector<int32_t> visible;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (T * nkv), t = i / nkv % T, kvh = i % nkv;
      const int64_t last = sp[b] + t;  // the query's own slot
      visible.resize(last + 1);
      int64_t n = 0;
      for (int64_t s = 0; s <= last; ++s)
        if (!mp || mp[b * mb + t * mt + s * ms]) visible[n++] = static_cast<int32_t>(s);
      float* o = op + ((b * T + t) * nh + kvh * group) * hs;  // the group's heads are adjacent
      if (n == 0) {  // sees no key: zeros (the model never asks; SDPA would give NaN)
        std::fill(o, o + group * hs, 0.0f);
        continue;
      }
      weights.resize(group * n);
      attend_group(rp + ((b * T + t) * nh + kvh * group) * hs, ck, cv, b, kvh, group, visible.data(), n, hs, fscale,
                   weights.data(), o);
    }
  });
  return out.transpose(1, 2);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen2_kernels, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) cache_k, Tensor(b!) cache_v, "
        "Tensor slots, Tensor? key_mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwen2_kernels, CPU, m) { m.impl("decode_attention", &decode_attention); }
