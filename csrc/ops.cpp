// One place for the schemas of every diffmem op. Implementations register per device
// key next to their kernels (csrc/<op>/cpu, csrc/<op>/cuda); fake kernels live in Python.
#include <Python.h>
#include <torch/library.h>

#include "common/cpu_features.h"

// `import diffmem._C` loads this library, which runs the registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace diffmem {

static std::string cpu_kernels() { return common::cpu_kernel_name(); }

static bool built_with_cuda() {
#ifdef DIFFMEM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(diffmem, m) {
  // Exact k nearest neighbours under l2. queries (Q, d), refs (N, d), same dtype
  // (uint8, float32 or float64) and device, 1 <= k <= min(32, N). Returns
  // (squared distances, indices), both (Q, k), ascending, ties by smaller index;
  // squared distances are int64 for uint8 input, float64 otherwise.
  m.def("knn_topk(Tensor queries, Tensor refs, int k) -> (Tensor, Tensor)");
  // Diagnostics of knn_topk's float CPU search (float32/float64 queries and refs on the
  // CPU): per query (Q,) int64, how many refs its first screen left for the exact re-rank,
  // or -1 where they were more than the candidate list holds (screened again).
  m.def("knn_screen_counts(Tensor queries, Tensor refs, int k) -> Tensor");
  // Closed-form optimal denoiser over a training set, streamed with an online softmax:
  // D = sum_n w_n y_n, w = softmax_n(-||x - scale y_n||^2 / (2 sigma^2)), and the
  // log-sum-exp of those logits. x (B, d) float32/float64; train (N, d) uint8 (read as
  // img / 127.5 - 1), bfloat16, float32 (or float64 with float64 x); sigma, scale (B,)
  // float64; labels (B,) / train_labels (N,) int64 restrict each query to its class; topk > 0
  // restricts it to its k nearest items (0: all). Returns (D (B, d) in x's dtype, lse (B,) float64).
  m.def(
      "optimal_denoise(Tensor x, Tensor train, Tensor sigma, Tensor scale, Tensor? labels, "
      "Tensor? train_labels, int topk) -> (Tensor, Tensor)");
  m.def("cpu_kernels() -> str", &cpu_kernels);
  m.def("built_with_cuda() -> bool", &built_with_cuda);
}

}  // namespace diffmem
