// C++ tests of diffmem::knn_topk on CPU, called through the dispatcher and compared with a
// brute-force reference (plain loops in int64/double, sorted by (distance, index)).
// Run by ctest three times: with the default kernels, with DIFFMEM_CPU_KERNEL=generic and
// with DIFFMEM_CPU_KERNEL=bf16-emulated (the float32 bfloat16 screen on any CPU).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "test_util.h"

namespace {

using diffmem_test::g_failed;
using diffmem_test::g_passed;
using diffmem_test::report;
using diffmem_test::Rng;

at::Tensor u8(int64_t rows, int64_t d, Rng& rng, int lo = 0, int hi = 255) {
  at::Tensor t = at::empty({rows, d}, at::kByte);
  uint8_t* p = t.mutable_data_ptr<uint8_t>();
  for (int64_t i = 0; i < rows * d; ++i) p[i] = static_cast<uint8_t>(lo + rng.next() % uint64_t(hi - lo + 1));
  return t;
}

at::Tensor real(int64_t rows, int64_t d, Rng& rng, at::ScalarType dt, double offset = 0.0, double scale = 1.0) {
  at::Tensor t = at::empty({rows, d}, at::kDouble);
  double* p = t.mutable_data_ptr<double>();
  for (int64_t i = 0; i < rows * d; ++i) p[i] = offset + scale * rng.normal();
  return t.to(dt);
}

// ---- the op and the reference ----------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> knn_topk(const at::Tensor& q, const at::Tensor& r, int64_t k) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("diffmem::knn_topk", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(q, r, k);
}

std::string cpu_kernels() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("diffmem::cpu_kernels", "").typed<std::string()>();
  return op.call();
}

bool built_with_cuda() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("diffmem::built_with_cuda", "").typed<bool()>();
  return op.call();
}

// Squared distances of every (query, ref) pair, exact for uint8 (int64) and, for floats,
// summed in float64 in feature order (what the op's exact re-rank computes).
template <typename T, typename D>
std::vector<D> all_sqdist(const at::Tensor& Q, const at::Tensor& R) {
  const at::Tensor q = Q.contiguous(), r = R.contiguous();
  const int64_t nq = q.size(0), nr = r.size(0), d = q.size(1);
  const T* qp = q.const_data_ptr<T>();
  const T* rp = r.const_data_ptr<T>();
  std::vector<D> out(nq * nr);
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t j = 0; j < nr; ++j) {
      D s = 0;
      for (int64_t f = 0; f < d; ++f) {
        const D t = static_cast<D>(qp[i * d + f]) - static_cast<D>(rp[j * d + f]);
        s += t * t;
      }
      out[i * nr + j] = s;
    }
  return out;
}

template <typename T, typename D>
void check_case(const std::string& name, const at::Tensor& Q, const at::Tensor& R, int64_t k) {
  at::Tensor dist, idx;
  try {
    std::tie(dist, idx) = knn_topk(Q, R, k);
  } catch (const std::exception& e) {
    report(false, name, std::string("threw: ") + e.what());
    return;
  }
  const int64_t nq = Q.size(0), nr = R.size(0);
  const auto want_dtype = std::is_same_v<D, int64_t> ? at::kLong : at::kDouble;
  if (dist.sizes() != at::IntArrayRef{nq, k} || idx.sizes() != at::IntArrayRef{nq, k} ||
      dist.scalar_type() != want_dtype || idx.scalar_type() != at::kLong) {
    report(false, name, "wrong output shape or dtype");
    return;
  }
  const std::vector<D> all = all_sqdist<T, D>(Q, R);
  dist = dist.contiguous();
  idx = idx.contiguous();
  const D* dp = dist.const_data_ptr<D>();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  std::vector<int64_t> order(nr);
  for (int64_t i = 0; i < nq; ++i) {
    const D* row = all.data() + i * nr;
    std::iota(order.begin(), order.end(), int64_t(0));
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
      return row[a] < row[b] || (row[a] == row[b] && a < b);
    });
    for (int64_t t = 0; t < k; ++t) {
      const int64_t want_j = order[t], got_j = ip[i * k + t];
      const D want_d = row[want_j], got_d = dp[i * k + t];
      if (got_j != want_j || got_d != want_d) {
        char buf[256];
        std::snprintf(buf, sizeof buf, "query %lld rank %lld: got (%.17g, %lld), want (%.17g, %lld)",
                      (long long)i, (long long)t, (double)got_d, (long long)got_j, (double)want_d,
                      (long long)want_j);
        report(false, name, buf);
        return;
      }
    }
  }
  report(true, name);
}

