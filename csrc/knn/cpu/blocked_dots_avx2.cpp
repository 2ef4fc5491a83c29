// The AVX2 + FMA uint8 register kernel and its centred packing for blocked_dots.h.
//
// uint8 pixels are centred floats here (x - 128, y - 128): AVX2's integer multiply-add
// peaks at about 2/3 of the float32 FMA rate, and a slice's float32 sums are exact integers.
// Sixteen 8-lane registers hold a 4 x 24 sub-tile (12 accumulators, 3 ref vectors and a
// broadcast query value), so the 8 x 48 tile is computed in four passes over the feature
// slice, which stays in L1; 12 FMAs per 3 loads and 4 broadcasts keep both FMA ports busy.
#include <algorithm>
#include <cstring>

#include "knn/cpu/blocked_dots.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define DIFFMEM_X86 1
#endif

namespace diffmem::knn::blocked {

static_assert(MR % 4 == 0 && NR % 24 == 0, "the AVX2 sub-tile is 4 x 24");
static_assert(kGroups * 128 * 128 <= (1 << 24), "a slice's uint8 dot products must stay exact in float32");

void pack_refs_centred(const uint8_t* Y, int64_t N, int64_t d, int64_t r0, float* out) {
  pack_rows_transposed(Y, N, d, r0, out, [](uint8_t v) { return static_cast<float>(int(v) - 128); });
}

void pack_queries_centred(const uint8_t* X, int64_t Q, int64_t d, int64_t q0, float* out) {
  std::fill(out, out + d * MR, 0.0f);
  const int64_t rows = std::min<int64_t>(MR, Q - q0);
  for (int64_t f = 0; f < d; ++f)
    for (int64_t i = 0; i < rows; ++i) out[f * MR + i] = static_cast<float>(int(X[(q0 + i) * d + f]) - 128);
}

#ifdef DIFFMEM_X86

#define DIFFMEM_FOR_ROWS(M) M(0) M(1) M(2) M(3)

// For each 4 x 24 sub-tile (rows r0.., columns c0..): float32 sums over the slice, from zero
// (each stays an integer below 2^24: exact), then converted exactly and added into the int32
// block accumulators c. Accumulators are named variables: GCC keeps all 12 in registers.
__attribute__((target("avx2,fma"))) void micro_u8f32_avx2(const float* a, const float* b, int64_t groups,
                                                          int32_t* c, int64_t ldc, bool accumulate) {
  for (int64_t r0 = 0; r0 < MR; r0 += 4)
    for (int64_t c0 = 0; c0 < NR; c0 += 24) {
#define INIT(i) __m256 s##i##0 = _mm256_setzero_ps(), s##i##1 = _mm256_setzero_ps(), s##i##2 = _mm256_setzero_ps();
      DIFFMEM_FOR_ROWS(INIT)
#undef INIT
      const float* ap = a + r0;
      const float* bp = b + c0;
      for (int64_t g = 0; g < groups; ++g, ap += MR, bp += NR) {
        const __m256 b0 = _mm256_loadu_ps(bp), b1 = _mm256_loadu_ps(bp + 8), b2 = _mm256_loadu_ps(bp + 16);
#define STEP(i)                                     \
  {                                                 \
    const __m256 x = _mm256_broadcast_ss(ap + (i)); \
    s##i##0 = _mm256_fmadd_ps(x, b0, s##i##0);      \
    s##i##1 = _mm256_fmadd_ps(x, b1, s##i##1);      \
    s##i##2 = _mm256_fmadd_ps(x, b2, s##i##2);      \
  }
        DIFFMEM_FOR_ROWS(STEP)
#undef STEP
      }
#define ADD(p, v)                                                                                      \
  {                                                                                                    \
    __m256i iv = _mm256_cvtps_epi32(v);                                                                \
    if (accumulate) iv = _mm256_add_epi32(iv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); \
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), iv);                                            \
  }
#define STORE(i)                                \
  {                                             \
    int32_t* row = c + (r0 + (i)) * ldc + c0;  \
    ADD(row, s##i##0) ADD(row + 8, s##i##1) ADD(row + 16, s##i##2) \
  }
      DIFFMEM_FOR_ROWS(STORE)
#undef STORE
#undef ADD
    }
}

#undef DIFFMEM_FOR_ROWS

#else  // not x86-64: never called, the dispatchers check common::use_avx2_fma() first

void micro_u8f32_avx2(const float*, const float*, int64_t, int32_t*, int64_t, bool) {}

#endif

}  // namespace diffmem::knn::blocked
