// Weight-only quantised linears for decode on x86 CPUs: y = x @ dequant(W)^T (+ bias), x fp32 (M, K).
//
// Decode reads every weight once per token, so it is bound by memory bandwidth, provided the
// arithmetic keeps up: turning each 4-bit weight into an fp32 lane and FMA-ing it costs more than
// the memory brings in on 2 cores. So the dot products run on 8-bit integers (VNNI `vpdpbusd`, or
// AVX2 `vpmaddubsw`/`vpmaddwd`), 32 weights per instruction, on activations rounded to int8 per
// block of 32 inputs, x ≈ xs * xq with xs = absmax(block) / 127 (what llama.cpp does), or, with
// `digits` = 2, to two int8 digits, x ≈ xs * (xq + xr / 256): ~16-bit exact for a second integer
// dot product. One digit everywhere cost the 0.5B model ~2 % perplexity on top of its 4-bit
// weights, nearly all of it in the attention projections; the caller chooses per layer.
//
// Weight layouts (all row-major over the N output rows; g = k / group_size):
//   int4  q  uint8 (N, K/2): per block of 32 inputs, 16 bytes; byte j holds input j in its low
//            nibble and input j + 16 in its high nibble.  w[n, k] = q * scale[n, g] + min[n, g]
//   int8  q  uint8 (N, K): the int8 value + 128.                 w[n, k] = (q - 128) * scale[n, g]
// scale and min are fp32 or bf16 (N, K / group_size); group_size is a multiple of 32 dividing K, and
// K a multiple of 64 (blocks are taken two at a time).
//   q4_k, q6_k  uint8 (N, K / 256 * 144 or 210): a GGUF's Q4_K / Q6_K rows as the file stores them,
//            super-blocks of 256 weights with their own scales inside (the section at the end).
//
// With d_b = 256 (q_b · xq_b) + q_b · xr_b, or q_b · xq_b with one digit (int32, exact), b = k / 32
// and xs' = xs / 256 (two digits) or xs (one):
//   int4: y = sum_b xs'_b * scale_g * d_b                        + sum_g min_g * (sum of x over g)
//   int8: y = sum_b xs'_b * scale_g * (d_b - 128 (digits of x summed over b, like d_b))
// The min term uses the exact fp32 sums of x, so only the scale term sees the activation rounding.
// int8's offset is taken off in int32 (exactly) before anything is rounded: done in fp32 after the
// scaling, the two large terms would cancel and leave their rounding error behind.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "int8_blocks.h"
#include "layer_kinds.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int kMaxRows = 4;  // rows of x that share one pass over the weights
// How far ahead the weights are prefetched: whole rows, about 5 KB, but 3 to 6 rows. Why not a fixed 3
// rows: rows of 864 bytes (the 1.5B model's Q4_K gate/up/q/o, 1536 inputs) prefetched 3 rows ahead, 2.6 KB,
// arrive late; 6 rows ahead, one decode step's kernel calls took 34.3 -> 31.5 ms (AVX-512 VNNI build) and
// 41.3 -> 37.2 ms (AVX2 build), whole steps 45.4 -> 41.5 and 50.4 -> 45.3 ms (AMD EPYC Zen 4,
// bench_kernel_sources). 5-7 KB rows (down_proj) gain nothing past 3 rows, and too far loses it again:
// 10 rows of 864 bytes, or 12 of the 0.5B model's 448-byte int4 rows (its gate/up 10-15 % slower).
constexpr int kMinPrefetchRows = 3, kMaxPrefetchRows = 6;
constexpr int64_t kPrefetchBytes = 5 << 10;

// The prefetch distance for rows of `row_bytes`, in whole rows.
inline int64_t prefetch_rows(int64_t row_bytes) {
  return std::clamp<int64_t>((kPrefetchBytes + row_bytes - 1) / row_bytes, kMinPrefetchRows, kMaxPrefetchRows);
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float out = hsum(acc);
  for (; i < n; ++i) out += a[i] * b[i];
  return out;
}

// The cache lines of [p, p + bytes) on their way in (`prefetcht1`: into L2), for the weights
// prefetch_rows rows ahead of the ones being read. Without it the kernels read half as fast (the
// hardware prefetcher alone keeps too few lines in flight here). Issued a block at a time as a row
// is read, never a whole row at once: a burst of ~100 prefetches for one of the down projection's
// 5-7 KB rows fills the core's miss buffers and the loads behind it wait (measured on the 1.5B
// model's own matrices, 2 threads: the k-quant kernels went from 17 to 20 GB/s, down_proj from 15 to 19).
inline void prefetch(const uint8_t* p, int64_t bytes) {
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + bytes;
  for (uintptr_t line = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63); line < end; line += 64)
    _mm_prefetch(reinterpret_cast<const char*>(line), _MM_HINT_T1);
}

// Super-block s of a k-quant row (kBytes each), its counterpart `ahead` bytes on prefetched.
template <int64_t kBytes>
inline const uint8_t* super_block(const uint8_t* row, int64_t s, int64_t ahead) {
  const uint8_t* block = row + s * kBytes;
  prefetch(block + ahead, kBytes);
  return block;
}

// The Q6_K kernels' row loop, at any vector width: for each output row n in [n0, n1) of a weight of S
// super-blocks per row, two accumulators per row of x, zeroed; body(s, block, acc0, acc1) for each
// super-block of the row; then store(n, acc0, acc1).
template <int M, int kBytes, typename Vec, typename Body, typename Store>
inline void super_block_rows(const uint8_t* w, int64_t S, int64_t n0, int64_t n1, Vec zero, Body&& body, Store&& store) {
  const int64_t row_bytes = S * kBytes, ahead = prefetch_rows(row_bytes) * row_bytes;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    Vec acc0[M], acc1[M];
    for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = zero;
    for (int64_t s = 0; s < S; ++s) body(s, super_block<kBytes>(row, s, ahead), acc0, acc1);
    store(n, acc0, acc1);
  }
}

