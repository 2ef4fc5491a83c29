// CPU implementation of diffmem::knn_topk: exact top-k under l2.
//
// uint8: the fused blocked kernel (AVX-512 VNNI, or AVX2 FMA on centred floats) where the CPU
// has one, otherwise float32 GEMM tiles over feature blocks small enough that every partial
// sum stays an exact integer.
// float: GEMM-expansion candidates with a rigorous rounding bound, then an exact re-rank
// by direct differences in float64 (the expansion alone loses the near-duplicates).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/cpu_features.h"
#include "knn/cpu/blocked_dots.h"
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

// ---------------------------------------------------------------------------------------
// float: candidates from the expansion a = ||x||^2 + ||y||^2 - 2 x.y, whose error is at
// most e = 2 g_T ||x|| ||y|| + g_64 (||x|| + ||y||)^2 (dot product in the GEMM's precision
// T, norms and sums in float64; g = gamma_d = d u / (1 - d u)), scaled by 1.25 for margin.
// Any ref with a - e above the k-th smallest a + e cannot be among the k nearest; the
// rest are re-ranked exactly. A query with more than kCandidates such refs (masses of
// near-ties) is searched by brute force instead, so the result is exact in every case.

inline double gamma(int64_t n, double u) { return n * u / (1.0 - n * u); }

template <typename T>
double exact_sqdist(const T* x, const T* y, int64_t d) {
  double s = 0.0;
  for (int64_t f = 0; f < d; ++f) {
    const double t = static_cast<double>(x[f]) - static_cast<double>(y[f]);
    s += t * t;
  }
  return s;
}

struct CandidateState {
  int64_t capacity, k;
  std::vector<double> lo;    // Q x capacity lower bounds of the candidates' distances
  std::vector<int64_t> idx;  // Q x capacity, increasing within a query
  std::vector<int64_t> count;
  std::vector<double> hi;        // Q x k smallest upper bounds, ascending
  std::vector<int64_t> hi_idx;   // scratch for sorted_insert
  std::vector<uint8_t> overflow;  // query needs brute force

  CandidateState(int64_t Q, int64_t k_, int64_t cap)
      : capacity(cap), k(k_), lo(Q * cap), idx(Q * cap), count(Q, 0),
        hi(Q * k_, std::numeric_limits<double>::infinity()), hi_idx(Q * k_, -1), overflow(Q, 0) {}

  // Offers ref j with bounds [l, h] to query q; refs arrive in increasing index order.
  void offer(int64_t q, double l, double h, int64_t j) {
    double* hq = hi.data() + q * k;
    if (!(l <= hq[k - 1]) || overflow[q]) return;
    if (h < hq[k - 1]) sorted_insert(hq, hi_idx.data() + q * k, k, h, j);
    const double bound = hq[k - 1];
    double* lq = lo.data() + q * capacity;
    int64_t* iq = idx.data() + q * capacity;
    int64_t& n = count[q];
    if (n == capacity) {  // drop the candidates the tightened bound has ruled out
      int64_t kept = 0;
      for (int64_t t = 0; t < n; ++t)
        if (lq[t] <= bound) {
          lq[kept] = lq[t];
          iq[kept] = iq[t];
          ++kept;
        }
      n = kept;
      if (n == capacity) {
        overflow[q] = 1;
        return;
      }
    }
    lq[n] = l;
    iq[n] = j;
    ++n;
  }
};

// Exact re-rank of each query's surviving candidates (or a brute force where they overflowed).
template <typename T>
void finish_float(const CandidateState& state, const T* xp, const T* yp, int64_t N, int64_t d, int64_t k,
                  double* out_dist, int64_t* out_idx) {
  const int64_t Q = static_cast<int64_t>(state.count.size());
  at::parallel_for(0, Q, 8, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      double* dq = out_dist + q * k;
      int64_t* iq = out_idx + q * k;
      std::fill(dq, dq + k, std::numeric_limits<double>::infinity());
      std::fill(iq, iq + k, int64_t(-1));
      const T* x = xp + q * d;
      auto consider = [&](int64_t j) {
        const double t = exact_sqdist(x, yp + j * d, d);
        if (t < dq[k - 1]) sorted_insert(dq, iq, k, t, j);
      };
      if (state.overflow[q]) {
        for (int64_t j = 0; j < N; ++j) consider(j);
      } else {
        const double bound = state.hi[q * k + k - 1];
        for (int64_t t = 0; t < state.count[q]; ++t)
          if (state.lo[q * state.capacity + t] <= bound) consider(state.idx[q * state.capacity + t]);
      }
    }
  });
}

