// The layouts a linear of the native decode block may have, by the code `qwen2.quant.kinds.LAYER_KINDS`
// gives each (tests/test_architecture.py holds the two equal). Each kernel file registers its own
// layouts next to their kernels, so the decode block (decode_block.cpp) names none of them:
//
//   static const bool registered = register_layer_kind(1, "int4", [](const at::Tensor& x, const LayerArgs& w) {...});
//
// A layer's tensors and settings are `qwen2.runtime.native.native_linear`'s: up to three layout
// tensors (a, b, c; unused ones empty), then the input group size and the activation digits.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>

namespace qwen2 {

struct LayerArgs {
  const at::Tensor *a, *b, *c;
  int64_t group_size, digits;
};

// x (M, K) contiguous fp32 -> (M, N), without the bias (the decode block adds it)
using LayerCall = at::Tensor (*)(const at::Tensor& x, const LayerArgs& layer);

constexpr int64_t kMaxLayerKinds = 16;

// code -> its call (nullptr where none registered); one table for the whole library: an inline
// function's static is shared by every file of the library that includes this header, and hidden, so
// that another build of these kernels loaded into the same process (bench_kernel_sources.py loads
// several) keeps a table of its own
__attribute__((visibility("hidden"))) inline std::array<LayerCall, kMaxLayerKinds>& layer_kinds() {
  static std::array<LayerCall, kMaxLayerKinds> table{};
  return table;
}

inline bool register_layer_kind(int64_t code, const char* mode, LayerCall call) {
  TORCH_CHECK(0 <= code && code < kMaxLayerKinds && layer_kinds()[code] == nullptr, "layer kind ", code, " (", mode,
              ") registered twice or out of range");
  layer_kinds()[code] = call;
  return true;
}

inline LayerCall layer_kind(int64_t code) {
  TORCH_CHECK(0 <= code && code < kMaxLayerKinds && layer_kinds()[code] != nullptr, "unknown linear kind ", code,
              "; see qwen2.quant.kinds.LAYER_KINDS");
  return layer_kinds()[code];
}

}  // namespace qwen2