template <bool kInt4>
inline __m256i load_block(const uint8_t* row, int64_t b) {
  return kInt4 ? unpack_int4(row + b * 16) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * 32));
}

// Block i's integer dot product d = 256 (w · xq) + w · xr (kTwo) or w · xq, exact in every int32
// lane (|d| < 2^24 per lane, so its conversion to fp32 is exact too).
template <bool kInt4, bool kTwo>
inline __m256i block_dot(const QuantizedX& x, int64_t i, __m256i w) {
  const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + i * kBlock));
  const __m256i xr = kTwo ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.r.data() + i * kBlock)) : xq;
  const __m256i zero = _mm256_setzero_si256();
  if (kInt4) {  // w in [0, 15]
    const __m256i high = dot4(zero, w, xq);
    return kTwo ? _mm256_add_epi32(_mm256_slli_epi32(high, 8), dot4(zero, w, xr)) : high;
  }
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
  // w is the int8 value + 128: unsigned, as vpdpbusd wants; the offset takes the 128 off
  const __m256i start = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.offset.data() + i * 8));
  if (!kTwo) return dot4(start, w, xq);
  return _mm256_add_epi32(_mm256_slli_epi32(dot4(zero, w, xq), 8), dot4(start, w, xr));
#else
  // vpmaddubsw would saturate on w + 128: multiply |w| by the digits carrying w's sign instead
  const __m256i ws = _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80))), wa = _mm256_abs_epi8(ws);
  const __m256i high = dot4(zero, wa, _mm256_sign_epi8(xq, ws));
  return kTwo ? _mm256_add_epi32(_mm256_slli_epi32(high, 8), dot4(zero, wa, _mm256_sign_epi8(xr, ws))) : high;
#endif
}

// For rows xrow.. xrow + M - 1 of x and each of G weight groups (per_group blocks each), the sum of
// x over the group: out[m * G + g], for the int4 min term.
inline void group_sums(const QuantizedX& x, int64_t xrow, int M, int64_t B, int64_t G, int64_t per_group, float* out) {
  for (int m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float part = 0.f;
      for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) part += x.sum[(xrow + m) * B + b];
      out[m * G + g] = part;
    }
}

// Output rows [n0, n1) for M (<= kMaxRows) rows of x.

