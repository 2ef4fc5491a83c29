// Runtime CPU feature checks, so one binary runs everywhere and picks its fastest kernel.
#pragma once
#include <cstdlib>
#include <cstring>
#include <string>

namespace diffmem::common {

// AVX-512 with VNNI (vpdpbusd: 64 u8 x s8 multiply-adds per instruction, exact in int32).
inline bool has_avx512_vnni() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vnni");
  return ok;
#else
  return false;
#endif
}

inline bool has_avx512f() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
#else
  return false;
#endif
}

// DIFFMEM_CPU_KERNEL=generic forces the portable kernel (tests run both paths with it).
// Read on every call, so a test can switch it within one process.
inline bool force_generic() {
  const char* force = std::getenv("DIFFMEM_CPU_KERNEL");
  return force != nullptr && std::strcmp(force, "generic") == 0;
}
inline bool use_avx512_vnni() { return has_avx512_vnni() && !force_generic(); }
inline bool use_avx512f() { return has_avx512f() && !force_generic(); }

// Names of the uint8 and float32 distance kernels the CPU path uses on this machine.
inline std::string cpu_kernel_name() {
  std::string u8 = use_avx512_vnni() ? "uint8:avx512-vnni" : "uint8:generic-fp32-blocked";
  std::string f32 = use_avx512f() ? "float32:avx512-fma" : "float32:blas";
  return u8 + " " + f32;
}

}  // namespace diffmem::common