void check_u8(const std::string& name, const at::Tensor& Q, const at::Tensor& R, int64_t k) {
  check_case<uint8_t, int64_t>(name, Q, R, k);
}
template <typename T>
void check_real(const std::string& name, const at::Tensor& Q, const at::Tensor& R, int64_t k) {
  check_case<T, double>(name, Q, R, k);
}

void check_throws(const std::string& name, const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error&) {
    report(true, name);
    return;
  } catch (const std::exception& e) {
    report(false, name, std::string("threw something other than c10::Error: ") + e.what());
    return;
  }
  report(false, name, "did not throw");
}

std::string shape(int64_t Q, int64_t N, int64_t d, int64_t k) {
  return "Q=" + std::to_string(Q) + " N=" + std::to_string(N) + " d=" + std::to_string(d) + " k=" + std::to_string(k);
}

// ---- the cases ---------------------------------------------------------------------------
void test_uint8(Rng& rng) {
  struct S {
    int64_t Q, N, d, k;
  };
  // d around multiples of 4 (VNNI groups) and 16; Q around the 8-row register tile; N
  // around the 48-ref panel, across the 1024-query/ref tiles and several packed blocks.
  const S shapes[] = {{1, 1, 1, 1},      {5, 7, 3, 2},       {8, 48, 16, 8},     {9, 49, 17, 5},
                      {7, 47, 15, 32},   {13, 97, 5, 32},    {17, 145, 33, 10},  {3, 32, 7, 32},
                      {16, 96, 64, 16},  {23, 200, 130, 12}, {11, 200, 3072, 16}, {4, 40, 40000, 5},
                      {1030, 60, 6, 3},  {6, 1100, 9, 4}};
  for (const S& s : shapes) {
    const at::Tensor q = u8(s.Q, s.d, rng), r = u8(s.N, s.d, rng);
    check_u8("uint8 random " + shape(s.Q, s.N, s.d, s.k), q, r, s.k);
  }
  // N == k, with every distance of a query returned.
  check_u8("uint8 N == k", u8(9, 21, rng), u8(32, 21, rng), 32);
  // Ties: values in {0, 1} on few features, so most distances collide; refs duplicated.
  {
    at::Tensor r = u8(30, 5, rng, 0, 1);
    r = at::cat({r, r, r.slice(0, 0, 10)});
    check_u8("uint8 ties + duplicate refs", u8(19, 5, rng, 0, 1), r, 32);
    check_u8("uint8 queries equal to refs", r.slice(0, 3, 20), r, 7);
  }
  // Largest distances: all-0 queries against all-255 refs; d = 33025 is the last d whose
  // distances fit int32, 33026 and 40000 take the int64 epilogue.
  for (int64_t d : {int64_t(33025), int64_t(33026), int64_t(40000)}) {
    at::Tensor q = at::zeros({3, d}, at::kByte);
    at::Tensor r = at::full({5, d}, 255, at::kByte);
    r.select(0, 2).slice(0, 0, 7).fill_(254);  // one ref slightly closer
    r.select(0, 4).fill_(0);                   // and one at distance 0
    check_u8("uint8 extreme values d=" + std::to_string(d), q, r, 5);
    check_u8("uint8 extreme values mixed d=" + std::to_string(d), at::cat({q, r.slice(0, 0, 2)}),
             at::cat({u8(4, d, rng), r}), 4);
  }
  // Non-contiguous inputs (the op makes them contiguous).
  {
    const at::Tensor q = u8(10, 38, rng), r = u8(70, 38, rng);
    check_u8("uint8 strided", q.slice(1, 0, 38, 2), r.slice(1, 0, 38, 2), 6);
    check_u8("uint8 transposed refs", q.slice(1, 0, 10), u8(10, 70, rng).t(), 6);
  }
}

