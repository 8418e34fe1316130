// The pieces of the integer kernels that every one of them shares: activations rounded to int8 per block
// of 32 inputs (`quantize_x`), the 4-wide integer dot product (`dot4`), and the decoders of the weight
// blocks (int4 nibbles, GGUF Q4_K scales, Q6_K quants; their layouts are written out in quant_linear.cpp).
//
// Everything here has internal linkage (an anonymous namespace): each kernel file gets its own copy,
// and two builds of the kernels loaded into one process (bench_kernel_sources.py loads several) never
// resolve one another's functions.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kBlock = 32;   // activation quantisation block

// Sums of 4 products, lane j of 8 covering inputs 4j..4j+3 (the lane layout of `vpdpbusd`).
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
inline __m256i dot4(__m256i acc, __m256i u8, __m256i s8) { return _mm256_dpbusd_epi32(acc, u8, s8); }
#elif defined(__AVXVNNI__)
inline __m256i dot4(__m256i acc, __m256i u8, __m256i s8) { return _mm256_dpbusd_avx_epi32(acc, u8, s8); }
#else
// AVX2: vpmaddubsw sums pairs into int16, which holds 2 * 127 * 127 (and 2 * 15 * 127) without saturating
inline __m256i dot4(__m256i acc, __m256i u7, __m256i s8) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u7, s8), _mm256_set1_epi16(1)));
}
#endif

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The 32 int4 weights of one block as 32 bytes in input order.
inline __m256i unpack_int4(const uint8_t* p) {
  const __m128i low = _mm_set1_epi8(0x0F);
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), low), _mm_and_si128(b, low));
}

// x quantised per block of 32: digits xq, xr (0 with one digit) int8 (M, K), xs' fp32 (M, K/32), plus per block
// the fp32 sum of x (for the int4 min term) and the int8 offset as the starting value of the
// block's integer dot product: lane j of `vpdpbusd` sums inputs 4j..4j+3, so it starts at -128
// times their 256 xq + xr (every lane exact, not just their total: the lanes are scaled in fp32
// before they are added). thread_local: reused from call to call, as
// decode makes hundreds of small calls per token.
struct QuantizedX {
  std::vector<int8_t> q, r;
  std::vector<float> scale, sum;
  std::vector<int32_t> offset;  // (M * B, 8)
  std::vector<int32_t> group;   // block -> weight group
};

// The 32 int8 values of four vectors of 8 int32 lanes (inputs 0-7, 8-15, 16-23, 24-31), in input order.
inline __m256i pack_int8(__m256i a, __m256i b, __m256i c, __m256i d) {
  // the packs work within 128-bit halves: (a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7) as 32-bit groups
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
  return _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// The calling thread's buffers for M rows of x, sized (quantize_blocks fills them).
QuantizedX& sized_x(int64_t M, int64_t K, int64_t group_size) {
  static thread_local QuantizedX r;
  const int64_t B = K / kBlock;
  r.q.resize(M * K);
  r.r.resize(M * K);
  r.scale.resize(M * B);
  r.sum.resize(M * B);
  r.offset.resize(M * B * 8);
  r.group.resize(B);
  for (int64_t b = 0; b < B; ++b) r.group[b] = static_cast<int32_t>(b * kBlock / group_size);
  return r;
}

// Blocks [i0, i1) of x (blocks of 32 inputs, row after row) rounded into r; any thread may fill any range.
// Vectorised: decode calls this ~200 times per token, on one thread while the other waits, and a
// scalar loop (a chain of dependent adds for the sum) cost ~2 % of the 1.5B model's decode.
void quantize_blocks(const float* x, QuantizedX& r, int64_t i0, int64_t i1, bool two_digits) {
  const __m256 sign = _mm256_set1_ps(-0.f), lim = _mm256_set1_ps(127.f), k256 = _mm256_set1_ps(256.f);
  const __m256i ones = _mm256_set1_epi8(1);
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;  // ties to even, as nearbyint
  for (int64_t i = i0; i < i1; ++i) {
    const float* xb = x + i * kBlock;
    __m256 v[4];
    for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(xb + 8 * j);
    const __m256 amax8 = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                       _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    const float sum = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m256i q[4], rest[4];
    for (int j = 0; j < 4; ++j) {
      const __m256 t = _mm256_mul_ps(v[j], inv);
      const __m256 qf = _mm256_round_ps(t, kRound);
      q[j] = _mm256_cvtps_epi32(qf);
      rest[j] = two_digits ? _mm256_cvtps_epi32(_mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), lim), _mm256_min_ps(
                                 lim, _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(t, qf), k256), kRound))))
                           : _mm256_setzero_si256();
    }
    const __m256i xq = pack_int8(q[0], q[1], q[2], q[3]), xr = pack_int8(rest[0], rest[1], rest[2], rest[3]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r.q.data() + i * kBlock), xq);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r.r.data() + i * kBlock), xr);
    // lane j: -128 times the sum over inputs 4j..4j+3 of 256 xq + xr (or xq), the layout of dot4
    const __m256i q4 = dot4(_mm256_setzero_si256(), ones, xq);
    const __m256i digits = two_digits ? _mm256_add_epi32(_mm256_slli_epi32(q4, 8), dot4(_mm256_setzero_si256(), ones, xr)) : q4;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r.offset.data() + i * 8),
                        _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(digits, 7)));
    r.scale[i] = two_digits ? amax / 127.f / 256.f : amax / 127.f;
    r.sum[i] = sum;
  }
}

