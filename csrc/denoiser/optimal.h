// Closed-form optimal denoiser over a finite training set: shared declarations.
//
//   D(x; sigma) = sum_n w_n y_n,  w = softmax_n(-||x - m y_n||^2 / (2 sigma^2)),
//   lse = log sum_n exp(-||x - m y_n||^2 / (2 sigma^2))
//
// over the training items that take part (all, those whose label equals the query's, or
// the k nearest). uint8 training rows are read as y = img / 127.5 - 1.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace diffmem::denoiser {

// Checks of the op's contract; the Python wrapper raises friendlier errors first.
inline void check_inputs(const at::Tensor& x, const at::Tensor& train, const at::Tensor& sigma,
                         const at::Tensor& scale, const std::optional<at::Tensor>& labels,
                         const std::optional<at::Tensor>& train_labels, int64_t topk) {
  TORCH_CHECK(x.dim() == 2 && train.dim() == 2, "optimal_denoise: x and train must be 2-D (rows, features)");
  TORCH_CHECK(x.size(1) == train.size(1), "optimal_denoise: row sizes differ: x has ", x.size(1),
              " features, train ", train.size(1));
  TORCH_CHECK(x.size(0) >= 1 && train.size(0) >= 1 && x.size(1) >= 1, "optimal_denoise: empty input");
  const auto xt = x.scalar_type(), tt = train.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kDouble, "optimal_denoise: x must be float32 or float64, got ", xt);
  TORCH_CHECK(tt == at::kByte || tt == at::kBFloat16 || tt == at::kFloat || tt == at::kDouble,
              "optimal_denoise: train must be uint8, bfloat16, float32 or float64, got ", tt);
  TORCH_CHECK(tt != at::kDouble || xt == at::kDouble, "optimal_denoise: float64 train needs float64 x");
  for (const at::Tensor* t : {&sigma, &scale}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(0) && t->scalar_type() == at::kDouble,
                "optimal_denoise: sigma and scale must be float64 of shape (B,)");
  }
  TORCH_CHECK(labels.has_value() == train_labels.has_value(),
              "optimal_denoise: labels and train_labels go together");
  if (labels.has_value()) {
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == x.size(0) && labels->scalar_type() == at::kLong,
                "optimal_denoise: labels must be int64 of shape (B,)");
    TORCH_CHECK(train_labels->dim() == 1 && train_labels->size(0) == train.size(0) &&
                    train_labels->scalar_type() == at::kLong,
                "optimal_denoise: train_labels must be int64 of shape (N,)");
  }
  TORCH_CHECK(topk >= 0 && topk <= train.size(0), "optimal_denoise: need 0 <= topk <= N, got topk=", topk,
              ", N=", train.size(0));
  for (const at::Tensor* t : {&x, &train, &sigma, &scale}) {
    TORCH_CHECK(t->device() == x.device(), "optimal_denoise: inputs are on different devices");
  }
}

// Returns (D (B, d) in x's dtype, lse (B,) float64). topk = 0: all items take part.
std::tuple<at::Tensor, at::Tensor> optimal_denoise_cpu(const at::Tensor& x, const at::Tensor& train,
                                                       const at::Tensor& sigma, const at::Tensor& scale,
                                                       const std::optional<at::Tensor>& labels,
                                                       const std::optional<at::Tensor>& train_labels,
                                                       int64_t topk);

}  // namespace diffmem::denoiser