template <typename T>
void test_real(Rng& rng, const std::string& tn) {
  const auto dt = std::is_same_v<T, float> ? at::kFloat : at::kDouble;
  struct S {
    int64_t Q, N, d, k;
  };
  const S shapes[] = {{1, 1, 1, 1}, {7, 100, 5, 10}, {9, 33, 3, 32}, {20, 1100, 33, 32}, {1030, 40, 4, 3},
                      {5, 64, 300, 8}};
  for (const S& s : shapes)
    check_real<T>(tn + " random " + shape(s.Q, s.N, s.d, s.k), real(s.Q, s.d, rng, dt), real(s.N, s.d, rng, dt), s.k);
  // Exact duplicates: ties by index.
  {
    at::Tensor r = real(25, 6, rng, dt);
    r = at::cat({r, r, r});
    check_real<T>(tn + " duplicate refs", at::cat({real(5, 6, rng, dt), r.slice(0, 0, 5)}), r, 32);
  }
  // Near-duplicates with large norms: the expansion ||x||^2 + ||y||^2 - 2 x.y cancels
  // catastrophically; few refs (candidate list holds them all) and many (overflow path).
  for (int64_t n : {int64_t(40), int64_t(300)}) {
    const int64_t d = 48;
    const at::Tensor base = real(1, d, rng, at::kDouble, 1000.0, 1.0);
    const at::Tensor q = (base + real(9, d, rng, at::kDouble, 0.0, 1e-3)).to(dt);
    const at::Tensor r = (base + real(n, d, rng, at::kDouble, 0.0, 1e-3)).to(dt);
    check_real<T>(tn + " near-duplicates, norms ~1000, N=" + std::to_string(n), q, r, 16);
  }
  // Strided queries.
  check_real<T>(tn + " strided", real(8, 20, rng, dt).slice(1, 0, 20, 2), real(50, 10, rng, dt), 5);
}

void test_errors() {
  const at::Tensor q = at::zeros({3, 4}, at::kByte), r = at::zeros({5, 4}, at::kByte);
  check_throws("error: k > N", [&] { knn_topk(q, r, 6); });
  check_throws("error: k = 0", [&] { knn_topk(q, r, 0); });
  check_throws("error: k > 32", [&] { knn_topk(q, at::zeros({40, 4}, at::kByte), 33); });
  check_throws("error: mismatched d", [&] { knn_topk(q, at::zeros({5, 3}, at::kByte), 2); });
  check_throws("error: mismatched dtype", [&] { knn_topk(q, r.to(at::kFloat), 2); });
  check_throws("error: int32 dtype", [&] { knn_topk(q.to(at::kInt), r.to(at::kInt), 2); });
  check_throws("error: 1-D queries", [&] { knn_topk(at::zeros({4}, at::kByte), r, 2); });
  check_throws("error: empty queries", [&] { knn_topk(at::zeros({0, 4}, at::kFloat), r.to(at::kFloat), 2); });
}

}  // namespace

int main() {
  const char* force = std::getenv("DIFFMEM_CPU_KERNEL");
  const std::string kernel = cpu_kernels();
  std::printf("CPU kernels: %s (DIFFMEM_CPU_KERNEL=%s), %d threads, built with CUDA: %s\n", kernel.c_str(),
              force ? force : "", at::get_num_threads(), built_with_cuda() ? "yes" : "no");
  report(!(force && std::strcmp(force, "generic") == 0) || kernel == "uint8:generic-fp32-blocked float32:blas",
         "DIFFMEM_CPU_KERNEL=generic selects the portable kernels", "got " + kernel);

  Rng rng{20240601};
  test_uint8(rng);
  test_real<float>(rng, "float32");
  test_real<double>(rng, "float64");
  test_errors();

  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
