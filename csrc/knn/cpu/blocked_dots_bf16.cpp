// bfloat16 screening operands for float search (blocked_dots.h): rows are centred by a
// per-feature shift mu (distances do not change, norms shrink, so the rounding bound does),
// rounded to bfloat16, and multiplied by AVX-512 BF16's vdpbf16ps, which does two
// multiply-adds per 32-bit lane: twice the float32 FMA rate. Its products are only
// candidates: knn_float.cpp bounds their error from the row statistics computed here and
// re-ranks exactly.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/cpu_features.h"
#include "knn/cpu/blocked_dots.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define DIFFMEM_X86 1
#define DIFFMEM_TARGET_CLONES __attribute__((target_clones("avx512f", "default")))
#else
#define DIFFMEM_TARGET_CLONES
#endif

namespace diffmem::knn::blocked {

namespace {

// The operand of one element: bf16(fl32(fl32(v) - mu)) (for float rows, fl32(v) = v).
template <typename T>
inline uint16_t operand_bf16(T v, float mu) {
  return to_bf16(static_cast<float>(v) - mu);
}

// operand_bf16 of v[f] for f < n, zero-padded to an even count.
template <typename T>
inline void centred_bf16_impl(const T* v, const float* mu, int64_t n, uint16_t* out) {
  for (int64_t f = 0; f < n; ++f) out[f] = operand_bf16(v[f], mu[f]);
  if (n & 1) out[n] = 0;
}
// Cloned for AVX-512 and for any x86-64 (the bfloat16 screen can be forced onto any CPU).
DIFFMEM_TARGET_CLONES void centred_bf16(const float* v, const float* mu, int64_t n, uint16_t* out) {
  centred_bf16_impl(v, mu, n, out);
}
DIFFMEM_TARGET_CLONES void centred_bf16(const double* v, const float* mu, int64_t n, uint16_t* out) {
  centred_bf16_impl(v, mu, n, out);
}

template <typename T>
void pack_refs_bf16_impl(const T* Y, int64_t N, int64_t d, const float* mu, int64_t r0, uint16_t* out) {
  constexpr int64_t F = 256;  // features per buffered slice (128 pairs)
  alignas(64) uint32_t tmp[NR][F / 2];
  const int64_t pairs = (d + 1) / 2;
  std::memset(out, 0, static_cast<size_t>(pairs * NR * 4));
  const int64_t rows = std::min<int64_t>(NR, N - r0);
  uint32_t* dst0 = reinterpret_cast<uint32_t*>(out);
  for (int64_t f0 = 0; f0 < d; f0 += F) {
    const int64_t fn = std::min<int64_t>(F, d - f0), pn = (fn + 1) / 2;
    for (int64_t r = 0; r < rows; ++r)
      centred_bf16(Y + (r0 + r) * d + f0, mu + f0, fn, reinterpret_cast<uint16_t*>(tmp[r]));
    uint32_t* dst = dst0 + (f0 / 2) * NR;
    for (int64_t p = 0; p < pn; ++p)
      for (int64_t r = 0; r < rows; ++r) dst[p * NR + r] = tmp[r][p];
  }
}

template <typename T>
void pack_queries_bf16_impl(const T* X, int64_t Q, int64_t d, const float* mu, int64_t q0, uint16_t* out) {
  const int64_t pairs = (d + 1) / 2;
  std::memset(out, 0, static_cast<size_t>(pairs * MR * 4));
  const int64_t rows = std::min<int64_t>(MR, Q - q0);
  alignas(64) uint32_t row_pairs[128];
  uint32_t* dst = reinterpret_cast<uint32_t*>(out);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t f0 = 0; f0 < d; f0 += 256) {
      const int64_t fn = std::min<int64_t>(256, d - f0), pn = (fn + 1) / 2;
      centred_bf16(X + (q0 + i) * d + f0, mu + f0, fn, reinterpret_cast<uint16_t*>(row_pairs));
      for (int64_t p = 0; p < pn; ++p) dst[(f0 / 2 + p) * MR + i] = row_pairs[p];
    }
}

// Per row, in float64: ||v - mu||^2, ||h|| and ||(v - mu) - h|| for h the row's bfloat16
// operand exactly as packed (operand_bf16, here on 16 lanes at a time with AVX-512).
struct StatSums {
  double sq = 0, h = 0, e = 0;
  template <typename T>
  void add(T v, float mu) {
    const double c = static_cast<double>(v) - static_cast<double>(mu);
    const double hv = static_cast<double>(from_bf16(operand_bf16(v, mu)));
    sq += c * c;
    h += hv * hv;
    e += (c - hv) * (c - hv);
  }
};

#ifdef DIFFMEM_X86
// to_bf16 on 16 lanes, as float32 bit patterns (the bfloat16 in the top half).
__attribute__((target("avx512f"))) inline __m512i bf16_bits16(__m512 c) {
  const __m512i b = _mm512_castps_si512(c);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb);
  r = _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __mmask16 normal = _mm512_test_epi32_mask(r, _mm512_set1_epi32(0x7F800000));
  return _mm512_mask_mov_epi32(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0x80000000u))), normal, r);
}

__attribute__((target("avx512f"))) inline __m256 half8(__m512 v, int half) {
  return half ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)) : _mm512_castps512_ps256(v);
}

