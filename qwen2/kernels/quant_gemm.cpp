// Quantised linears for many rows of x (prefill, long speculative checks): y = x @ dequant(W)^T, x fp32
// (M, K), computed on 8-bit integer dot products for every weight layout the decode kernels read (int4,
// int8, GGUF Q4_K and Q6_K; quant_linear.cpp describes them).
//
// Why not dequantise and run an fp32 GEMM: an fp32 FMA does 8 products per 256-bit instruction, and on
// an AVX2-only CPU (no bf16 units) that is what prefill ran on. `vpmaddubsw` does 32 (u8 x s8, summed in
// pairs into int16), `vpdpbusd` on AVX-512 VNNI 64 (into int32). Why not the decode kernels with more
// rows: they add the products of one row of W and one row of x along k in the lanes of a vector and
// reduce across the lanes per block of 32, 3-4 instructions for every 32 products. Here the lanes are
// output rows instead: a vector holds 4 consecutive inputs of each of 8 (16) rows of W, multiplied by
// the same 4 inputs of a row of x (broadcast), so a block's products sum up in the lanes without any
// reduction, and one conversion and one FMA per block scale 8 (16) outputs at once.
//
// The weights are repacked for this a panel (16 or 32 rows of W) at a time into a thread's buffer, and
// each panel then meets every row of x, 4 at a time (the panel stays in the cache; its packing is paid
// once per M rows). The arithmetic is the decode kernels' own: x rounded per block of 32 to one or two
// int8 digits (quantize_x), exact integer dot products per block (per 16 inputs for Q6_K, whose scales
// are), each scaled in fp32 by the weight's scale times x's step, and the int4 / Q4_K min term taken with
// the exact fp32 sums of x. So the float64 model the tests hold the decode kernels to holds here too,
// and only the order of the fp32 additions differs.
//
// A layout's block b of 32 weights of row n, as the panel stores it (u unsigned bytes):
//   w[n, 32 b + i] = a[n, b, h] * (u[n, 32 b + i] - kOffset) + c[n, b],   h = i / (32 / H)
//   int4   u in [0, 15],  H 1, offset 0,   c the group's min
//   Q4_K   u in [0, 15],  H 1, offset 0,   a = d sc_j, c = -dmin m_j
//   int8   u in [0, 255], H 1, offset 128 (on AVX2 stored signed instead, u - 128: see kSigned)
//   Q6_K   u in [0, 63],  H 2, offset 32
// The offset comes off in int32, exactly, as -offset times the block's sum of x's digits.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "int8_blocks.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// 16 rows a vector; vpdpbusd adds four u8 x s8 products into each int32 lane, no intermediate int16.
struct Vec {
  using I = __m512i;
  using F = __m512;
  static constexpr int kLanes = 16;
  static constexpr bool kDpbusd = true;
  static I load(const int32_t* p) { return _mm512_loadu_si512(p); }
  static I broadcast(const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm512_set1_epi32(v); }
  static I zero() { return _mm512_setzero_si512(); }
  static I dot(I acc, I u, I s) { return _mm512_dpbusd_epi32(acc, u, s); }
  static I add32(I a, I b) { return _mm512_add_epi32(a, b); }
  static I shift8(I a) { return _mm512_slli_epi32(a, 8); }
  static I set32(int32_t v) { return _mm512_set1_epi32(v); }
  static F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static F fzero() { return _mm512_setzero_ps(); }
  static F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static F setf(float v) { return _mm512_set1_ps(v); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static void storef(float* p, F v) { _mm512_storeu_ps(p, v); }
  // AVX2-only names, unused here
  static I madd16(I a, I) { return a; }
  static I add16(I a, I) { return a; }
  static I widen(I a) { return a; }
  static I abs8(I a) { return a; }
  static I sign8(I a, I) { return a; }
};
#else
// 8 rows a vector; vpmaddubsw sums pairs of u8 x s8 products into int16 lanes, which add up over a few
// steps (as long as they cannot overflow: kI16Steps) before vpmaddwd widens them to int32.
struct Vec {
  using I = __m256i;
  using F = __m256;
  static constexpr int kLanes = 8;
  static constexpr bool kDpbusd = false;
  static I load(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I broadcast(const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
  static I zero() { return _mm256_setzero_si256(); }
  static I dot(I acc, I, I) { return acc; }
  static I madd16(I u, I s) { return _mm256_maddubs_epi16(u, s); }
  static I add16(I a, I b) { return _mm256_add_epi16(a, b); }
  static I abs8(I a) { return _mm256_abs_epi8(a); }
  static I sign8(I a, I b) { return _mm256_sign_epi8(a, b); }
  static I add32(I a, I b) { return _mm256_add_epi32(a, b); }
  static I widen(I a) { return _mm256_madd_epi16(a, _mm256_set1_epi16(1)); }
  static I shift8(I a) { return _mm256_slli_epi32(a, 8); }
  static I set32(int32_t v) { return _mm256_set1_epi32(v); }
  static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static F fzero() { return _mm256_setzero_ps(); }
  static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static F setf(float v) { return _mm256_set1_ps(v); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static void storef(float* p, F v) { _mm256_storeu_ps(p, v); }
};
#endif

constexpr int kNV = 2;                          // vectors of weight rows per panel
constexpr int kPanel = kNV * Vec::kLanes;       // rows of W per panel
constexpr int kMR = 4;                          // rows of x per tile
constexpr int kSteps = kBlock / 4;              // 4 inputs a step, 8 steps a block

enum class Layout { kInt4, kInt8, kQ4K, kQ6K };

template <Layout L>
struct Traits {
  static constexpr int H = L == Layout::kQ6K ? 2 : 1;           // scales per block of 32
  static constexpr bool kMin = L == Layout::kInt4 || L == Layout::kQ4K;
  // int8 on AVX2: u up to 255 would saturate vpmaddubsw's int16 pair sums, so the panel stores the signed
  // value w = u - 128 and the products are |w| times x carrying w's sign (what llama.cpp does). (Q6_K
  // stored so, |w| <= 32, could add up 4 steps in int16 instead of 2, but the sign instructions cost more
  // than the widening they save: 50 instead of 60 GMAC/s on one core.)
  static constexpr bool kSigned = L == Layout::kInt8 && !Vec::kDpbusd;
  static constexpr int kOffset = L == Layout::kInt8 ? (kSigned ? 0 : 128) : L == Layout::kQ6K ? 32 : 0;
  // steps whose int16 pair sums may add up before widening: 8 x 2 x 15 x 127, 2 x 2 x 63 x 127 and
  // 1 x 2 x 128 x 127 all stay below 2^15
  static constexpr int kI16Steps = L == Layout::kQ6K ? 2 : L == Layout::kInt8 ? 1 : kSteps;
};

// A layout's weights as the kernel reads them: tensors and group size.
struct Weights {
  const uint8_t* q;
  const void* scale;
  const void* min;
  bool bf16;       // int4 / int8: scale (and min) dtype
  int64_t group_size, K;
};

inline float scale_at(const void* p, bool bf16, int64_t i) {
  return bf16 ? static_cast<float>(static_cast<const at::BFloat16*>(p)[i]) : static_cast<const float*>(p)[i];
}

// Row n of W as the unsigned (or, kSigned, signed) bytes u in input order (K), its scales a (B * H)
// and, for the layouts with a min, c (B).
template <Layout L>
void unpack_row(const Weights& w, int64_t n, uint8_t* u, float* a, float* c) {
  const int64_t K = w.K, B = K / kBlock;
  if constexpr (L == Layout::kInt4 || L == Layout::kInt8) {
    const int64_t G = K / w.group_size, per_group = w.group_size / kBlock;
    for (int64_t b = 0; b < B; ++b) {
      __m256i bytes;
      if constexpr (L == Layout::kInt4) bytes = unpack_int4(w.q + n * K / 2 + b * 16);
      else bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.q + n * K + b * kBlock));
      if constexpr (Traits<L>::kSigned) bytes = _mm256_xor_si256(bytes, _mm256_set1_epi8(static_cast<char>(0x80)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(u + b * kBlock), bytes);
      a[b] = scale_at(w.scale, w.bf16, n * G + b / per_group);
      if constexpr (L == Layout::kInt4) c[b] = scale_at(w.min, w.bf16, n * G + b / per_group);
    }
  } else if constexpr (L == Layout::kQ4K) {
    const int64_t S = K / kSuper;
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int64_t s = 0; s < S; ++s) {
      const uint8_t* block = w.q + (n * S + s) * kQ4KBytes;
      __m256 scale, min;
      q4k_scales(block, scale, min);
      _mm256_storeu_ps(a + 8 * s, scale);
      _mm256_storeu_ps(c + 8 * s, _mm256_sub_ps(_mm256_setzero_ps(), min));
      for (int r = 0; r < 4; ++r) {  // run r: sub-block 2r in the low nibbles, 2r + 1 in the high
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 16 + 32 * r));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(u + (8 * s + 2 * r) * kBlock), _mm256_and_si256(bytes, low));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(u + (8 * s + 2 * r + 1) * kBlock),
                            _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low));
      }
    }
  } else {
    const int64_t S = K / kSuper;
    for (int64_t s = 0; s < S; ++s) {
      const uint8_t* block = w.q + (n * S + s) * kQ6KBytes;
      const float d = half_to_float(block + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(block + 192);
      for (int i = 0; i < 16; ++i) a[16 * s + i] = d * sc[i];  // scale i covers inputs 16 i .. 16 i + 15
      for (int h = 0; h < 2; ++h) {
        __m256i q[4];
        q6k_quants(block, h, q);
        for (int k = 0; k < 4; ++k)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(u + (8 * s + 4 * h + k) * kBlock),
                              q[k]);
      }
    }
  }
}

