// AVX-512 register kernels and packing for blocked_dots.h.
//
// uint8: vpdpbusd multiplies unsigned by signed bytes and sums groups of four into int32
// lanes without saturation, 64 exact multiply-adds per instruction. Queries stay uint8 (the
// unsigned operand); refs are packed as y - 128 (signed), so a tile holds x.y - 128 sum x,
// exact while d * 255 * 128 < 2^31.
// float32: one FMA per feature, the same 8 x 48 register tile.
// bfloat16 (AVX-512 BF16): vdpbf16ps does two multiply-adds per float32 lane, so each step
// consumes a pair of features; the operands are packed by blocked_dots_bf16.cpp.
// Accumulators are named variables, not an array: GCC keeps all 24 in registers then.
#include <algorithm>
#include <cstring>

#include "common/cpu_features.h"
#include "knn/cpu/blocked_dots.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define DIFFMEM_X86 1
#endif

namespace diffmem::knn::blocked {

namespace {
inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
}  // namespace

void pack_refs(const uint8_t* Y, int64_t N, int64_t d, int64_t groups, int64_t r0, int8_t* out) {
  constexpr int64_t F = 256;  // features per buffered slice (64 groups)
  alignas(64) uint32_t tmp[NR][F / 4];
  std::memset(out, 0, static_cast<size_t>(groups * NR * 4));
  const int64_t rows = std::min<int64_t>(NR, N - r0);
  for (int64_t f0 = 0; f0 < d; f0 += F) {
    const int64_t fn = std::min<int64_t>(F, d - f0), gn = (fn + 3) / 4;
    for (int64_t r = 0; r < rows; ++r) {
      tmp[r][gn - 1] = 0x80808080u;  // a partial last group: missing bytes become signed 0
      std::memcpy(tmp[r], Y + (r0 + r) * d + f0, static_cast<size_t>(fn));
    }
    uint32_t* dst = reinterpret_cast<uint32_t*>(out) + (f0 / 4) * NR;
    for (int64_t g = 0; g < gn; ++g)
      for (int64_t r = 0; r < rows; ++r) dst[g * NR + r] = tmp[r][g] ^ 0x80808080u;  // y - 128 flips the top bit
  }
}

void pack_refs(const float* Y, int64_t N, int64_t d, int64_t, int64_t r0, float* out) {
  pack_rows_transposed(Y, N, d, r0, out, [](float v) { return v; });
}

void pack_queries(const uint8_t* X, int64_t Q, int64_t d, int64_t groups, int64_t q0, uint8_t* out) {
  std::memset(out, 0, static_cast<size_t>(groups * MR * 4));
  const int64_t rows = std::min<int64_t>(MR, Q - q0);
  for (int64_t i = 0; i < rows; ++i) {
    const uint8_t* src = X + (q0 + i) * d;
    for (int64_t f = 0; f < d; f += 4)
      std::memcpy(out + ((f >> 2) * MR + i) * 4, src + f, static_cast<size_t>(std::min<int64_t>(4, d - f)));
  }
}

void pack_queries(const float* X, int64_t Q, int64_t d, int64_t groups, int64_t q0, float* out) {
  std::fill(out, out + groups * MR, 0.0f);
  const int64_t rows = std::min<int64_t>(MR, Q - q0);
  for (int64_t f = 0; f < d; ++f)
    for (int64_t i = 0; i < rows; ++i) out[f * MR + i] = X[(q0 + i) * d + f];
}

#ifdef DIFFMEM_X86

#define DIFFMEM_FOR_ROWS(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7)

__attribute__((target("avx512f,avx512bw,avx512vnni"))) void micro_u8(const uint8_t* a, const int8_t* b,
                                                                     int64_t groups, int32_t* c, int64_t ldc,
                                                                     bool accumulate) {
#define INIT(i)                                                                                      \
  __m512i c##i##0 = accumulate ? _mm512_loadu_si512(c + (i) * ldc) : _mm512_setzero_si512();         \
  __m512i c##i##1 = accumulate ? _mm512_loadu_si512(c + (i) * ldc + 16) : _mm512_setzero_si512();    \
  __m512i c##i##2 = accumulate ? _mm512_loadu_si512(c + (i) * ldc + 32) : _mm512_setzero_si512();
  DIFFMEM_FOR_ROWS(INIT)
#undef INIT
  for (int64_t g = 0; g < groups; ++g, a += MR * 4, b += NR * 4) {
    const __m512i b0 = _mm512_loadu_si512(b), b1 = _mm512_loadu_si512(b + 64), b2 = _mm512_loadu_si512(b + 128);
#define STEP(i)                                                 \
  {                                                             \
    const __m512i x = _mm512_set1_epi32(load_i32(a + 4 * (i))); \
    c##i##0 = _mm512_dpbusd_epi32(c##i##0, x, b0);              \
    c##i##1 = _mm512_dpbusd_epi32(c##i##1, x, b1);              \
    c##i##2 = _mm512_dpbusd_epi32(c##i##2, x, b2);              \
  }
    DIFFMEM_FOR_ROWS(STEP)
#undef STEP
  }
#define STORE(i)                                     \
  _mm512_storeu_si512(c + (i) * ldc, c##i##0);      \
  _mm512_storeu_si512(c + (i) * ldc + 16, c##i##1); \
  _mm512_storeu_si512(c + (i) * ldc + 32, c##i##2);
  DIFFMEM_FOR_ROWS(STORE)
#undef STORE
}

// The float32 accumulator tile of micro_f32 and micro_bf16_avx512: 24 named registers.
#define DIFFMEM_F32_TILE_INIT(i)                                                             \
  __m512 c##i##0 = accumulate ? _mm512_loadu_ps(c + (i) * ldc) : _mm512_setzero_ps();        \
  __m512 c##i##1 = accumulate ? _mm512_loadu_ps(c + (i) * ldc + 16) : _mm512_setzero_ps();   \
  __m512 c##i##2 = accumulate ? _mm512_loadu_ps(c + (i) * ldc + 32) : _mm512_setzero_ps();
#define DIFFMEM_F32_TILE_STORE(i)                 \
  _mm512_storeu_ps(c + (i) * ldc, c##i##0);      \
  _mm512_storeu_ps(c + (i) * ldc + 16, c##i##1); \
  _mm512_storeu_ps(c + (i) * ldc + 32, c##i##2);

__attribute__((target("avx512f"))) void micro_f32(const float* a, const float* b, int64_t groups, float* c,
                                                  int64_t ldc, bool accumulate) {
  DIFFMEM_FOR_ROWS(DIFFMEM_F32_TILE_INIT)
  for (int64_t g = 0; g < groups; ++g, a += MR, b += NR) {
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16), b2 = _mm512_loadu_ps(b + 32);
#define STEP(i)                                  \
  {                                              \
    const __m512 x = _mm512_set1_ps(a[i]);       \
    c##i##0 = _mm512_fmadd_ps(x, b0, c##i##0);   \
    c##i##1 = _mm512_fmadd_ps(x, b1, c##i##1);   \
    c##i##2 = _mm512_fmadd_ps(x, b2, c##i##2);   \
  }
    DIFFMEM_FOR_ROWS(STEP)
#undef STEP
  }
  DIFFMEM_FOR_ROWS(DIFFMEM_F32_TILE_STORE)
}

__attribute__((target("avx512f,avx512bf16"))) void micro_bf16_avx512(const uint16_t* a, const uint16_t* b,
                                                                     int64_t groups, float* c, int64_t ldc,
                                                                     bool accumulate) {
  DIFFMEM_FOR_ROWS(DIFFMEM_F32_TILE_INIT)
  for (int64_t g = 0; g < groups; ++g, a += MR * 2, b += NR * 2) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + 32),
                   b2 = (__m512bh)_mm512_loadu_si512(b + 64);
#define STEP(i)                                                            \
  {                                                                        \
    const __m512bh x = (__m512bh)_mm512_set1_epi32(load_i32(a + 2 * (i))); \
    c##i##0 = _mm512_dpbf16_ps(c##i##0, x, b0);                            \
    c##i##1 = _mm512_dpbf16_ps(c##i##1, x, b1);                            \
    c##i##2 = _mm512_dpbf16_ps(c##i##2, x, b2);                            \
  }
    DIFFMEM_FOR_ROWS(STEP)
#undef STEP
  }
  DIFFMEM_FOR_ROWS(DIFFMEM_F32_TILE_STORE)
}

#undef DIFFMEM_F32_TILE_INIT
#undef DIFFMEM_F32_TILE_STORE
#undef DIFFMEM_FOR_ROWS


#else  // not x86-64: never called, the dispatchers check common::use_avx512_*() first

void micro_u8(const uint8_t*, const int8_t*, int64_t, int32_t*, int64_t, bool) {}
void micro_f32(const float*, const float*, int64_t, float*, int64_t, bool) {}
void micro_bf16_avx512(const uint16_t*, const uint16_t*, int64_t, float*, int64_t, bool) {}

#endif

}  // namespace diffmem::knn::blocked
