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

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int kBlock = 32;   // activation quantisation block
constexpr int kMaxRows = 4;  // rows of x that share one pass over the weights
constexpr int kPrefetchRows = 4;

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

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float out = hsum(acc);
  for (; i < n; ++i) out += a[i] * b[i];
  return out;
}

// The 32 int4 weights of one block as 32 bytes in input order.
inline __m256i unpack_int4(const uint8_t* p) {
  const __m128i low = _mm_set1_epi8(0x0F);
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), low), _mm_and_si128(b, low));
}

template <bool kInt4>
inline __m256i load_block(const uint8_t* row, int64_t b) {
  return kInt4 ? unpack_int4(row + b * 16) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * 32));
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

const QuantizedX& quantize_x(const float* x, int64_t M, int64_t K, int64_t group_size, bool two_digits) {
  static thread_local QuantizedX r;
  const int64_t B = K / kBlock;
  r.q.resize(M * K);
  r.r.resize(M * K);
  r.scale.resize(M * B);
  r.sum.resize(M * B);
  r.offset.assign(M * B * 8, 0);
  r.group.resize(B);
  for (int64_t b = 0; b < B; ++b) r.group[b] = static_cast<int32_t>(b * kBlock / group_size);
  for (int64_t i = 0; i < M * B; ++i) {
    const float* xb = x + i * kBlock;
    float amax = 0.f, sum = 0.f;
    for (int k = 0; k < kBlock; ++k) amax = std::max(amax, std::fabs(xb[k])), sum += xb[k];
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int k = 0; k < kBlock; ++k) {
      const float t = xb[k] * inv;
      const float q = std::nearbyint(t);
      const int rest = two_digits ? static_cast<int>(std::min(127.f, std::max(-127.f, std::nearbyint((t - q) * 256.f)))) : 0;
      r.q[i * kBlock + k] = static_cast<int8_t>(q);
      r.r[i * kBlock + k] = static_cast<int8_t>(rest);
      r.offset[i * 8 + k / 4] -= 128 * (two_digits ? 256 * static_cast<int>(q) + rest : static_cast<int>(q));
    }
    r.scale[i] = two_digits ? amax / 127.f / 256.f : amax / 127.f;
    r.sum[i] = sum;
  }
  return r;
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

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

// Output rows [n0, n1) for M (<= kMaxRows) rows of x.

template <int M, bool kInt4, bool kTwo, typename S>
void rows(const QuantizedX& x, int64_t xrow, int64_t K, const uint8_t* q, const S* scale,
          const S* min, int64_t group_size, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t B = K / kBlock, G = K / group_size, per_group = group_size / kBlock;
  const int64_t row_bytes = kInt4 ? K / 2 : K;
  // int4: per row m of x and group g of weights, the sum of x over g (for the min term)
  float group_sum[M][kInt4 ? G : 1];
  for (int m = 0; kInt4 && m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float part = 0.f;
      for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) part += x.sum[(xrow + m) * B + b];
      group_sum[m][g] = part;
    }
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qn = q + n * row_bytes;
    const S* sn = scale + n * G;
    float sf[G], mf[G];  // this row's scales (and mins) as fp32
    for (int64_t g = 0; g < G; ++g) sf[g] = to_float(sn[g]), mf[g] = kInt4 ? to_float(min[n * G + g]) : 0.f;
    // a few rows ahead: a thread works on one row at a time, too little for the hardware prefetcher
    for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(reinterpret_cast<const char*>(qn + kPrefetchRows * row_bytes + off), _MM_HINT_T0);
    for (int64_t off = 0; off < G * int64_t(sizeof(S)); off += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(sn + kPrefetchRows * G) + off, _MM_HINT_T0);
      if (kInt4) _mm_prefetch(reinterpret_cast<const char*>(min + (n + kPrefetchRows) * G) + off, _MM_HINT_T0);
    }
    __m256 acc0[M], acc1[M];  // two accumulators, even and odd blocks, so FMAs do not wait on each other
    for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < B; b += 2) {
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

template <bool kInt4, bool kTwo, typename S>
void run(const QuantizedX& xq, int64_t M, int64_t K, int64_t N, const at::Tensor& q, const at::Tensor& scale,
         const at::Tensor* min, int64_t group_size, float* yp) {
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const S* sp = scale.data_ptr<S>();
  const S* mp = kInt4 ? min->data_ptr<S>() : nullptr;
  // at least ~64 KB of weights per thread: below that, waking the second thread costs more than it saves
  const int64_t grain = std::max<int64_t>(16, (64 << 10) / q.size(1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      switch (std::min<int64_t>(kMaxRows, M - m0)) {
        case 1: rows<1, kInt4, kTwo, S>(xq, m0, K, qp, sp, mp, group_size, yp, N, n0, n1); break;
        case 2: rows<2, kInt4, kTwo, S>(xq, m0, K, qp, sp, mp, group_size, yp, N, n0, n1); break;
        case 3: rows<3, kInt4, kTwo, S>(xq, m0, K, qp, sp, mp, group_size, yp, N, n0, n1); break;
        default: rows<4, kInt4, kTwo, S>(xq, m0, K, qp, sp, mp, group_size, yp, N, n0, n1); break;
      }
    }
  });
}

template <bool kInt4>
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor* min,
                        int64_t group_size, int64_t digits) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 (M, K)");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(K % (2 * kBlock) == 0 && group_size % kBlock == 0 && K % group_size == 0,
              "K must be a multiple of 64, group_size a multiple of 32 dividing K");
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous() && q.dim() == 2 && q.size(1) == (kInt4 ? K / 2 : K),
              "weight must be contiguous uint8 (N, ", kInt4 ? K / 2 : K, ")");
  const auto stype = scale.scalar_type();
  TORCH_CHECK((stype == at::kFloat || stype == at::kBFloat16) && scale.is_contiguous() && scale.numel() == N * (K / group_size),
              "scale must be contiguous fp32 or bf16 (N, K / group_size)");
  TORCH_CHECK(!kInt4 || (min->scalar_type() == stype && min->is_contiguous() && min->numel() == scale.numel()),
              "min must be like scale");
  TORCH_CHECK(digits == 1 || digits == 2, "digits must be 1 or 2");
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

}  // namespace

TORCH_LIBRARY(qwen2_kernels, m) {
  m.def("int4_linear(Tensor x, Tensor q, Tensor scale, Tensor min, int group_size, int digits) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor q, Tensor scale, int group_size, int digits) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwen2_kernels, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
}
