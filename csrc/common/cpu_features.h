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

// AVX-512 BF16 (vdpbf16ps: two bfloat16 multiply-adds per float32 lane and instruction).
inline bool has_avx512_bf16() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

// AVX2 with FMA: 8-lane float32 multiply-adds, two per cycle on most x86-64 CPUs since 2013.
inline bool has_avx2_fma() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// DIFFMEM_CPU_KERNEL=generic forces the portable kernels, =avx2 the AVX2 ones where the CPU
// has AVX-512 too, =avx512 the AVX-512 ones without the bfloat16 screen, =bf16-emulated
// the bfloat16 screen on emulated products (tests run every path with it). Read on every call, so a test can switch it within one process.
inline bool forced(const char* name) {
  const char* force = std::getenv("DIFFMEM_CPU_KERNEL");
  return force != nullptr && std::strcmp(force, name) == 0;
}
inline bool force_generic() { return forced("generic"); }
inline bool use_avx512_vnni() { return has_avx512_vnni() && !force_generic() && !forced("avx2"); }
inline bool use_avx512f() { return has_avx512f() && !force_generic() && !forced("avx2"); }
// The float32 search's bfloat16 screen (knn_float.cpp).
inline bool use_bf16_screen() {
  return forced("bf16-emulated") || (has_avx512_bf16() && use_avx512f() && !forced("avx512"));
}
inline bool use_avx2_fma() { return has_avx2_fma() && !force_generic(); }

// Names of the uint8 and float32 distance kernels the CPU path uses on this machine.
inline std::string cpu_kernel_name() {
  std::string u8 = use_avx512_vnni() ? "uint8:avx512-vnni"
                   : use_avx2_fma()  ? "uint8:avx2-fma-blocked"
                                     : "uint8:generic-fp32-blocked";
  std::string f32 = !use_bf16_screen() ? (use_avx512f() ? "float32:avx512-fma" : "float32:blas")
                    : forced("bf16-emulated") ? "float32:bf16-screen-emulated"
                                              : "float32:avx512-bf16-screen";
  return u8 + " " + f32;
}

}  // namespace diffmem::common