template <typename T>
std::vector<double> row_sqnorms(const T* p, int64_t rows, int64_t d) {
  std::vector<double> out(rows);
  at::parallel_for(0, rows, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      double s = 0.0;
      for (int64_t f = 0; f < d; ++f) s += static_cast<double>(p[r * d + f]) * static_cast<double>(p[r * d + f]);
      out[r] = s;
    }
  });
  return out;
}

// Each thread multiplies a block of this many queries by the ref tile and scans the
// result while it is still in its L2 (128 x 1024 float32 = 512 KB).
constexpr int64_t kFloatQueryBlock = 128;

// Lower bounds a - e of one query's distances to a run of refs, from their dot products.
struct RowBounds {
  double nx, xn, g_dot, g64;
  const double* ny;
  const double* yn;
};

template <typename D>
inline bool lower_bounds(const RowBounds& r, const D* dots, int64_t n, double bound, double* lo, double* err) {
  int any = 0;
  for (int64_t c = 0; c < n; ++c) {
    const double a = r.nx + r.ny[c] - 2.0 * static_cast<double>(dots[c]);
    const double s = r.xn + r.yn[c];
    const double e = 1.25 * (2.0 * r.g_dot * r.xn * r.yn[c] + r.g64 * s * s);
    lo[c] = a - e;
    err[c] = e;
    any |= lo[c] <= bound;
  }
  return any != 0;
}

// The same loop compiled for AVX-512 and for AVX2 (8 and 4 doubles a vector); each is
// only called where the CPU has it.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx512f"))) bool lower_bounds_avx512(const RowBounds& r, const float* dots, int64_t n,
                                                            double bound, double* lo, double* err) {
  return lower_bounds(r, dots, n, bound, lo, err);
}
__attribute__((target("avx2,fma"))) bool lower_bounds_avx2(const RowBounds& r, const float* dots, int64_t n,
                                                           double bound, double* lo, double* err) {
  return lower_bounds(r, dots, n, bound, lo, err);
}
#else
bool lower_bounds_avx512(const RowBounds& r, const float* dots, int64_t n, double bound, double* lo, double* err) {
  return lower_bounds(r, dots, n, bound, lo, err);
}
bool lower_bounds_avx2(const RowBounds& r, const float* dots, int64_t n, double bound, double* lo, double* err) {
  return lower_bounds(r, dots, n, bound, lo, err);
}
#endif
using LowerBoundsF32 = bool (*)(const RowBounds&, const float*, int64_t, double, double*, double*);
// The widest compiled form of the float32 loop this CPU runs (float64 products take the plain one).
LowerBoundsF32 lower_bounds_f32() {
  if (common::use_avx512f()) return lower_bounds_avx512;
  if (common::use_avx2_fma()) return lower_bounds_avx2;
  return lower_bounds<float>;
}

// Whether float32 BLAS GEMMs run in full float32. Since torch 2.9 the legacy query throws
// when the legacy and the per-backend precision APIs were mixed; then assume they may not.
bool float32_matmul_is_ieee() {
  try {
    return at::globalContext().float32MatmulPrecision() == at::Float32MatmulPrecision::HIGHEST;
  } catch (const c10::Error&) {
    return false;
  }
}