template <int M, bool kInt4, bool kTwo, typename S>
void rows(const QuantizedX& x, int64_t xrow, int64_t K, const uint8_t* q, const S* scale,
          const S* min, int64_t group_size, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t B = K / kBlock, G = K / group_size, per_group = group_size / kBlock;
  constexpr int64_t kBlockBytes = kInt4 ? kBlock / 2 : kBlock;
  const int64_t row_bytes = K / kBlock * kBlockBytes, rows_ahead = prefetch_rows(row_bytes);
  // int4: per row m of x and group g of weights, the sum of x over g (for the min term)
  float group_sum[M][kInt4 ? G : 1];
  if (kInt4) group_sums(x, xrow, M, B, G, per_group, &group_sum[0][0]);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qn = q + n * row_bytes;
    const S* sn = scale + n * G;
    float sf[G], mf[G];  // this row's scales (and mins) as fp32
    for (int64_t g = 0; g < G; ++g) sf[g] = to_float(sn[g]), mf[g] = kInt4 ? to_float(min[n * G + g]) : 0.f;
    prefetch(reinterpret_cast<const uint8_t*>(sn + rows_ahead * G), G * int64_t(sizeof(S)));
    if (kInt4) prefetch(reinterpret_cast<const uint8_t*>(min + (n + rows_ahead) * G), G * int64_t(sizeof(S)));
    __m256 acc0[M], acc1[M];  // two accumulators, even and odd blocks, so FMAs do not wait on each other
    for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < B; b += 2) {
      prefetch(qn + rows_ahead * row_bytes + b * kBlockBytes, 2 * kBlockBytes);
      const __m256 s0 = _mm256_set1_ps(sf[x.group[b]]), s1 = _mm256_set1_ps(sf[x.group[b + 1]]);
      const __m256i w0 = load_block<kInt4>(qn, b), w1 = load_block<kInt4>(qn, b + 1);
      for (int m = 0; m < M; ++m) {
        const int64_t i = (xrow + m) * B + b;
        const __m256i d0 = block_dot<kInt4, kTwo>(x, i, w0), d1 = block_dot<kInt4, kTwo>(x, i + 1, w1);
        acc0[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_mul_ps(s0, _mm256_set1_ps(x.scale[i])), acc0[m]);
        acc1[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_mul_ps(s1, _mm256_set1_ps(x.scale[i + 1])), acc1[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      const float out = hsum(_mm256_add_ps(acc0[m], acc1[m]));
      y[(xrow + m) * ldy + n] = kInt4 ? out + dot(mf, group_sum[m], G) : out;
    }
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// 512-bit kernels where the CPU has AVX-512 VNNI (this one, and the k-quant ones further down).
constexpr bool kWide = true;

// `vpermps` indices: lanes 0-7 take element `first`, lanes 8-15 element `second`.
inline __m512i lanes_of(int first, int second) {
  return _mm512_setr_epi32(first, first, first, first, first, first, first, first,
                           second, second, second, second, second, second, second, second);
}

// 16 scales as fp32 (bf16 -> fp32 is a 16-bit shift, exact), lanes outside `k` zero.
inline __m512 scales16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 scales16(const at::BFloat16* p, __mmask16 k) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}

// `rows` for int4, 512 bits wide: blocks b and b + 1 in one vector (lanes 0-7 block b, 8-15 b + 1),
// and each block's step s_g xs'_b multiplied out once per row, a vector at a time, not per block.
// Why: with 16 bytes of weights per block, `rows` spends more time on its arithmetic than on memory
// (one thread, int4 4864 x 896 from the last-level cache: 12.7 GB/s, int8 24.0; this: 15.0). On the
// 0.5B model's own weights its int4 gate/up_proj calls read 20.5-20.8 GB/s instead of 18.9-19.4
// (`bench_kernel_sources.py`, benchmarks/results/kernel_sources-int4-wide.md). Every lane adds up
// the same products in the same order as `rows` does: the outputs are bit for bit the same.
template <int M, bool kTwo, typename S>
void int4_rows_wide(const QuantizedX& x, int64_t xrow, int64_t K, const uint8_t* q, const S* scale,
                    const S* min, int64_t group_size, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t B = K / kBlock, G = K / group_size, per_group = group_size / kBlock, row_bytes = B * kBlock / 2;
  const int64_t rows_ahead = prefetch_rows(row_bytes);
  float group_sum[M][G];  // as in `rows`
  group_sums(x, xrow, M, B, G, per_group, &group_sum[0][0]);
  const __m512i zero = _mm512_setzero_si512(), low = _mm512_set1_epi8(0x0F), pair = lanes_of(0, 1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qn = q + n * row_bytes;
    float mf[G];  // the row's mins as fp32
    to_floats(min + n * G, mf, G);
    prefetch(reinterpret_cast<const uint8_t*>(scale + (n + rows_ahead) * G), G * int64_t(sizeof(S)));
    prefetch(reinterpret_cast<const uint8_t*>(min + (n + rows_ahead) * G), G * int64_t(sizeof(S)));
    // s_g xs'_b: the fp32 value of one unit of block b's integer dot product. Made from the scales
    // in registers (storing them as fp32 first and reading 64 bytes back stalled on store forwarding).
    float step[M][B];
    for (int m = 0; m < M; ++m) {
      const float* xs = x.scale.data() + (xrow + m) * B;
      if (per_group == 1) {
        for (int64_t b = 0; b < B; b += 16) {
          const __mmask16 k = B - b >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (B - b)) - 1);
          _mm512_mask_storeu_ps(step[m] + b, k, _mm512_mul_ps(scales16(scale + n * G + b, k), _mm512_maskz_loadu_ps(k, xs + b)));
        }
      } else {
        for (int64_t b = 0; b < B; ++b) step[m][b] = to_float(scale[n * G + x.group[b]]) * xs[b];
      }
    }
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < B; b += 2) {  // K is a multiple of 64: blocks come in pairs
      if (b % 4 == 0) prefetch(qn + rows_ahead * row_bytes + b * kBlock / 2, 2 * kBlock);
      // 16 bytes a block, low nibbles its inputs 0-15, high nibbles 16-31: (low b, low b + 1, high b,
      // high b + 1) 16 bytes each, then into input order
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qn + b * kBlock / 2));
      const __m512i nibbles = _mm512_and_si512(
          _mm512_inserti64x4(_mm512_castsi256_si512(packed), _mm256_srli_epi16(packed, 4), 1), low);
      const __m512i w = _mm512_shuffle_i64x2(nibbles, nibbles, _MM_SHUFFLE(3, 1, 2, 0));
      for (int m = 0; m < M; ++m) {
        const int64_t i = (xrow + m) * B + b;
        __m512i d = _mm512_dpbusd_epi32(zero, w, _mm512_loadu_si512(x.q.data() + i * kBlock));
        if constexpr (kTwo)
          d = _mm512_add_epi32(_mm512_slli_epi32(d, 8), _mm512_dpbusd_epi32(zero, w, _mm512_loadu_si512(x.r.data() + i * kBlock)));
        const __m512 s = _mm512_permutexvar_ps(pair, _mm512_castps128_ps512(  // (step b) x 8, (step b + 1) x 8
            _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(step[m] + b)))));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) y[(xrow + m) * ldy + n] = _mm512_reduce_add_ps(acc[m]) + dot(mf, group_sum[m], G);
  }
}
#else
constexpr bool kWide = false;
template <int M, bool kTwo, typename S>
void int4_rows_wide(const QuantizedX&, int64_t, int64_t, const uint8_t*, const S*, const S*, int64_t, float*, int64_t,
                    int64_t, int64_t) {}
#endif

// The output rows split over the threads, at least ~64 KB of weights each (below that, waking the
// second thread costs more than it saves), and the rows of x taken kMaxRows at a time:
// rows_of(std::integral_constant<int, m>(), m0, n0, n1) for the m = min(kMaxRows, M - m0) rows from m0.
// With more than kMaxRows rows of x, each group of them passes over a tile of ~kTileBytes of weights
// before the next tile: the later groups then read the tile from L2 instead of from memory again
// (a batch of 8 decode rows read each weight twice from memory before).
constexpr int64_t kTileBytes = 128 << 10;

