// The CPU's float32 multiply-add peak: 12 independent FMA chains per thread (enough to
// cover the FMA latency on x86-64 cores) on 8-lane AVX2 or 16-lane AVX-512 vectors, in
// 1 to `threads` threads, best of three runs each. Prints one JSON line of GMAC/s.
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

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  const bool avx512 = argc > 2 && std::strcmp(argv[2], "avx512") == 0;
  const int lanes = avx512 ? 16 : 8;
  std::printf("{\"lanes\": %d", lanes);
  for (int t = 1; t <= threads; ++t) {
    double best = 0;
    for (int rep = 0; rep < 3; ++rep) {  // best of three: other load only ever slows it
      double sink = 0;
      const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(t) reduction(+ : sink)
      sink += avx512 ? chains16() : chains8();
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double gmacs = t * kIters * 12.0 * lanes / dt / 1e9;
      if (gmacs > best && sink != 0) best = gmacs;
    }
    std::printf(", \"gmacs_%dt\": %.2f", t, best);
  }
  std::printf("}\n");
  return 0;
}
