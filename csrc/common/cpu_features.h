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

// DIFFMEM_CPU_KERNEL=generic forces the portable kernel (tests run both paths with it).
// Read on every call, so a test can switch it within one process.
inline bool use_avx512_vnni() {
  const char* force = std::getenv("DIFFMEM_CPU_KERNEL");
  if (force != nullptr && std::strcmp(force, "generic") == 0) return false;
  return has_avx512_vnni();
}

// Name of the uint8 distance kernel the CPU path uses on this machine.
inline std::string cpu_kernel_name() { return use_avx512_vnni() ? "avx512-vnni" : "generic-fp32-blocked"; }

}  // namespace diffmem::common
