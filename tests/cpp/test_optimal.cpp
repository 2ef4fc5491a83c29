// C++ tests of diffmem::optimal_denoise on CPU, called through the dispatcher and compared
// with a plain double-precision reference (direct differences, max-shifted softmax).
// Under the sanitizer build (ctest in build/asan) they also check the kernel's memory use.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "test_util.h"

namespace {

using diffmem_test::g_failed;
using diffmem_test::g_passed;
using diffmem_test::report;
using diffmem_test::Rng;

std::tuple<at::Tensor, at::Tensor> optimal_denoise(const at::Tensor& x, const at::Tensor& train,
                                                   const at::Tensor& sigma, const at::Tensor& scale,
                                                   const std::optional<at::Tensor>& labels,
                                                   const std::optional<at::Tensor>& train_labels, int64_t topk) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("diffmem::optimal_denoise", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t)>();
  return op.call(x, train, sigma, scale, labels, train_labels, topk);
}

// The training rows as doubles, as the op reads them (uint8: img / 127.5 - 1).
std::vector<double> rows_of(const at::Tensor& train) {
  at::Tensor t = train.scalar_type() == at::kByte ? train.to(at::kDouble) / 127.5 - 1.0 : train.to(at::kDouble);
  t = t.contiguous();
  return std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
}

// D and lse of one query in double: items with label != label (label >= 0) are left out;
// topk > 0 keeps the k smallest distances (ties: smaller index).
std::pair<std::vector<double>, double> reference(const std::vector<double>& x, const std::vector<double>& Y,
                                                 int64_t N, int64_t d, double sigma, double m,
                                                 const std::vector<int64_t>* train_labels, int64_t label,
                                                 int64_t topk) {
  std::vector<std::pair<double, int64_t>> dist;
  for (int64_t n = 0; n < N; ++n) {
    if (train_labels && (*train_labels)[n] != label) continue;
    double s = 0;
    for (int64_t j = 0; j < d; ++j) {
      double diff = x[j] - m * Y[n * d + j];
      s += diff * diff;
    }
    dist.emplace_back(s, n);
  }
  std::sort(dist.begin(), dist.end());
  if (topk > 0 && static_cast<int64_t>(dist.size()) > topk) dist.resize(topk);
  double best = -std::numeric_limits<double>::infinity();
  for (auto& [s, n] : dist) best = std::max(best, -s / (2 * sigma * sigma));
  std::vector<double> D(d, 0.0);
  double total = 0;
  for (auto& [s, n] : dist) {
    double w = std::exp(-s / (2 * sigma * sigma) - best);
    total += w;
    for (int64_t j = 0; j < d; ++j) D[j] += w * Y[n * d + j];
  }
  for (double& v : D) v /= total;
  return {D, best + std::log(total)};
}

double relative_error(const at::Tensor& got_row, const std::vector<double>& want) {
  at::Tensor g = got_row.to(at::kDouble).contiguous();
  const double* p = g.data_ptr<double>();
  double num = 0, den = 0;
  for (size_t j = 0; j < want.size(); ++j) {
    num += (p[j] - want[j]) * (p[j] - want[j]);
    den += want[j] * want[j];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// Queries near training items (the hard case at small sigma), between two, and far off.
at::Tensor queries(const std::vector<double>& Y, int64_t N, int64_t d, int64_t B, Rng& rng) {
  at::Tensor x = at::empty({B, d}, at::kDouble);
  double* p = x.mutable_data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t a = rng.next() % N, c = rng.next() % N;
    for (int64_t j = 0; j < d; ++j) {
      double v = b % 3 == 0 ? Y[a * d + j] + 1e-3 * rng.normal()
                 : b % 3 == 1 ? 0.5 * (Y[a * d + j] + Y[c * d + j]) + 1e-3 * rng.normal()
                              : 3.0 * rng.normal();
      p[b * d + j] = v;
    }
  }
  return x;
}

void check_case(const std::string& name, const at::Tensor& train, const at::Tensor& x, double sigma,
                const std::vector<int64_t>* train_labels, int64_t topk, double tolerance) {
  const int64_t B = x.size(0), N = train.size(0), d = train.size(1);
  std::vector<double> Y = rows_of(train);
  at::Tensor sig = at::full({B}, sigma, at::kDouble), scale = at::ones({B}, at::kDouble);
  std::optional<at::Tensor> labels, tlabels;
  std::vector<int64_t> query_labels(B, -1);
  if (train_labels) {
    at::Tensor t = at::empty({N}, at::kLong), q = at::empty({B}, at::kLong);
    std::copy(train_labels->begin(), train_labels->end(), t.mutable_data_ptr<int64_t>());
    for (int64_t b = 0; b < B; ++b) query_labels[b] = (*train_labels)[b % N];
    std::copy(query_labels.begin(), query_labels.end(), q.mutable_data_ptr<int64_t>());
    labels = q;
    tlabels = t;
  }
  auto [D, lse] = optimal_denoise(x, train, sig, scale, labels, tlabels, topk);
  at::Tensor xd = x.to(at::kDouble).contiguous();
  double worst = 0, worst_lse = 0;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> xb(xd.data_ptr<double>() + b * d, xd.data_ptr<double>() + (b + 1) * d);
    auto [want, want_lse] = reference(xb, Y, N, d, sigma, 1.0, train_labels, query_labels[b], topk);
    worst = std::max(worst, relative_error(D[b], want));
    worst_lse = std::max(worst_lse, std::abs(lse[b].item<double>() - want_lse) / std::max(1.0, std::abs(want_lse)));
  }
  char why[160];
  std::snprintf(why, sizeof why, "rel. error of D %.3g, of lse %.3g (tolerance %.3g)", worst, worst_lse, tolerance);
  report(worst <= tolerance && worst_lse <= 1e-3, name, why);
}