template <typename F>
void over_rows(int64_t M, int64_t N, int64_t row_bytes, F rows_of) {
  const int64_t grain = std::max<int64_t>(16, (64 << 10) / row_bytes);
  const int64_t tile = M > kMaxRows ? std::max<int64_t>(8, kTileBytes / row_bytes) : N;
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t t0 = n0; t0 < n1; t0 += tile) {
      const int64_t t1 = std::min(n1, t0 + tile);
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        switch (std::min<int64_t>(kMaxRows, M - m0)) {
          case 1: rows_of(std::integral_constant<int, 1>(), m0, t0, t1); break;
          case 2: rows_of(std::integral_constant<int, 2>(), m0, t0, t1); break;
          case 3: rows_of(std::integral_constant<int, 3>(), m0, t0, t1); break;
          default: rows_of(std::integral_constant<int, 4>(), m0, t0, t1); break;
        }
      }
    }
  });
}

template <bool kInt4, bool kTwo, typename S>
void run(const QuantizedX& xq, int64_t M, int64_t K, int64_t N, const at::Tensor& q, const at::Tensor& scale,
         const at::Tensor* min, int64_t group_size, float* yp) {
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const S* sp = scale.data_ptr<S>();
  const S* mp = kInt4 ? min->data_ptr<S>() : nullptr;
  over_rows(M, N, q.size(1), [&](auto m, int64_t m0, int64_t n0, int64_t n1) {
    if constexpr (kInt4 && kWide) int4_rows_wide<decltype(m)::value, kTwo, S>(xq, m0, K, qp, sp, mp, group_size, yp, N, n0, n1);
    else rows<decltype(m)::value, kInt4, kTwo, S>(xq, m0, K, qp, sp, mp, group_size, yp, N, n0, n1);
  });
}

template <bool kInt4>
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor* min,
                        int64_t group_size, int64_t digits) {
  check_grouped_args(x, q, scale, min, group_size, digits, kInt4);
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  const auto stype = scale.scalar_type();
  const QuantizedX& xq = quantize_x(x.data_ptr<float>(), M, K, group_size, digits == 2);
  auto y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  if (stype == at::kFloat) {
    if (digits == 2) run<kInt4, true, float>(xq, M, K, N, q, scale, min, group_size, yp);
    else run<kInt4, false, float>(xq, M, K, N, q, scale, min, group_size, yp);
  } else {
    if (digits == 2) run<kInt4, true, at::BFloat16>(xq, M, K, N, q, scale, min, group_size, yp);
    else run<kInt4, false, at::BFloat16>(xq, M, K, N, q, scale, min, group_size, yp);
  }
  return y;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& min,
                       int64_t group_size, int64_t digits) {
  return quant_linear<true>(x, q, scale, &min, group_size, digits);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, int64_t group_size,
                       int64_t digits) {
  return quant_linear<false>(x, q, scale, nullptr, group_size, digits);
}

// --------------------------------------------------------------------------------------------------
// GGUF k-quant super-blocks (Q4_K, Q6_K), kept byte for byte as the GGUF file stores them
// --------------------------------------------------------------------------------------------------
//
// Both formats cut a row into super-blocks of 256 inputs (K a multiple of 256): a weight row is
// K / 256 blocks of 144 (Q4_K) or 210 (Q6_K) bytes, and the tensor is uint8 (N, K / 256 * bytes),
// the GGUF's own rows.
//
// Q4_K, 144 bytes per 256 weights (4.5 bits each):
//   [0, 2)     fp16 d        the super-scale of the sub-block scales
//   [2, 4)     fp16 dmin     the super-scale of the sub-block mins
//   [4, 16)    eight 6-bit scales sc_j and eight 6-bit mins m_j, one per sub-block j of 32 weights,
//              read as three little-endian words u0 u1 u2: sc_0..3 are the low 6 bits of u0's bytes,
//              m_0..3 those of u1's; sc_4..7 are the low nibbles of u2's bytes under u0's top 2 bits,
//              m_4..7 the high nibbles of u2's bytes under u1's top 2 bits.
//   [16, 144)  four runs of 32 bytes: byte i of run r holds weight i of sub-block 2r in its low
//              nibble and weight i of sub-block 2r + 1 in its high nibble.
//   w[32 j + i] = d * sc_j * q - dmin * m_j,  q in [0, 15]
// One 32-byte load and two masks give two whole sub-blocks in input order, and a sub-block is
// exactly one activation block of 32: one scale, one min, like the int4 layout.
//
// Q6_K, 210 bytes per 256 weights (6.5625 bits each):
//   [0, 128)    ql: the low 4 bits of the 6-bit quants   [128, 192)  qh: their top 2 bits
//   [192, 208)  sixteen int8 scales, one per 16 weights  [208, 210)  fp16 d
//   Half h of the block (128 weights) uses ql[64h, 64h + 64) and qh[32h, 32h + 32); its 32-weight
//   block k (activation block b = 4h + k of the super-block) is, for i = 0..31,
//     low 4 bits: k = 0 ql[64h + i] & 15,  k = 1 ql[64h + 32 + i] & 15,  k = 2, 3 the same bytes >> 4
//     top 2 bits: bits 2k and 2k + 1 of qh[32h + i]
//   w[32 b + i] = d * sc[2b + i / 16] * (q - 32),  q in [0, 63]
// Three 32-byte loads give four whole blocks of 32 in input order. The twist is the scale per 16
// weights: lanes 0-3 of a block's integer dot product sum inputs 0-15 and lanes 4-7 inputs 16-31
// (the lane layout of dot4), so the lanes are scaled by (s, s, s, s, s', s', s', s') in fp32.
//
// Activations are rounded exactly as for the int4/int8 layouts: per block of 32, one or two int8
// digits (quantize_x). Why 32 and not llama.cpp's 256 (its Q8_K): a block of 32 is a Q4_K sub-block,
// so the accuracy measured for the int4 engine carries over unchanged (with one absmax per 256
// inputs, an outlier channel of Qwen2's activations would set the step of 255 others, not 31),
// and the price, one fp32 conversion and FMA per 32 weights, is arithmetic that a memory-bound
// decode has to spare. With D_b the exact integer dot product of block b (as block_dot):
//   Q4_K: y = sum_b (d sc_b xs'_b) D_b  -  sum_b dmin m_b (fp32 sum of x over b)
//   Q6_K: y = sum_b d xs'_b (sc_2b D_b[lanes 0-3] + sc_2b+1 D_b[lanes 4-7]),  D_b of q - 32
// where Q6_K's -32 is taken off in int32 like the int8 layout's -128 (its per-lane offset / 4).