// A panel: rows n0 .. n0 + kPanel - 1 of W (rows past N zero). bytes[(b * kSteps + s) * kPanel + r] holds
// inputs 32 b + 4 s .. + 3 of row r (4 bytes as one int32); a[(b * H + h) * kPanel + r], c[b * kPanel + r].
struct Panel {
  std::vector<int32_t> bytes;
  std::vector<float> a, c;
  std::vector<uint8_t> row;
  std::vector<float> row_a, row_c;
};

template <Layout L>
void pack_panel(const Weights& w, int64_t n0, int64_t rows, Panel& p) {
  constexpr int H = Traits<L>::H;
  const int64_t K = w.K, B = K / kBlock;
  if (rows < kPanel) {  // the last panel: its missing rows multiply to 0
    p.bytes.assign(B * kSteps * kPanel, 0);
    p.a.assign(B * H * kPanel, 0.f);
    p.c.assign(B * kPanel, 0.f);
  } else {  // every entry written below (c only where the layout has a min, and only read then)
    p.bytes.resize(B * kSteps * kPanel);
    p.a.resize(B * H * kPanel);
    p.c.resize(B * kPanel);
  }
  p.row.resize(K);
  p.row_a.resize(B * H);
  p.row_c.resize(B);
  for (int64_t r = 0; r < rows; ++r) {
    unpack_row<L>(w, n0 + r, p.row.data(), p.row_a.data(), p.row_c.data());
    const int32_t* words = reinterpret_cast<const int32_t*>(p.row.data());
    for (int64_t i = 0; i < B * kSteps; ++i) p.bytes[i * kPanel + r] = words[i];
    for (int64_t i = 0; i < B * H; ++i) p.a[i * kPanel + r] = p.row_a[i];
    if constexpr (Traits<L>::kMin)
      for (int64_t b = 0; b < B; ++b) p.c[b * kPanel + r] = p.row_c[b];
  }
}

