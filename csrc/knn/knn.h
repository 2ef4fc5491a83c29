// Exact top-k nearest-neighbour search: shared declarations of the CPU and CUDA paths.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <tuple>

namespace diffmem::knn {

constexpr int64_t kMaxK = 32;

// Checks of the op's contract; the Python wrapper raises friendlier errors first.
inline void check_inputs(const at::Tensor& queries, const at::Tensor& refs, int64_t k) {
  TORCH_CHECK(queries.dim() == 2 && refs.dim() == 2, "knn_topk: queries and refs must be 2-D (rows, features)");
  TORCH_CHECK(queries.size(1) == refs.size(1), "knn_topk: row sizes differ: queries have ", queries.size(1),
              " features, refs ", refs.size(1));
  TORCH_CHECK(queries.scalar_type() == refs.scalar_type(), "knn_topk: queries and refs must have the same dtype");
  const auto t = queries.scalar_type();
  TORCH_CHECK(t == at::kByte || t == at::kFloat || t == at::kDouble,
              "knn_topk: dtype must be uint8, float32 or float64, got ", t);
  TORCH_CHECK(queries.device() == refs.device(), "knn_topk: queries and refs are on different devices");
  TORCH_CHECK(queries.size(0) >= 1 && refs.size(0) >= 1 && queries.size(1) >= 1, "knn_topk: empty input");
  TORCH_CHECK(k >= 1 && k <= kMaxK && k <= refs.size(0), "knn_topk: need 1 <= k <= min(32, N), got k=", k,
              ", N=", refs.size(0));
}

std::tuple<at::Tensor, at::Tensor> topk_cpu(const at::Tensor& queries, const at::Tensor& refs, int64_t k);

// float32/float64 X (Q, d) and Y (N, d), contiguous: out_dist (squared, float64) and
// out_idx (Q, k) filled, sorted, ties by index; screen_counts (Q), when given, receives
// what knn_screen_counts returns.
void topk_float_cpu(const at::Tensor& X, const at::Tensor& Y, int64_t k, double* out_dist, int64_t* out_idx,
                    int64_t* screen_counts = nullptr);

// uint8 kernel on the blocked register kernels (AVX-512 VNNI, else AVX2 FMA); requires
// common::use_avx512_vnni() or common::use_avx2_fma(), and d <= kBlockedU8MaxDim.
// X (Q, d) and Y (N, d) row-major; out_dist/out_idx (Q, k) are filled, sorted, ties by index.
constexpr int64_t kBlockedU8MaxDim = 65792;  // int32 accumulators of x * (y - 128) stay exact
void topk_u8_blocked(const uint8_t* X, int64_t Q, const uint8_t* Y, int64_t N, int64_t d, int64_t k,
                     int64_t* out_dist, int64_t* out_idx);

}  // namespace diffmem::knn