// Q6_K's integer dot product of block i: q in [0, 63] is unsigned, as vpdpbusd wants (and
// vpmaddubsw: 2 * 63 * 127 fits its int16); starting from a quarter of the int8 layout's offset
// (-128 times the digits of x, per lane) takes the 32 off exactly. Every lane stays below 2^24.
template <bool kTwo>
inline __m256i q6k_block_dot(const QuantizedX& x, int64_t i, __m256i w) {
  const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + i * kBlock));
  const __m256i start = _mm256_srai_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.offset.data() + i * 8)), 2);
  if (!kTwo) return dot4(start, w, xq);
  const __m256i xr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.r.data() + i * kBlock));
  return _mm256_add_epi32(_mm256_slli_epi32(dot4(_mm256_setzero_si256(), w, xq), 8), dot4(start, w, xr));
}

// Output rows [n0, n1) of a Q4_K weight for M (<= kMaxRows) rows of x.
template <int M, bool kTwo>
void q4k_rows(const QuantizedX& x, int64_t xrow, int64_t K, const uint8_t* w, float* y, int64_t ldy,
              int64_t n0, int64_t n1) {
  const int64_t S = K / kSuper, B = K / kBlock, row_bytes = S * kQ4KBytes, ahead = prefetch_rows(row_bytes) * row_bytes;
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    __m256 acc0[M], acc1[M], mins[M];  // even and odd sub-blocks; the min term apart
    for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = mins[m] = _mm256_setzero_ps();
    for (int64_t s = 0; s < S; ++s) {
      const uint8_t* block = super_block<kQ4KBytes>(row, s, ahead);
      __m256 scale, min;
      q4k_scales(block, scale, min);
      alignas(32) float step[M][8];  // d sc_j xs'_j: the fp32 value of one unit of D_j, per row of x
      for (int m = 0; m < M; ++m) {
        const int64_t i = (xrow + m) * B + s * 8;  // the super-block's first activation block
        _mm256_store_ps(step[m], _mm256_mul_ps(scale, _mm256_loadu_ps(x.scale.data() + i)));
        mins[m] = _mm256_fmadd_ps(min, _mm256_loadu_ps(x.sum.data() + i), mins[m]);
      }
      for (int r = 0; r < 4; ++r) {
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 16 + 32 * r));
        const __m256i w0 = _mm256_and_si256(bytes, low);                         // sub-block 2r
        const __m256i w1 = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);   // sub-block 2r + 1
        for (int m = 0; m < M; ++m) {
          const int64_t i = (xrow + m) * B + s * 8 + 2 * r;
          const __m256i d0 = block_dot<true, kTwo>(x, i, w0), d1 = block_dot<true, kTwo>(x, i + 1, w1);
          acc0[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_set1_ps(step[m][2 * r]), acc0[m]);
          acc1[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_set1_ps(step[m][2 * r + 1]), acc1[m]);
        }
      }
    }
    for (int m = 0; m < M; ++m) y[(xrow + m) * ldy + n] = hsum(_mm256_add_ps(acc0[m], acc1[m])) - hsum(mins[m]);
  }
}

// Output rows [n0, n1) of a Q6_K weight for M (<= kMaxRows) rows of x.
template <int M, bool kTwo>
void q6k_rows(const QuantizedX& x, int64_t xrow, int64_t K, const uint8_t* w, float* y, int64_t ldy,
              int64_t n0, int64_t n1) {
  const int64_t S = K / kSuper, B = K / kBlock;
  // lane pattern (2k, 2k, 2k, 2k, 2k + 1 x 4) for block k of a half: its two scales, one per 16 inputs
  __m256i pair[4];
  for (int k = 0; k < 4; ++k) pair[k] = _mm256_setr_epi32(2 * k, 2 * k, 2 * k, 2 * k, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1);
  super_block_rows<M, kQ6KBytes>(w, S, n0, n1, _mm256_setzero_ps(),
    [&](int64_t s, const uint8_t* block, __m256* acc0, __m256* acc1) {
      // the 16 scales times d, as fp32: half h's eight in halves[h]
      const __m256 d = _mm256_set1_ps(half_to_float(block + 208));
      const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 192));
      const __m256 halves[2] = {_mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc))),
                                _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))))};
      for (int h = 0; h < 2; ++h) {
        __m256i q[4];
        q6k_quants(block, h, q);
        for (int k = 0; k < 4; k += 2) {  // blocks 4h + k (even: acc0) and 4h + k + 1 (odd: acc1)
          // d sc_2b x 4, d sc_2b+1 x 4 for each of the two blocks
          const __m256 s0 = _mm256_permutevar8x32_ps(halves[h], pair[k]);
          const __m256 s1 = _mm256_permutevar8x32_ps(halves[h], pair[k + 1]);
          for (int m = 0; m < M; ++m) {
            const int64_t i = (xrow + m) * B + s * 8 + 4 * h + k;
            const __m256 d0 = _mm256_cvtepi32_ps(q6k_block_dot<kTwo>(x, i, q[k]));
            const __m256 d1 = _mm256_cvtepi32_ps(q6k_block_dot<kTwo>(x, i + 1, q[k + 1]));
            acc0[m] = _mm256_fmadd_ps(d0, _mm256_mul_ps(s0, _mm256_set1_ps(x.scale[i])), acc0[m]);
            acc1[m] = _mm256_fmadd_ps(d1, _mm256_mul_ps(s1, _mm256_set1_ps(x.scale[i + 1])), acc1[m]);
          }
        }
      }
    },
    [&](int64_t n, const __m256* acc0, const __m256* acc1) {
      for (int m = 0; m < M; ++m) y[(xrow + m) * ldy + n] = hsum(_mm256_add_ps(acc0[m], acc1[m]));
    });
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// The same two kernels 512 bits wide, where the CPU has AVX-512 VNNI: one instruction does the work
// of two. Why: decode streams the weights from memory, and there the 256-bit kernels lost time to
// their own arithmetic; on the 1.5B model's own weights one decode step's kernel calls took 46.1
// instead of 50.2 ms, whole decode steps 57.6 instead of 61.0 (`bench_kernel_sources.py`,
// benchmarks/results/kernel_sources-wide.md). Each row of x still goes through its own arithmetic
// whatever M (a batch row equals the row alone, bit for bit), but the lanes add up in another order
// than above: the two versions' results differ in the last bits.