// The exact integer dot products of steps [s0, s1) of block b, MR rows of x against the panel's kNV
// vectors, added to acc.
template <Layout L, int MR>
inline void block_steps(const Panel& p, const int8_t* x, int64_t K, int64_t b, int s0, int s1,
                        typename Vec::I (&acc)[MR][kNV]) {
  using I = typename Vec::I;
  const int32_t* wb = p.bytes.data() + b * kSteps * kPanel;
  const int8_t* xb = x + b * kBlock;
  if constexpr (Vec::kDpbusd) {
    for (int s = s0; s < s1; ++s) {
      I w[kNV];
      for (int v = 0; v < kNV; ++v) w[v] = Vec::load(wb + s * kPanel + v * Vec::kLanes);
      for (int m = 0; m < MR; ++m) {
        const I xs = Vec::broadcast(xb + m * K + 4 * s);
        for (int v = 0; v < kNV; ++v) acc[m][v] = Vec::dot(acc[m][v], w[v], xs);
      }
    }
  } else {
    constexpr int kGroup = Traits<L>::kI16Steps;
    for (int g = s0; g < s1; g += kGroup) {
      I part[MR][kNV];
      for (int m = 0; m < MR; ++m)
        for (int v = 0; v < kNV; ++v) part[m][v] = Vec::zero();
      // not unrolled: unrolled, GCC computes every step's products first and spills them to the stack
#pragma GCC unroll 1
      for (int s = g; s < g + kGroup; ++s) {
        I w[kNV], sign[kNV];
        for (int v = 0; v < kNV; ++v) {
          sign[v] = Vec::load(wb + s * kPanel + v * Vec::kLanes);
          w[v] = Traits<L>::kSigned ? Vec::abs8(sign[v]) : sign[v];
        }
        for (int m = 0; m < MR; ++m) {
          const I xs = Vec::broadcast(xb + m * K + 4 * s);
          for (int v = 0; v < kNV; ++v)
            part[m][v] = Vec::add16(part[m][v], Vec::madd16(w[v], Traits<L>::kSigned ? Vec::sign8(xs, sign[v]) : xs));
        }
      }
      for (int m = 0; m < MR; ++m)
        for (int v = 0; v < kNV; ++v) acc[m][v] = Vec::add32(acc[m][v], Vec::widen(part[m][v]));
    }
  }
}

