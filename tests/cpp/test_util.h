// Shared by the C++ tests: a pass/fail tally and a deterministic random generator.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>

namespace diffmem_test {

inline int g_passed = 0, g_failed = 0;

inline void report(bool ok, const std::string& name, const std::string& why = "") {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL %s: %s\n", name.c_str(), why.c_str());
  }
}

struct Rng {
  uint64_t s;
  uint64_t next() {  // splitmix64
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return (next() >> 11) * 0x1.0p-53; }  // [0, 1)
  double normal() { return std::sqrt(-2.0 * std::log1p(-uniform())) * std::cos(6.283185307179586 * uniform()); }
};

}  // namespace diffmem_test