const QuantizedX& quantize_x(const float* x, int64_t M, int64_t K, int64_t group_size, bool two_digits) {
  QuantizedX& r = sized_x(M, K, group_size);
  quantize_blocks(x, r, 0, M * (K / kBlock), two_digits);
  return r;
}

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

// n scales (or mins) as fp32, 8 at a time: bf16 -> fp32 is a 16-bit shift, exact.
inline void to_floats(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void to_floats(const at::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16)));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

constexpr int kSuper = 256;     // weights per k-quant super-block
constexpr int kQ4KBytes = 144;
constexpr int kQ6KBytes = 210;

// The arguments of a layout's kernels, decode and GEMM alike, checked. Grouped int4 / int8: x contiguous
// fp32 (M, K), K a multiple of 64, weight uint8 (N, K / 2 or K), scale (and int4's min) fp32 or bf16
// (N, K / group_size).
inline void check_grouped_args(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor* min,
                               int64_t group_size, int64_t digits, bool int4) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 (M, K)");
  const int64_t K = x.size(1), N = q.size(0);
  TORCH_CHECK(K % (2 * kBlock) == 0 && group_size % kBlock == 0 && K % group_size == 0,
              "K must be a multiple of 64, group_size a multiple of 32 dividing K");
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous() && q.dim() == 2 && q.size(1) == (int4 ? K / 2 : K),
              "weight must be contiguous uint8 (N, ", int4 ? K / 2 : K, ")");
  const auto stype = scale.scalar_type();
  TORCH_CHECK((stype == at::kFloat || stype == at::kBFloat16) && scale.is_contiguous() && scale.numel() == N * (K / group_size),
              "scale must be contiguous fp32 or bf16 (N, K / group_size)");
  TORCH_CHECK(!int4 || (min->scalar_type() == stype && min->is_contiguous() && min->numel() == scale.numel()),
              "min must be like scale");
  TORCH_CHECK(digits == 1 || digits == 2, "digits must be 1 or 2");
}

// GGUF k-quant rows: x contiguous fp32 (M, K), K whole super-blocks, w the GGUF's uint8 rows (N, K / 256 * bytes).
inline void check_kquant_args(const at::Tensor& x, const at::Tensor& w, int64_t digits, bool q6) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 (M, K)");
  const int64_t K = x.size(1);
  TORCH_CHECK(K % kSuper == 0, "K must be a multiple of 256 (whole super-blocks), not ", K);
  const int64_t row_bytes = K / kSuper * (q6 ? kQ6KBytes : kQ4KBytes);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.dim() == 2 && w.size(1) == row_bytes,
              "weight must be contiguous uint8 (N, ", row_bytes, "): the GGUF's ", q6 ? "Q6_K" : "Q4_K", " rows");
  TORCH_CHECK(digits == 1 || digits == 2, "digits must be 1 or 2");
}

inline float half_to_float(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof bits);  // k-quant blocks are not 2-byte aligned (210 bytes each)
#if defined(__F16C__)
  return _cvtsh_ss(bits);
#else
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
#endif
}

// A Q4_K block's eight sub-block scales d * sc_j and mins dmin * m_j as fp32 lanes j. The 6-bit
// fields are unpacked four at a time in 32-bit words (see the layout above); the 16-bit shifts'
// bits that spill into a neighbouring byte are masked off.
inline void q4k_scales(const uint8_t* block, __m256& scale, __m256& min) {
  uint32_t u[3];
  std::memcpy(u, block + 4, sizeof u);
  const uint32_t low6 = 0x3F3F3F3F, low4 = 0x0F0F0F0F, top2 = 0x30303030;
  const uint64_t sc = (u[0] & low6) | uint64_t((u[2] & low4) | ((u[0] >> 2) & top2)) << 32;
  const uint64_t m = (u[1] & low6) | uint64_t(((u[2] >> 4) & low4) | ((u[1] >> 2) & top2)) << 32;
  const auto lanes = [](uint64_t bytes) {  // 8 bytes -> 8 fp32 lanes, byte j in lane j
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(bytes))));
  };
  scale = _mm256_mul_ps(_mm256_set1_ps(half_to_float(block)), lanes(sc));
  min = _mm256_mul_ps(_mm256_set1_ps(half_to_float(block + 2)), lanes(m));
}

// Half h of a Q6_K block as the quants of its four blocks of 32, q in [0, 63], each in input order:
// q = low 4 bits | top 2 bits << 4 (the 16-bit shifts' spill into the next byte is masked off).
inline void q6k_quants(const uint8_t* block, int h, __m256i q[4]) {
  const __m256i low = _mm256_set1_epi8(0x0F), top = _mm256_set1_epi8(0x30);
  const __m256i qa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 64 * h));
  const __m256i qb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 64 * h + 32));
  const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 128 + 32 * h));
  q[0] = _mm256_or_si256(_mm256_and_si256(qa, low), _mm256_and_si256(_mm256_slli_epi16(qh, 4), top));
  q[1] = _mm256_or_si256(_mm256_and_si256(qb, low), _mm256_and_si256(_mm256_slli_epi16(qh, 2), top));
  q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qa, 4), low), _mm256_and_si256(qh, top));
  q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qb, 4), low), _mm256_and_si256(_mm256_srli_epi16(qh, 2), top));
}

}  // namespace