// -offset times the sum of x's digits over each scale's inputs, per row of x, block and scale h: the
// integer that takes the layout's offset off its blocks' dot products (from quantize_x's lane offsets,
// -128 times the digits of 4 inputs each).
template <Layout L>
std::vector<int32_t> offsets(const QuantizedX& x, int64_t M, int64_t B) {
  constexpr int H = Traits<L>::H, kLanesPer = 8 / H;
  std::vector<int32_t> out;
  if constexpr (Traits<L>::kOffset != 0) {
    out.resize(M * B * H);
    for (int64_t i = 0; i < M * B; ++i)
      for (int h = 0; h < H; ++h) {
        int32_t sum = 0;
        for (int j = 0; j < kLanesPer; ++j) sum += x.offset[i * 8 + h * kLanesPer + j];
        out[i * H + h] = sum / 128 * Traits<L>::kOffset;  // exact: every lane is a multiple of 128
      }
  }
  return out;
}

// Rows m0 .. m0 + MR - 1 of y for the panel at output row n0 (`rows` of its rows are real).
template <Layout L, bool kTwo, int MR>
void tile(const Panel& p, const QuantizedX& x, const int32_t* offset, int64_t m0, int64_t K, float* y, int64_t ldy,
          int64_t n0, int64_t rows) {
  using I = typename Vec::I;
  using F = typename Vec::F;
  constexpr int H = Traits<L>::H, kStepsPerScale = kSteps / H;
  const int64_t B = K / kBlock;
  const int8_t* xq = x.q.data() + m0 * K;
  const int8_t* xr = x.r.data() + m0 * K;
  F out[MR][kNV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < kNV; ++v) out[m][v] = Vec::fzero();
  for (int64_t b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      I acc[MR][kNV];
      for (int m = 0; m < MR; ++m)
        for (int v = 0; v < kNV; ++v) acc[m][v] = Vec::zero();
      const int s0 = h * kStepsPerScale, s1 = s0 + kStepsPerScale;
      block_steps<L, MR>(p, xq, K, b, s0, s1, acc);
      if constexpr (kTwo) {  // 256 (w . xq) + w . xr
        for (int m = 0; m < MR; ++m)
          for (int v = 0; v < kNV; ++v) acc[m][v] = Vec::shift8(acc[m][v]);
        block_steps<L, MR>(p, xr, K, b, s0, s1, acc);
      }
      F a[kNV];
      for (int v = 0; v < kNV; ++v) a[v] = Vec::loadf(p.a.data() + (b * H + h) * kPanel + v * Vec::kLanes);
      for (int m = 0; m < MR; ++m) {
        const int64_t i = (m0 + m) * B + b;
        const F step = Vec::setf(x.scale[i]);
        const I off = Vec::set32(Traits<L>::kOffset != 0 ? offset[i * H + h] : 0);
        for (int v = 0; v < kNV; ++v) {
          const I d = Traits<L>::kOffset != 0 ? Vec::add32(acc[m][v], off) : acc[m][v];
          out[m][v] = Vec::fmadd(Vec::cvt(d), Vec::mul(a[v], step), out[m][v]);
        }
      }
    }
    if constexpr (Traits<L>::kMin) {
      F c[kNV];
      for (int v = 0; v < kNV; ++v) c[v] = Vec::loadf(p.c.data() + b * kPanel + v * Vec::kLanes);
      for (int m = 0; m < MR; ++m) {
        const F sum = Vec::setf(x.sum[(m0 + m) * B + b]);
        for (int v = 0; v < kNV; ++v) out[m][v] = Vec::fmadd(c[v], sum, out[m][v]);
      }
    }
  }
  alignas(64) float row[kPanel];
  for (int m = 0; m < MR; ++m) {
    for (int v = 0; v < kNV; ++v) Vec::storef(row + v * Vec::kLanes, out[m][v]);
    std::memcpy(y + (m0 + m) * ldy + n0, row, rows * sizeof(float));
  }
}