// x's activation blocks a and b (32 int8 each) as one 512-bit vector, a in the low half.
inline __m512i two_blocks(const int8_t* x, int64_t a, int64_t b) {
  const __m256i low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + a * kBlock));
  return _mm512_inserti64x4(_mm512_castsi256_si512(low), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + b * kBlock)), 1);
}

// Q4_K: load r (of 2) holds the 32-byte runs 2r and 2r + 1; its low nibbles are sub-blocks
// (4r, 4r + 2), its high nibbles (4r + 1, 4r + 3). Lanes 0-7 of the integer dot product sum the first sub-block,
// lanes 8-15 the second, so each half is scaled by its own sub-block's step.
template <int M, bool kTwo>
void q4k_rows_wide(const QuantizedX& x, int64_t xrow, int64_t K, const uint8_t* w, float* y, int64_t ldy,
                   int64_t n0, int64_t n1) {
  const int64_t S = K / kSuper, B = K / kBlock, row_bytes = S * kQ4KBytes, ahead = prefetch_rows(row_bytes) * row_bytes;
  const __m512i low = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
  const __m512i pick[4] = {lanes_of(0, 2), lanes_of(1, 3), lanes_of(4, 6), lanes_of(5, 7)};  // (low, high) x 2 loads
  const auto dot = [&](int64_t a, __m512i wv) {  // blocks a and a + 2 of x against wv
    const __m512i high = _mm512_dpbusd_epi32(zero, wv, two_blocks(x.q.data(), a, a + 2));
    return kTwo ? _mm512_add_epi32(_mm512_slli_epi32(high, 8), _mm512_dpbusd_epi32(zero, wv, two_blocks(x.r.data(), a, a + 2)))
                : high;
  };
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    __m512 acc0[M], acc1[M];
    __m256 mins[M];
    for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps(), mins[m] = _mm256_setzero_ps();
    for (int64_t s = 0; s < S; ++s) {
      const uint8_t* block = super_block<kQ4KBytes>(row, s, ahead);
      __m256 scale, min;
      q4k_scales(block, scale, min);
      __m512 step[M];  // d sc_j xs'_j in lane j < 8
      for (int m = 0; m < M; ++m) {
        const int64_t i = (xrow + m) * B + s * 8;
        step[m] = _mm512_zextps256_ps512(_mm256_mul_ps(scale, _mm256_loadu_ps(x.scale.data() + i)));
        mins[m] = _mm256_fmadd_ps(min, _mm256_loadu_ps(x.sum.data() + i), mins[m]);
      }
      for (int r = 0; r < 2; ++r) {
        const __m512i bytes = _mm512_loadu_si512(block + 16 + 64 * r);
        const __m512i w0 = _mm512_and_si512(bytes, low), w1 = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
        for (int m = 0; m < M; ++m) {
          const int64_t i = (xrow + m) * B + s * 8 + 4 * r;
          acc0[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot(i, w0)), _mm512_permutexvar_ps(pick[2 * r], step[m]), acc0[m]);
          acc1[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot(i + 1, w1)), _mm512_permutexvar_ps(pick[2 * r + 1], step[m]), acc1[m]);
        }
      }
    }
    for (int m = 0; m < M; ++m) y[(xrow + m) * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m])) - hsum(mins[m]);
  }
}

