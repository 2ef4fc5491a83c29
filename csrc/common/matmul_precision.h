// Full-precision float32 cuBLAS matmuls within a scope, whatever TF32 setting the user made,
// and that setting restored after. Header-only and CUDA-free: the CUDA kNN path uses it,
// and the C++ tests check it on any machine (the settings live in at::Context).
#pragma once
#include <ATen/Context.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#define DIFFMEM_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

namespace diffmem::common {

// torch >= 2.11 (per-backend API, checked against 2.11 and 2.14): cuBLAS and cuBLASLt read the resolved CUDA matmul
// precision, so that entry alone is set to IEEE and put back. The getter resolves
// inheritance ("none" reads as the CUDA or generic setting), so a value equal to its
// parent's is put back as "none", which keeps following the parent. The legacy API is
// left alone: writing it would turn a "mixed" state (only the per-backend API used) into
// a legacy one.
// Older torch: the legacy calls only (allowTF32CuBLAS / float32MatmulPrecision); since
// torch 2.9 they throw once the two APIs were mixed, and TF32 is then taken to be on.
// The thread-local NoTF32Guard covers cuBLAS handles in both; cuBLASLt ignores it.
class FullPrecisionMatmulGuard {
 public:
  FullPrecisionMatmulGuard() {
    auto& ctx = at::globalContext();
#if DIFFMEM_TORCH_AT_LEAST(2, 11)
    using at::Float32Backend, at::Float32Op, at::Float32Precision;
    saved_ = ctx.float32Precision(Float32Backend::CUDA, Float32Op::MATMUL);
    inherited_ = saved_ == ctx.float32Precision(Float32Backend::CUDA, Float32Op::ALL);
    if (saved_ != Float32Precision::IEEE) {
      ctx.setFloat32Precision(Float32Backend::CUDA, Float32Op::MATMUL, Float32Precision::IEEE);
      restore_ = true;
    }
#else
    bool tf32 = true;
    try {
      tf32 = ctx.allowTF32CuBLAS();
    } catch (const c10::Error&) {
    }
    if (tf32) {
      try {
        medium_ = ctx.float32MatmulPrecision() == at::Float32MatmulPrecision::MEDIUM;
      } catch (const c10::Error&) {
      }
      ctx.setAllowTF32CuBLAS(false);
      restore_ = true;
    }
#endif
  }
  ~FullPrecisionMatmulGuard() {
    if (!restore_) return;
    auto& ctx = at::globalContext();
#if DIFFMEM_TORCH_AT_LEAST(2, 11)
    using at::Float32Backend, at::Float32Op, at::Float32Precision;
    ctx.setFloat32Precision(Float32Backend::CUDA, Float32Op::MATMUL, inherited_ ? Float32Precision::NONE : saved_);
#else
    ctx.setAllowTF32CuBLAS(true);
    if (medium_) ctx.setFloat32MatmulPrecision("medium");  // "high" would lose its bf16 CPU half
#endif
  }
  FullPrecisionMatmulGuard(const FullPrecisionMatmulGuard&) = delete;
  FullPrecisionMatmulGuard& operator=(const FullPrecisionMatmulGuard&) = delete;

 private:
  at::NoTF32Guard no_tf32_;
  bool restore_ = false;
#if DIFFMEM_TORCH_AT_LEAST(2, 11)
  at::Float32Precision saved_ = at::Float32Precision::NONE;
  bool inherited_ = false;
#else
  bool medium_ = false;
#endif
};

}  // namespace diffmem::common