template <Layout L, bool kTwo>
void run(const Weights& w, const QuantizedX& x, int64_t M, int64_t N, float* y) {
  const int64_t K = w.K, B = K / kBlock;
  const std::vector<int32_t> offset = offsets<L>(x, M, B);
  const int64_t panels = (N + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    static thread_local Panel panel;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanel, rows = std::min<int64_t>(kPanel, N - n0);
      pack_panel<L>(w, n0, rows, panel);
      for (int64_t m0 = 0; m0 < M; m0 += kMR) {
        switch (std::min<int64_t>(kMR, M - m0)) {
          case 1: tile<L, kTwo, 1>(panel, x, offset.data(), m0, K, y, N, n0, rows); break;
          case 2: tile<L, kTwo, 2>(panel, x, offset.data(), m0, K, y, N, n0, rows); break;
          case 3: tile<L, kTwo, 3>(panel, x, offset.data(), m0, K, y, N, n0, rows); break;
          default: tile<L, kTwo, 4>(panel, x, offset.data(), m0, K, y, N, n0, rows); break;
        }
      }
    }
  });
}

// x (M, K), its arguments checked, times W (N rows) in layout L.
template <Layout L>
at::Tensor gemm(const at::Tensor& x, const Weights& w, int64_t N, int64_t digits) {
  const int64_t M = x.size(0);
  // x rounded on every thread (quantize_x is one thread's: decode calls it for one row)
  QuantizedX& xq = sized_x(M, w.K, w.group_size);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, M * (w.K / kBlock), 1024, [&](int64_t i0, int64_t i1) { quantize_blocks(xp, xq, i0, i1, digits == 2); });
  auto y = at::empty({M, N}, x.options());
  if (digits == 2) run<L, true>(w, xq, M, N, y.data_ptr<float>());
  else run<L, false>(w, xq, M, N, y.data_ptr<float>());
  return y;
}

Weights grouped(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor* min,
                int64_t group_size, int64_t digits) {
  check_grouped_args(x, q, scale, min, group_size, digits, min != nullptr);
  return {q.data_ptr<uint8_t>(), scale.data_ptr(), min ? min->data_ptr() : nullptr,
          scale.scalar_type() == at::kBFloat16, group_size, x.size(1)};
}

at::Tensor int4_gemm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& min,
                     int64_t group_size, int64_t digits) {
  return gemm<Layout::kInt4>(x, grouped(x, q, scale, &min, group_size, digits), q.size(0), digits);
}

at::Tensor int8_gemm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, int64_t group_size, int64_t digits) {
  return gemm<Layout::kInt8>(x, grouped(x, q, scale, nullptr, group_size, digits), q.size(0), digits);
}

template <Layout L>
at::Tensor kquant_gemm(const at::Tensor& x, const at::Tensor& w, int64_t digits) {
  check_kquant_args(x, w, digits, L == Layout::kQ6K);
  return gemm<L>(x, Weights{w.data_ptr<uint8_t>(), nullptr, nullptr, false, kSuper, x.size(1)}, w.size(0), digits);
}

at::Tensor q4k_gemm(const at::Tensor& x, const at::Tensor& w, int64_t digits) { return kquant_gemm<Layout::kQ4K>(x, w, digits); }

at::Tensor q6k_gemm(const at::Tensor& x, const at::Tensor& w, int64_t digits) { return kquant_gemm<Layout::kQ6K>(x, w, digits); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen2_kernels, m) {
  m.def("int4_gemm(Tensor x, Tensor q, Tensor scale, Tensor min, int group_size, int digits) -> Tensor");
  m.def("int8_gemm(Tensor x, Tensor q, Tensor scale, int group_size, int digits) -> Tensor");
  m.def("q4k_gemm(Tensor x, Tensor w, int digits) -> Tensor");
  m.def("q6k_gemm(Tensor x, Tensor w, int digits) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwen2_kernels, CPU, m) {
  m.impl("int4_gemm", &int4_gemm);
  m.impl("int8_gemm", &int8_gemm);
  m.impl("q4k_gemm", &q4k_gemm);
  m.impl("q6k_gemm", &q6k_gemm);
}