// Q6_K: half h's ql (64 bytes) is one load; its low nibbles are blocks (4h, 4h + 1), its high
// nibbles (4h + 2, 4h + 3), each pair in input order, so x's two blocks are one contiguous load.
// Lane j of a pair's integer dot product covers inputs 4j..4j+3: scale 4 * pair + j / 4 of the half.
template <int M, bool kTwo>
void q6k_rows_wide(const QuantizedX& x, int64_t xrow, int64_t K, const uint8_t* w, float* y, int64_t ldy,
                   int64_t n0, int64_t n1) {
  const int64_t S = K / kSuper, B = K / kBlock;
  const __m512i low = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30), zero = _mm512_setzero_si512();
  const __m512i per16 = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);  // 16-weight group -> block
  __m512i quarter[4];  // pair p of the super-block (blocks 2p, 2p + 1): lane j takes scale 4p + j / 4
  for (int p = 0; p < 4; ++p)
    quarter[p] = _mm512_setr_epi32(4 * p, 4 * p, 4 * p, 4 * p, 4 * p + 1, 4 * p + 1, 4 * p + 1, 4 * p + 1,
                                   4 * p + 2, 4 * p + 2, 4 * p + 2, 4 * p + 2, 4 * p + 3, 4 * p + 3, 4 * p + 3, 4 * p + 3);
  super_block_rows<M, kQ6KBytes>(w, S, n0, n1, _mm512_setzero_ps(),
    [&](int64_t s, const uint8_t* block, __m512* acc0, __m512* acc1) {
      // the 16 scales times d and times x's step of their block: d sc_g xs'_(g / 2), per row of x
      const __m512 scales = _mm512_mul_ps(_mm512_set1_ps(half_to_float(block + 208)),
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 192)))));
      __m512 step[M];
      for (int m = 0; m < M; ++m)
        step[m] = _mm512_mul_ps(scales, _mm512_permutexvar_ps(per16, _mm512_zextps256_ps512(
                                            _mm256_loadu_ps(x.scale.data() + (xrow + m) * B + s * 8))));
      for (int h = 0; h < 2; ++h) {
        const __m512i ql = _mm512_loadu_si512(block + 64 * h);
        const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 128 + 32 * h));
        // top 2 bits of blocks (4h, 4h + 1) are qh's bits (0-1, 2-3), of blocks (4h + 2, 4h + 3) bits (4-5, 6-7)
        const __m512i top01 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_slli_epi16(qh, 4)), _mm256_slli_epi16(qh, 2), 1);
        const __m512i top23 = _mm512_inserti64x4(_mm512_castsi256_si512(qh), _mm256_srli_epi16(qh, 2), 1);
        const __m512i q01 = _mm512_or_si512(_mm512_and_si512(ql, low), _mm512_and_si512(top01, top));
        const __m512i q23 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), low), _mm512_and_si512(top23, top));
        for (int m = 0; m < M; ++m) {
          const int64_t i = (xrow + m) * B + s * 8 + 4 * h;
          const auto dot = [&](int64_t a, __m512i q) {  // blocks a, a + 1 of x against q, the 32 taken off
            const __m512i start = _mm512_srai_epi32(_mm512_loadu_si512(x.offset.data() + a * 8), 2);
            const __m512i xq = _mm512_loadu_si512(x.q.data() + a * kBlock);
            if (!kTwo) return _mm512_dpbusd_epi32(start, q, xq);
            return _mm512_add_epi32(_mm512_slli_epi32(_mm512_dpbusd_epi32(zero, q, xq), 8),
                                    _mm512_dpbusd_epi32(start, q, _mm512_loadu_si512(x.r.data() + a * kBlock)));
          };
          acc0[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot(i, q01)), _mm512_permutexvar_ps(quarter[2 * h], step[m]), acc0[m]);
          acc1[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot(i + 2, q23)), _mm512_permutexvar_ps(quarter[2 * h + 1], step[m]), acc1[m]);
        }
      }
    },
    [&](int64_t n, const __m512* acc0, const __m512* acc1) {
      for (int m = 0; m < M; ++m) y[(xrow + m) * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m]));
    });
}
#else
template <int M, bool kTwo> void q4k_rows_wide(const QuantizedX&, int64_t, int64_t, const uint8_t*, float*, int64_t, int64_t, int64_t) {}
template <int M, bool kTwo> void q6k_rows_wide(const QuantizedX&, int64_t, int64_t, const uint8_t*, float*, int64_t, int64_t, int64_t) {}
#endif

template <bool kQ6, bool kTwo>
void run_kquant(const QuantizedX& xq, int64_t M, int64_t K, int64_t N, const uint8_t* w, float* yp) {
  const int64_t row_bytes = K / kSuper * (kQ6 ? kQ6KBytes : kQ4KBytes);
  over_rows(M, N, row_bytes, [&](auto m, int64_t m0, int64_t n0, int64_t n1) {
    constexpr int kM = decltype(m)::value;
    if constexpr (kQ6 && kWide) q6k_rows_wide<kM, kTwo>(xq, m0, K, w, yp, N, n0, n1);
    else if constexpr (kQ6) q6k_rows<kM, kTwo>(xq, m0, K, w, yp, N, n0, n1);
    else if constexpr (kWide) q4k_rows_wide<kM, kTwo>(xq, m0, K, w, yp, N, n0, n1);
    else q4k_rows<kM, kTwo>(xq, m0, K, w, yp, N, n0, n1);
  });
}

template <bool kQ6>
at::Tensor kquant_linear(const at::Tensor& x, const at::Tensor& w, int64_t digits) {
  check_kquant_args(x, w, digits, kQ6);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const QuantizedX& xq = quantize_x(x.data_ptr<float>(), M, K, kSuper, digits == 2);
  auto y = at::empty({M, N}, x.options());
  if (digits == 2) run_kquant<kQ6, true>(xq, M, K, N, w.data_ptr<uint8_t>(), y.data_ptr<float>());
  else run_kquant<kQ6, false>(xq, M, K, N, w.data_ptr<uint8_t>(), y.data_ptr<float>());
  return y;
}

at::Tensor q4k_linear(const at::Tensor& x, const at::Tensor& w, int64_t digits) { return kquant_linear<false>(x, w, digits); }

at::Tensor q6k_linear(const at::Tensor& x, const at::Tensor& w, int64_t digits) { return kquant_linear<true>(x, w, digits); }

// Dequantisation, for the prefill path (dequantise in row chunks, then one GEMM): the same block
// decoding as the kernels, written out as fp32 (N, K). Bit for bit gguf-py's values: every product
// d * sc * q is exact in fp32 (at most 11 + 7 + 5 significant bits), so the only rounding is Q4_K's
// subtraction of the min, which a fused multiply-subtract rounds exactly as gguf-py does.

