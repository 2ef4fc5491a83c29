// C++ tests of common::FullPrecisionMatmulGuard (the CUDA kNN path's float32 GEMMs run
// under it): inside, float32 cuBLAS matmuls are full precision whatever the user set with
// either of torch's APIs; after, every setting reads as before and "none" entries still
// follow their parents. The settings live in at::Context, so this runs on any machine.
#include <ATen/Context.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "common/matmul_precision.h"
#include "test_util.h"

namespace {

using diffmem_test::g_failed;
using diffmem_test::g_passed;
using diffmem_test::report;

#if DIFFMEM_TORCH_AT_LEAST(2, 11)
using at::Float32Backend;
using at::Float32Op;
using at::Float32Precision;

// What the user can read back: the resolved per-backend settings and the legacy one
// ("mixed" where torch refuses to say because both APIs were used).
std::string state() {
  auto& ctx = at::globalContext();
  std::string s;
  for (auto [b, o] : {std::pair{Float32Backend::CUDA, Float32Op::MATMUL}, {Float32Backend::CUDA, Float32Op::ALL},
                      {Float32Backend::GENERIC, Float32Op::ALL}, {Float32Backend::MKLDNN, Float32Op::MATMUL}})
    s += at::precision2str(ctx.float32Precision(b, o)) + " ";
  try {
    const auto p = ctx.float32MatmulPrecision();
    s += p == at::Float32MatmulPrecision::HIGHEST ? "highest" : p == at::Float32MatmulPrecision::HIGH ? "high" : "medium";
  } catch (const c10::Error&) {
    s += "mixed";
  }
  return s;
}

void reset() {
  auto& ctx = at::globalContext();
  ctx.setFloat32MatmulPrecision("highest");
  for (auto [b, o] : {std::pair{Float32Backend::CUDA, Float32Op::MATMUL}, {Float32Backend::CUDA, Float32Op::ALL},
                      {Float32Backend::GENERIC, Float32Op::ALL}, {Float32Backend::MKLDNN, Float32Op::MATMUL}})
    ctx.setFloat32Precision(b, o, Float32Precision::NONE);
}

void test_guard() {
  auto& ctx = at::globalContext();
  const std::vector<std::pair<std::string, std::function<void()>>> modes = {
      {"default", [] {}},
      {"legacy high", [&] { ctx.setFloat32MatmulPrecision("high"); }},
      {"legacy medium", [&] { ctx.setFloat32MatmulPrecision("medium"); }},
      {"legacy allow_tf32", [&] { ctx.setAllowTF32CuBLAS(true); }},
      {"cuda matmul tf32", [&] { ctx.setFloat32Precision(Float32Backend::CUDA, Float32Op::MATMUL, Float32Precision::TF32); }},
      {"cuda all tf32", [&] { ctx.setFloat32Precision(Float32Backend::CUDA, Float32Op::ALL, Float32Precision::TF32); }},
      {"generic tf32", [&] { ctx.setFloat32Precision(Float32Backend::GENERIC, Float32Op::ALL, Float32Precision::TF32); }},
      {"cuda matmul ieee", [&] { ctx.setFloat32Precision(Float32Backend::CUDA, Float32Op::MATMUL, Float32Precision::IEEE); }},
  };
  for (const auto& [name, set] : modes) {
    reset();
    set();
    const std::string before = state();
    {
      diffmem::common::FullPrecisionMatmulGuard guard;
      report(ctx.float32Precision(Float32Backend::CUDA, Float32Op::MATMUL) == Float32Precision::IEEE,
             "guard " + name + ": cuda matmul is ieee inside", state());
      report(at::NoTF32Guard::should_disable_tf32(), "guard " + name + ": NoTF32Guard active inside");
    }
    report(state() == before, "guard " + name + ": restored", "before '" + before + "', after '" + state() + "'");
    report(!at::NoTF32Guard::should_disable_tf32(), "guard " + name + ": NoTF32Guard released");
  }
  // An inherited entry stays inherited: after the guard, cuda matmul still follows generic.
  reset();
  ctx.setFloat32Precision(Float32Backend::GENERIC, Float32Op::ALL, Float32Precision::TF32);
  { diffmem::common::FullPrecisionMatmulGuard guard; }
  ctx.setFloat32Precision(Float32Backend::GENERIC, Float32Op::ALL, Float32Precision::IEEE);
  report(ctx.float32Precision(Float32Backend::CUDA, Float32Op::MATMUL) == Float32Precision::IEEE,
         "guard: an inherited cuda matmul setting still follows its parent after the guard", state());
  reset();
}
#else
void test_guard() { std::printf("torch < 2.11: only the legacy path of the guard, not tested here\n"); }
#endif

}  // namespace

int main() {
  test_guard();
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