void test_dtypes(Rng& rng) {
  const int64_t N = 300, d = 77, B = 12;  // d and N not multiples of any tile
  at::Tensor train_u8 = at::randint(0, 256, {N, d}, at::kByte);
  std::vector<double> Y = rows_of(train_u8);
  at::Tensor x64 = queries(Y, N, d, B, rng);
  for (double sigma : {0.002, 0.05, 1.0, 80.0}) {
    std::string s = std::to_string(sigma);
    check_case("uint8 train, float32 x, sigma " + s, train_u8, x64.to(at::kFloat), sigma, nullptr, 0, 5e-4);
    check_case("float32 train, sigma " + s, train_u8.to(at::kFloat) / 127.5 - 1.0, x64.to(at::kFloat), sigma,
               nullptr, 0, 5e-4);
    check_case("float64, sigma " + s, train_u8.to(at::kDouble) / 127.5 - 1.0, x64, sigma, nullptr, 0, 1e-9);
  }
}

void test_variants(Rng& rng) {
  const int64_t N = 90, d = 40, B = 9;
  at::Tensor train = at::randint(0, 256, {N, d}, at::kByte);
  std::vector<double> Y = rows_of(train);
  at::Tensor x = queries(Y, N, d, B, rng).to(at::kFloat);
  std::vector<int64_t> labels(N);
  for (int64_t n = 0; n < N; ++n) labels[n] = n % 4;
  check_case("class-conditional", train, x, 0.5, &labels, 0, 5e-4);
  check_case("top-5", train, x, 0.5, nullptr, 5, 5e-4);
  check_case("top-3 within the class", train, x, 2.0, &labels, 3, 5e-4);
}

void test_errors() {
  at::Tensor train = at::randint(0, 256, {10, 8}, at::kByte), x = at::zeros({2, 8});
  at::Tensor sig = at::ones({2}, at::kDouble), scale = at::ones({2}, at::kDouble);
  auto fails = [](const std::string& name, auto&& call) {
    bool threw = false;
    try {
      call();
    } catch (const c10::Error&) {
      threw = true;
    }
    report(threw, name, "no error raised");
  };
  fails("mismatched row size", [&] { optimal_denoise(at::zeros({2, 9}), train, sig, scale, {}, {}, 0); });
  fails("integer x", [&] { optimal_denoise(at::zeros({2, 8}, at::kLong), train, sig, scale, {}, {}, 0); });
  fails("float64 train with float32 x",
        [&] { optimal_denoise(x, train.to(at::kDouble), sig, scale, {}, {}, 0); });
  fails("empty train", [&] { optimal_denoise(x, train.slice(0, 0, 0), sig, scale, {}, {}, 0); });
}

}  // namespace

int main() {
  Rng rng{20261202};
  at::manual_seed(7);
  test_dtypes(rng);
  test_variants(rng);
  test_errors();
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
