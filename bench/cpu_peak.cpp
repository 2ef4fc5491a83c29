// The CPU's float32 multiply-add peak: 12 independent FMA chains per thread (enough to
// cover the FMA latency on x86-64 cores) on 8-lane AVX2 or 16-lane AVX-512 vectors, or
// chains of AVX-512 BF16 vdpbf16ps (two bfloat16 multiply-adds a lane), in 1 to `threads`
// threads, best of three runs each. Prints one JSON line of GMAC/s.
// Built and run by bench/cpu_peak.py.
#include <immintrin.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

constexpr long kIters = 100000000;

#define DIFFMEM_CHAINS(V, SET, FMA, FIRST)                                  \
  V a[12];                                                                  \
  for (int i = 0; i < 12; ++i) a[i] = SET(1.0f + i * 1e-6f);                \
  const V m = SET(0.999999f), c = SET(1e-6f);                               \
  for (long it = 0; it < kIters; ++it) _Pragma("GCC unroll 12")            \
    for (int i = 0; i < 12; ++i) a[i] = FMA(a[i], m, c);                    \
  double s = 0;                                                             \
  for (int i = 0; i < 12; ++i) s += FIRST(a[i]);                            \
  return s;

__attribute__((target("avx2,fma"))) double chains8() {
  DIFFMEM_CHAINS(__m256, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_cvtss_f32)
}
__attribute__((target("avx512f"))) double chains16() {
  DIFFMEM_CHAINS(__m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_cvtss_f32)
}

// a += x.y over bfloat16 pairs; x = y = 2^-10, so the sums stay small and exact enough.
__attribute__((target("avx512f,avx512bf16"))) double chains_bf16() {
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(i * 1e-6f);
  const __m512bh x = (__m512bh)_mm512_set1_epi16(0x3A80);
  for (long it = 0; it < kIters; ++it) _Pragma("GCC unroll 12")
    for (int i = 0; i < 12; ++i) a[i] = _mm512_dpbf16_ps(a[i], x, x);
  double s = 0;
  for (int i = 0; i < 12; ++i) s += _mm512_cvtss_f32(a[i]);
  return s;
}

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  const char* isa = argc > 2 ? argv[2] : "avx2";
  const bool bf16 = std::strcmp(isa, "avx512bf16") == 0, avx512 = bf16 || std::strcmp(isa, "avx512") == 0;
  const int lanes = avx512 ? 16 : 8, macs_per_lane = bf16 ? 2 : 1;
  std::printf("{\"isa\": \"%s\", \"lanes\": %d, \"macs_per_lane\": %d", bf16 ? "avx512bf16" : avx512 ? "avx512" : "avx2",
              lanes, macs_per_lane);
  for (int t = 1; t <= threads; ++t) {
    double best = 0;
    for (int rep = 0; rep < 3; ++rep) {  // best of three: other load only ever slows it
      double sink = 0;
      const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(t) reduction(+ : sink)
      sink += bf16 ? chains_bf16() : avx512 ? chains16() : chains8();
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double gmacs = t * kIters * 12.0 * lanes * macs_per_lane / dt / 1e9;
      if (gmacs > best && sink != 0) best = gmacs;
    }
    std::printf(", \"gmacs_%dt\": %.2f", t, best);
  }
  std::printf("}\n");
  return 0;
}