// 16 elements of a row: as float32 (what the operand rounds) and as two float64 halves.
__attribute__((target("avx512f"))) inline void load16(const float* v, __m512& f32, __m512d& lo, __m512d& hi) {
  f32 = _mm512_loadu_ps(v);
  lo = _mm512_cvtps_pd(half8(f32, 0));
  hi = _mm512_cvtps_pd(half8(f32, 1));
}
__attribute__((target("avx512f"))) inline void load16(const double* v, __m512& f32, __m512d& lo, __m512d& hi) {
  lo = _mm512_loadu_pd(v);
  hi = _mm512_loadu_pd(v + 8);
  f32 = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm512_cvtpd_ps(lo))),
                                            _mm256_castps_pd(_mm512_cvtpd_ps(hi)), 1));
}

template <typename T>
__attribute__((target("avx512f"))) int64_t stats16(const T* v, const float* mu, int64_t d, StatSums& out) {
  __m512d sq = _mm512_setzero_pd(), hh = _mm512_setzero_pd(), ee = _mm512_setzero_pd();
  int64_t f = 0;
  for (; f + 16 <= d; f += 16) {
    __m512 x;
    __m512d xd[2];
    load16(v + f, x, xd[0], xd[1]);
    const __m512 m = _mm512_loadu_ps(mu + f);
    const __m512 h = _mm512_castsi512_ps(bf16_bits16(_mm512_sub_ps(x, m)));
    for (int half = 0; half < 2; ++half) {
      const __m512d c = _mm512_sub_pd(xd[half], _mm512_cvtps_pd(half8(m, half)));
      const __m512d hd = _mm512_cvtps_pd(half8(h, half)), e = _mm512_sub_pd(c, hd);
      sq = _mm512_fmadd_pd(c, c, sq);
      hh = _mm512_fmadd_pd(hd, hd, hh);
      ee = _mm512_fmadd_pd(e, e, ee);
    }
  }
  out.sq += _mm512_reduce_add_pd(sq);
  out.h += _mm512_reduce_add_pd(hh);
  out.e += _mm512_reduce_add_pd(ee);
  return f;
}
#endif

template <typename T>
void bf16_row_stats_impl(const T* V, int64_t rows, int64_t d, const float* mu, double* sq, double* rounded_norm,
                         double* err_norm) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* v = V + r * d;
    StatSums s;
    int64_t f = 0;
#ifdef DIFFMEM_X86
    if (common::use_avx512f()) f = stats16(v, mu, d, s);
#endif
    for (; f < d; ++f) s.add(v[f], mu[f]);
    sq[r] = s.sq;
    rounded_norm[r] = std::sqrt(s.h);
    err_norm[r] = std::sqrt(s.e);
  }
}

}  // namespace

void pack_refs_bf16(const float* Y, int64_t N, int64_t d, const float* mu, int64_t r0, uint16_t* out) {
  pack_refs_bf16_impl(Y, N, d, mu, r0, out);
}
void pack_refs_bf16(const double* Y, int64_t N, int64_t d, const float* mu, int64_t r0, uint16_t* out) {
  pack_refs_bf16_impl(Y, N, d, mu, r0, out);
}
void pack_queries_bf16(const float* X, int64_t Q, int64_t d, const float* mu, int64_t q0, uint16_t* out) {
  pack_queries_bf16_impl(X, Q, d, mu, q0, out);
}
void pack_queries_bf16(const double* X, int64_t Q, int64_t d, const float* mu, int64_t q0, uint16_t* out) {
  pack_queries_bf16_impl(X, Q, d, mu, q0, out);
}
void bf16_row_stats(const float* V, int64_t rows, int64_t d, const float* mu, double* sq, double* rounded_norm,
                    double* err_norm) {
  bf16_row_stats_impl(V, rows, d, mu, sq, rounded_norm, err_norm);
}
void bf16_row_stats(const double* V, int64_t rows, int64_t d, const float* mu, double* sq, double* rounded_norm,
                    double* err_norm) {
  bf16_row_stats_impl(V, rows, d, mu, sq, rounded_norm, err_norm);
}

namespace {
// The products of micro_bf16_avx512 without AVX-512 BF16, for tests on any CPU (DIFFMEM_CPU_KERNEL=bf16-emulated): each bfloat16 product is
// exact in float32, and each lane adds its products one at a time (within the bound's d
// roundings), keeping subnormals where the instruction flushes them (also within it).
void micro_bf16_portable(const uint16_t* a, const uint16_t* b, int64_t groups, float* c, int64_t ldc,
                         bool accumulate) {
  for (int64_t i = 0; i < MR; ++i)
    for (int64_t j = 0; j < NR; ++j) {
      float acc = accumulate ? c[i * ldc + j] : 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        const uint16_t* ap = a + (g * MR + i) * 2;
        const uint16_t* bp = b + (g * NR + j) * 2;
        acc += from_bf16(ap[0]) * from_bf16(bp[0]);
        acc += from_bf16(ap[1]) * from_bf16(bp[1]);
      }
      c[i * ldc + j] = acc;
    }
}
}  // namespace

MicroBf16 micro_bf16(bool emulate) {
#ifdef DIFFMEM_X86
  if (common::has_avx512_bf16() && !emulate) return micro_bf16_avx512;
#endif
  return micro_bf16_portable;
}

}  // namespace diffmem::knn::blocked
