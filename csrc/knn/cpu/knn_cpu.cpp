// CPU implementation of diffmem::knn_topk: exact top-k under l2.
//
// uint8: the fused blocked kernel (AVX-512 VNNI, or AVX2 FMA on centred floats) where the CPU
// has one, otherwise float32 GEMM tiles over feature blocks small enough that every partial
// sum stays an exact integer.
// float: a screen with a rigorous error bound, then an exact re-rank (knn_float.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common/cpu_features.h"
#include "knn/cpu/sorted_topk.h"
#include "knn/knn.h"

namespace diffmem::knn {
namespace {

constexpr int64_t kQueryTile = 1024;
constexpr int64_t kRefTile = 1024;

// ---------------------------------------------------------------------------------------
// uint8, portable: float32 GEMM over blocks of 1024 features of x - 128 and y - 128.
// |(x - 128)(y - 128)| <= 2^14, so any partial sum of a block is an integer <= 2^24 and
// exact in float32 whatever order the BLAS adds in; blocks are summed in float64 (exact).
constexpr int64_t kExactFeatureBlock = 1024;

void topk_u8_generic(const at::Tensor& X, const at::Tensor& Y, int64_t k, int64_t* out_dist, int64_t* out_idx) {
  const int64_t Q = X.size(0), N = Y.size(0), d = X.size(1);
  auto centered = [](const at::Tensor& t) { return t.to(at::kFloat).sub_(128.0f); };
  auto norms = [](const at::Tensor& c) { return c.to(at::kDouble).square().sum(1).to(at::kLong); };
  std::fill(out_dist, out_dist + Q * k, std::numeric_limits<int64_t>::max());
  std::fill(out_idx, out_idx + Q * k, int64_t(-1));

  for (int64_t q0 = 0; q0 < Q; q0 += kQueryTile) {
    const int64_t q1 = std::min(Q, q0 + kQueryTile);
    const at::Tensor xb = centered(X.slice(0, q0, q1));
    const at::Tensor nx = norms(xb);
    for (int64_t n0 = 0; n0 < N; n0 += kRefTile) {
      const int64_t n1 = std::min(N, n0 + kRefTile);
      const at::Tensor yb = centered(Y.slice(0, n0, n1));
      const at::Tensor ny = norms(yb);
      at::Tensor dots = at::zeros({q1 - q0, n1 - n0}, X.options().dtype(at::kDouble));
      for (int64_t f0 = 0; f0 < d; f0 += kExactFeatureBlock) {
        const int64_t f1 = std::min(d, f0 + kExactFeatureBlock);
        dots.add_(at::mm(xb.slice(1, f0, f1), yb.slice(1, f0, f1).t()));
      }
      const double* dp = dots.const_data_ptr<double>();
      const int64_t* nxp = nx.const_data_ptr<int64_t>();
      const int64_t* nyp = ny.const_data_ptr<int64_t>();
      const int64_t cols = n1 - n0;
      at::parallel_for(0, q1 - q0, 16, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          int64_t* di = out_dist + (q0 + i) * k;
          int64_t* ii = out_idx + (q0 + i) * k;
          for (int64_t c = 0; c < cols; ++c) {
            const int64_t dv = nxp[i] + nyp[c] - 2 * static_cast<int64_t>(dp[i * cols + c]);
            if (dv < di[k - 1]) sorted_insert(di, ii, k, dv, n0 + c);
          }
        }
      });
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_cpu(const at::Tensor& queries, const at::Tensor& refs, int64_t k) {
  check_inputs(queries, refs, k);
  const at::Tensor X = queries.contiguous(), Y = refs.contiguous();
  const int64_t Q = X.size(0), N = Y.size(0), d = X.size(1);
  at::Tensor idx = at::empty({Q, k}, X.options().dtype(at::kLong));
  if (X.scalar_type() == at::kByte) {
    at::Tensor dist = at::empty({Q, k}, X.options().dtype(at::kLong));
    if ((common::use_avx512_vnni() || common::use_avx2_fma()) && d <= kBlockedU8MaxDim)
      topk_u8_blocked(X.const_data_ptr<uint8_t>(), Q, Y.const_data_ptr<uint8_t>(), N, d, k,
                     dist.mutable_data_ptr<int64_t>(), idx.mutable_data_ptr<int64_t>());
    else
      topk_u8_generic(X, Y, k, dist.mutable_data_ptr<int64_t>(), idx.mutable_data_ptr<int64_t>());
    return {dist, idx};
  }
  at::Tensor dist = at::empty({Q, k}, X.options().dtype(at::kDouble));
  topk_float_cpu(X, Y, k, dist.mutable_data_ptr<double>(), idx.mutable_data_ptr<int64_t>());
  return {dist, idx};
}

at::Tensor screen_counts_cpu(const at::Tensor& queries, const at::Tensor& refs, int64_t k) {
  check_inputs(queries, refs, k);
  TORCH_CHECK_VALUE(queries.scalar_type() != at::kByte, "knn_screen_counts: the uint8 search has no screen");
  const at::Tensor X = queries.contiguous(), Y = refs.contiguous();
  const int64_t Q = X.size(0);
  at::Tensor counts = at::empty({Q}, X.options().dtype(at::kLong));
  std::vector<double> dist(Q * k);
  std::vector<int64_t> idx(Q * k);
  topk_float_cpu(X, Y, k, dist.data(), idx.data(), counts.mutable_data_ptr<int64_t>());
  return counts;
}

TORCH_LIBRARY_IMPL(diffmem, CPU, m) {
  m.impl("knn_topk", &topk_cpu);
  m.impl("knn_screen_counts", &screen_counts_cpu);
}

}  // namespace diffmem::knn