// 32 quants (uint8 lanes, in input order) times a per-lane scale pair, minus a min: 32 fp32 out.
// Lanes 0-15 take (scale0, min0), lanes 16-31 (scale1, min1).
inline void dequant32(__m256i q, __m256 scale0, __m256 scale1, __m256 min0, __m256 min1, float* out) {
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int p = 0; p < 4; ++p) {
    const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p]));
    _mm256_storeu_ps(out + 8 * p, _mm256_fmsub_ps(v, p < 2 ? scale0 : scale1, p < 2 ? min0 : min1));
  }
}

void q4k_block_to_float(const uint8_t* block, float* out) {
  __m256 scale, min;
  q4k_scales(block, scale, min);
  alignas(32) float s[8], m[8];
  _mm256_store_ps(s, scale);
  _mm256_store_ps(m, min);
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int r = 0; r < 4; ++r) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 16 + 32 * r));
    for (int j = 2 * r; j < 2 * r + 2; ++j) {  // sub-block 2r in the low nibbles, 2r + 1 in the high
      const __m256i q = _mm256_and_si256(j == 2 * r ? bytes : _mm256_srli_epi16(bytes, 4), low);
      const __m256 sj = _mm256_set1_ps(s[j]), mj = _mm256_set1_ps(m[j]);
      dequant32(q, sj, sj, mj, mj, out + 32 * j);
    }
  }
}

void q6k_block_to_float(const uint8_t* block, float* out) {
  const float d = half_to_float(block + 208);
  const int8_t* sc = reinterpret_cast<const int8_t*>(block + 192);
  const __m256 m32 = _mm256_set1_ps(32.f);  // q - 32 as (q * scale) - 32 * scale: both exact
  for (int h = 0; h < 2; ++h) {
    __m256i q[4];
    q6k_quants(block, h, q);
    for (int k = 0; k < 4; ++k) {
      const int b = 4 * h + k;
      const __m256 s0 = _mm256_set1_ps(d * sc[2 * b]), s1 = _mm256_set1_ps(d * sc[2 * b + 1]);
      dequant32(q[k], s0, s1, _mm256_mul_ps(s0, m32), _mm256_mul_ps(s1, m32), out + 32 * b);
    }
  }
}

template <bool kQ6>
at::Tensor kquant_dequantize(const at::Tensor& w) {
  const int64_t bytes = kQ6 ? kQ6KBytes : kQ4KBytes;
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.dim() == 2 && w.size(1) % bytes == 0,
              "weight must be contiguous uint8 (N, K / 256 * ", bytes, "): the GGUF's ", kQ6 ? "Q6_K" : "Q4_K", " rows");
  const int64_t N = w.size(0), S = w.size(1) / bytes, K = S * kSuper;
  auto out = at::empty({N, K}, w.options().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N * S, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {  // block b of the (N, S) blocks: row b / S, weights 256 (b % S) on
      if constexpr (kQ6) q6k_block_to_float(wp + b * bytes, op + b * kSuper);
      else q4k_block_to_float(wp + b * bytes, op + b * kSuper);
    }
  });
  return out;
}

at::Tensor q4k_dequantize(const at::Tensor& w) { return kquant_dequantize<false>(w); }

at::Tensor q6k_dequantize(const at::Tensor& w) { return kquant_dequantize<true>(w); }

// Which of the code paths above this build compiled (tests and benchmarks say which kernels they ran).
std::string vector_isa() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  return "avx512-vnni";
#elif defined(__AVXVNNI__)
  return "avx-vnni";
#else
  return "avx2";
#endif
}

// The layouts the native decode block computes (layer_kinds.h), each called as its QuantLinear calls its op.
const bool kLayoutsRegistered =
    qwen2::register_layer_kind(1, "int4", [](const at::Tensor& x, const qwen2::LayerArgs& w) {
      return int4_linear(x, *w.a, *w.b, *w.c, w.group_size, w.digits);
    }) &&
    qwen2::register_layer_kind(2, "int8", [](const at::Tensor& x, const qwen2::LayerArgs& w) {
      return int8_linear(x, *w.a, *w.b, w.group_size, w.digits);
    }) &&
    qwen2::register_layer_kind(3, "q4_k", [](const at::Tensor& x, const qwen2::LayerArgs& w) {
      return q4k_linear(x, *w.a, w.digits);
    }) &&
    qwen2::register_layer_kind(4, "q6_k", [](const at::Tensor& x, const qwen2::LayerArgs& w) {
      return q6k_linear(x, *w.a, w.digits);
    });

}  // namespace

TORCH_LIBRARY(qwen2_kernels, m) {
  m.def("int4_linear(Tensor x, Tensor q, Tensor scale, Tensor min, int group_size, int digits) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor q, Tensor scale, int group_size, int digits) -> Tensor");
  m.def("q4k_linear(Tensor x, Tensor w, int digits) -> Tensor");
  m.def("q6k_linear(Tensor x, Tensor w, int digits) -> Tensor");
  m.def("q4k_dequantize(Tensor w) -> Tensor");
  m.def("q6k_dequantize(Tensor w) -> Tensor");
  m.def("vector_isa() -> str", &vector_isa);  // no tensors to dispatch on: one kernel for every backend
}

TORCH_LIBRARY_IMPL(qwen2_kernels, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("q4k_linear", &q4k_linear);
  m.impl("q6k_linear", &q6k_linear);
  m.impl("q4k_dequantize", &q4k_dequantize);
  m.impl("q6k_dequantize", &q6k_dequantize);
}