template <typename T>
void topk_float(const at::Tensor& X, const at::Tensor& Y, int64_t k, double* out_dist, int64_t* out_idx) {
  const int64_t Q = X.size(0), N = Y.size(0), d = X.size(1);
  // float32 products come from the fused AVX-512 kernel where the CPU has it, else from the
  // BLAS (on AVX2 CPUs a fused AVX2 kernel measured no faster than it); a BLAS float32 GEMM
  // may run in reduced precision (TF32/bf16) when the user allowed it, and then we take it
  // in float64 so the bound below holds.
  const bool fused = std::is_same_v<T, float> && common::use_avx512f();
  const bool ieee_gemm = std::is_same_v<T, double> || float32_matmul_is_ieee();
  const bool float32_products = std::is_same_v<T, float> && (fused || ieee_gemm);
  const double u_gemm = float32_products ? std::ldexp(1.0, -24) : std::ldexp(1.0, -53);
  const double g_dot = gamma(d, u_gemm), g64 = gamma(d + 4, std::ldexp(1.0, -53));
  const T* xp = X.const_data_ptr<T>();
  const T* yp = Y.const_data_ptr<T>();
  const std::vector<double> nx = row_sqnorms(xp, Q, d), ny = row_sqnorms(yp, N, d);
  std::vector<double> xn(Q), yn(N);
  for (int64_t q = 0; q < Q; ++q) xn[q] = std::sqrt(nx[q]);
  for (int64_t j = 0; j < N; ++j) yn[j] = std::sqrt(ny[j]);
  CandidateState state(Q, k, std::max<int64_t>(64, 4 * k));
  const LowerBoundsF32 bounds_f32 = lower_bounds_f32();

  // Offers refs [n0, n0 + cols) to queries [q0, q1) given their dot products dp (row stride
  // ld). The bounds of a row are computed in one vectorizable pass; almost always none is
  // below the current k-th upper bound and the row costs nothing more.
  auto scan = [&](const auto* dp, int64_t ld, int64_t q0, int64_t q1, int64_t n0, int64_t cols) {
    thread_local std::vector<double> lo, err;
    lo.resize(cols);
    err.resize(cols);
    for (int64_t q = q0; q < q1; ++q) {
      const double bound = state.hi[q * k + k - 1];
      const RowBounds row{nx[q], xn[q], g_dot, g64, ny.data() + n0, yn.data() + n0};
      bool any;
      if constexpr (std::is_same_v<std::decay_t<decltype(*dp)>, float>)
        any = bounds_f32(row, dp + (q - q0) * ld, cols, bound, lo.data(), err.data());
      else
        any = lower_bounds(row, dp + (q - q0) * ld, cols, bound, lo.data(), err.data());
      if (!any) continue;
      for (int64_t c = 0; c < cols; ++c)
        if (lo[c] <= state.hi[q * k + k - 1]) state.offer(q, lo[c], lo[c] + 2.0 * err[c], n0 + c);
    }
  };

  if constexpr (std::is_same_v<T, float>) {
    if (fused) {
      auto on_block = [&](int64_t q0, int64_t q1, int64_t j0, int64_t j1, const float* C, int64_t ldc) {
        scan(C, ldc, q0, q1, j0, j1 - j0);
      };
      blocked::for_each_dot_block<blocked::F32Avx512>(xp, Q, yp, N, d, on_block);
      finish_float(state, xp, yp, N, d, k, out_dist, out_idx);
      return;
    }
  }
  const int64_t q_blocks = (Q + kFloatQueryBlock - 1) / kFloatQueryBlock;
  for (int64_t n0 = 0; n0 < N; n0 += kRefTile) {
    const int64_t n1 = std::min(N, n0 + kRefTile), cols = n1 - n0;
    const at::Tensor yt = ieee_gemm ? Y.slice(0, n0, n1).t() : Y.slice(0, n0, n1).to(at::kDouble).t();
    at::parallel_for(0, q_blocks, 1, [&](int64_t b, int64_t e) {
      for (int64_t blk = b; blk < e; ++blk) {
        const int64_t q0 = blk * kFloatQueryBlock, q1 = std::min(Q, q0 + kFloatQueryBlock);
        const at::Tensor xb = ieee_gemm ? X.slice(0, q0, q1) : X.slice(0, q0, q1).to(at::kDouble);
        const at::Tensor dots = at::mm(xb, yt);  // a serial GEMM: we are inside the thread pool
        if (dots.scalar_type() == at::kFloat)
          scan(dots.const_data_ptr<float>(), cols, q0, q1, n0, cols);
        else
          scan(dots.const_data_ptr<double>(), cols, q0, q1, n0, cols);
      }
    });
  }

  finish_float(state, xp, yp, N, d, k, out_dist, out_idx);
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
  if (X.scalar_type() == at::kFloat)
    topk_float<float>(X, Y, k, dist.mutable_data_ptr<double>(), idx.mutable_data_ptr<int64_t>());
  else
    topk_float<double>(X, Y, k, dist.mutable_data_ptr<double>(), idx.mutable_data_ptr<int64_t>());
  return {dist, idx};
}

TORCH_LIBRARY_IMPL(diffmem, CPU, m) { m.impl("knn_topk", &topk_cpu); }

}  // namespace diffmem::knn
