// CPU exact top-k for float input: a screen of approximate distances from a GEMM expansion
// with a rigorous bound on its error, then an exact re-rank of the survivors by direct
// differences in float64 (the expansion alone loses the near-duplicates).
//
// Screens, fastest first: bfloat16 products of centred rows (AVX-512 BF16; float32 and
// float64 input), float32 products (AVX-512 FMA kernel, else the BLAS), float64 BLAS
// products (float64 input, or a float32 BLAS allowed to run in reduced precision).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/cpu_features.h"
#include "knn/cpu/blocked_dots.h"
#include "knn/cpu/sorted_topk.h"
#include "knn/knn.h"

namespace diffmem::knn {
namespace {

constexpr int64_t kRefTile = 1024;

// The screen's distance is a = ||x'||^2 + ||y'||^2 - 2 p for the rows x', y' it multiplies
// (shifted, scaled by a power of two) and p their computed product. For operands h_x, h_y
// with rounding errors e_x = x' - h_x, e_y (zero when the rows are multiplied as they are),
//   |a - ||x' - y'||^2| <= e = 2 (g |h_x||h_y| + |h_x||e_y| + |e_x||h_y| + |e_x||e_y|)
//                              + g64 (|x'| + |y'|)^2 + t (1 + |x'| + |y'|),
// with g = gamma_d in the product's precision, g64 for the float64 norms and sums, and t
// for subnormal products and sums (flushed or not); the code uses 1.25 e for margin. Any
// ref with a - e above the k-th smallest a + e cannot be among the k nearest; the rest are
// re-ranked exactly. A query with more such refs than its candidate list holds (max(64, 4k);
// masses of near-ties) is searched again by a tighter screen, or by brute force, so the
// result is exact in every case.
inline double gamma(int64_t n, double u) { return n * u / (1.0 - n * u); }

// Per row: ||v'||^2, ||v'||, and the norms of its operand and of the operand's error.
struct RowStats {
  std::vector<double> sq, norm, op_norm, err_norm;
  explicit RowStats(int64_t rows) : sq(rows), norm(rows), op_norm(rows), err_norm(rows, 0.0) {}
};

// ||x - y||^2 by direct differences, summed in float64 in feature order.
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
  std::vector<uint8_t> overflow;  // query needs another search

  CandidateState(int64_t Q, int64_t k_, int64_t cap)
      : capacity(cap), k(k_), lo(Q * cap), idx(Q * cap), count(Q, 0),
        hi(Q * k_, std::numeric_limits<double>::infinity()), hi_idx(Q * k_, -1), overflow(Q, 0) {}

  // Whether query q's t-th candidate survives the final bound (the exact re-rank's refs).
  bool kept(int64_t q, int64_t t) const { return lo[q * capacity + t] <= hi[q * k + k - 1]; }

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

// Exact re-rank of each query's surviving candidates; an overflowed query is searched by
// brute force, or left to the caller when brute_force_overflow is false. So is a query
// whose k-th distance overflows float64 (rows beyond ~1e154): the screen ranks such refs
// by their true distances, a float64 brute force sees ties at inf, broken by index.
template <typename T>
void finish_float(const CandidateState& state, const T* xp, const T* yp, int64_t N, int64_t d, int64_t k,
                  double* out_dist, int64_t* out_idx, bool brute_force_overflow) {
  const int64_t Q = static_cast<int64_t>(state.count.size());
  at::parallel_for(0, Q, 8, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      if (state.overflow[q] && !brute_force_overflow) continue;
      double* dq = out_dist + q * k;
      int64_t* iq = out_idx + q * k;
      std::fill(dq, dq + k, std::numeric_limits<double>::infinity());
      std::fill(iq, iq + k, int64_t(-1));
      const T* x = xp + q * d;
      auto consider = [&](int64_t j) {
        const double t = exact_sqdist(x, yp + j * d, d);
        // An empty slot takes any distance, inf included (float64 rows near the top of
        // the range): inf ties then keep index order, as in a float64 brute force.
        if (iq[k - 1] < 0 || t < dq[k - 1]) sorted_insert(dq, iq, k, t, j);
      };
      if (!state.overflow[q]) {
        for (int64_t t = 0; t < state.count[q]; ++t)
          if (state.kept(q, t)) consider(state.idx[q * state.capacity + t]);
        if (!std::isinf(dq[k - 1])) continue;
        std::fill(dq, dq + k, std::numeric_limits<double>::infinity());
        std::fill(iq, iq + k, int64_t(-1));
      }
      for (int64_t j = 0; j < N; ++j) consider(j);
    }
  });
}

// Rows multiplied as they are: the operand is the row, with no rounding error.
template <typename T>
RowStats plain_row_stats(const T* p, int64_t rows, int64_t d) {
  RowStats s(rows);
  at::parallel_for(0, rows, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      double acc = 0.0;
      for (int64_t f = 0; f < d; ++f) acc += static_cast<double>(p[r * d + f]) * static_cast<double>(p[r * d + f]);
      s.sq[r] = acc;
      s.norm[r] = s.op_norm[r] = std::sqrt(acc);
    }
  });
  return s;
}

// Per-feature means of (at most 1024 evenly spaced) refs, rounded to float32: the bfloat16
// screen's shift. Any shift is exact; one near the data's centre keeps the bound tight.
template <typename T>
std::vector<float> feature_means(const T* Y, int64_t N, int64_t d) {
  std::vector<float> mu(d);
  const int64_t rows = std::min<int64_t>(N, 1024);
  constexpr int64_t F = 256;
  at::parallel_for(0, (d + F - 1) / F, 1, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t f0 = blk * F, fn = std::min(F, d - f0);
      double acc[F] = {};
      for (int64_t i = 0; i < rows; ++i) {
        const T* y = Y + (i * N / rows) * d + f0;
        for (int64_t f = 0; f < fn; ++f) acc[f] += y[f];
      }
      for (int64_t f = 0; f < fn; ++f) mu[f0 + f] = static_cast<float>(acc[f] / static_cast<double>(rows));
    }
  });
  return mu;
}

template <typename T>
RowStats bf16_stats(const T* V, int64_t rows, int64_t d, const float* mu) {
  RowStats s(rows);
  at::parallel_for(0, rows, 64, [&](int64_t b, int64_t e) {
    blocked::bf16_row_stats(V + b * d, e - b, d, mu, s.sq.data() + b, s.op_norm.data() + b, s.err_norm.data() + b);
  });
  for (int64_t r = 0; r < rows; ++r) s.norm[r] = std::sqrt(s.sq[r]);
  return s;
}

// Lower bounds a - e of one query's distances to a run of refs, from their products.
struct RowBounds {
  double nx, xn, xh, ex;  // the query's RowStats
  double g64, t;
  const double* ny;  // per ref: ||y'||^2, ||y'||, g |h_y| + |e_y|, |h_y| + |e_y|
  const double* yn;
  const double* p;
  const double* r;
};

template <typename D>
inline bool lower_bounds(const RowBounds& r, const D* dots, int64_t n, double bound, double* lo, double* err) {
  int any = 0;
  for (int64_t c = 0; c < n; ++c) {
    const double a = r.nx + r.ny[c] - 2.0 * static_cast<double>(dots[c]);
    const double s = r.xn + r.yn[c];
    const double e = 1.25 * (2.0 * (r.xh * r.p[c] + r.ex * r.r[c]) + r.g64 * s * s + r.t * (1.0 + s));
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

// -e for rows whose largest |value| 2^e is outside [2^-32, 2^32], else 0: scaled by 2^-e,
// float32 products neither overflow nor lose the rows' differences to underflow. Scaling by
// a power of two keeps the order of distances; only underflowing elements round (covered by t).
template <typename T>
int power_of_two_shift(const T* x, int64_t Q, const T* y, int64_t N, int64_t d) {
  // max |v|, and sum (v - v): 0 for finite rows, NaN once a NaN or inf is among them
  // (std::max alone would drop a NaN).
  using Acc = std::pair<double, double>;
  auto scan = [d](const T* p, int64_t rows) {
    return at::parallel_reduce(
        0, rows, 256, Acc{0.0, 0.0},
        [&](int64_t b, int64_t e, Acc a) {
          constexpr int64_t L = 16;  // independent lanes: the loop vectorizes
          T lane[L] = {}, bad[L] = {};
          int64_t i = b * d;
          for (; i + L <= e * d; i += L)
            for (int64_t l = 0; l < L; ++l) {
              lane[l] = std::max(lane[l], std::abs(p[i + l]));
              bad[l] += p[i + l] - p[i + l];
            }
          for (; i < e * d; ++i) {
            a.first = std::max(a.first, std::abs(static_cast<double>(p[i])));
            a.second += static_cast<double>(p[i]) - static_cast<double>(p[i]);
          }
          for (int64_t l = 0; l < L; ++l) {
            a.first = std::max(a.first, static_cast<double>(lane[l]));
            a.second += static_cast<double>(bad[l]);
          }
          return a;
        },
        [](Acc a, Acc b) { return Acc{std::max(a.first, b.first), a.second + b.second}; });
  };
  const Acc sx = scan(x, Q), sy = scan(y, N);
  TORCH_CHECK(sx.second == 0.0 && sy.second == 0.0, "knn_topk: queries and refs must be finite (found NaN or inf)");
  const double m = std::max(sx.first, sy.first);
  if (m == 0.0 || (m >= std::ldexp(1.0, -32) && m < std::ldexp(1.0, 32))) return 0;
  return -std::ilogb(m);
}

// v * 2^shift elementwise (ldexp: no intermediate overflow, whatever the shift).
template <typename T>
at::Tensor shifted(const at::Tensor& v, int shift) {
  if (shift == 0) return v;
  at::Tensor out = at::empty_like(v);
  const T* src = v.const_data_ptr<T>();
  T* dst = out.mutable_data_ptr<T>();
  at::parallel_for(0, v.numel(), 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) dst[i] = std::ldexp(src[i], shift);
  });
  return out;
}

// Each thread multiplies a block of this many queries by the ref tile and scans the
// result while it is still in its L2 (128 x 1024 float32 = 512 KB).
constexpr int64_t kFloatQueryBlock = 128;

template <typename T>
void topk_float(const at::Tensor& X, const at::Tensor& Y, int64_t k, double* out_dist, int64_t* out_idx,
                bool allow_bf16, int64_t* screen_counts) {
  const int64_t Q = X.size(0), N = Y.size(0), d = X.size(1);
  const T* xp = X.const_data_ptr<T>();
  const T* yp = Y.const_data_ptr<T>();
  const int shift = power_of_two_shift(xp, Q, yp, N, d);
  const at::Tensor Xs = shifted<T>(X, shift), Ys = shifted<T>(Y, shift);
  const T* xs = Xs.const_data_ptr<T>();
  const T* ys = Ys.const_data_ptr<T>();

  // float32 products come from the bfloat16 or the float32 AVX-512 kernel where the CPU has
  // it, else from the BLAS (on AVX2 CPUs a fused AVX2 kernel measured no faster than it); a
  // BLAS float32 GEMM may run in reduced precision (TF32/bf16) when the user allowed it, and
  // then we take it in float64 so the bound holds.
  // gamma_d = d u / (1 - d u) only bounds sums while d u < 1; past 2^20 (bfloat16) or 2^21
  // (float32) features a row the bound would be too loose to screen anything anyway, so
  // such rows take the float64 products.
  const bool bf16 = allow_bf16 && common::use_bf16_screen() && d <= (int64_t(1) << 20);
  const bool float32_rows_fit = d <= (int64_t(1) << 21);
  const bool fused = std::is_same_v<T, float> && common::use_avx512f() && float32_rows_fit;
  const bool ieee_gemm = std::is_same_v<T, double> || (float32_matmul_is_ieee() && float32_rows_fit);
  const bool float32_products = std::is_same_v<T, float> && (fused || ieee_gemm);
  // bfloat16 products are exact in float32 and summed there (round to nearest even; 2^-23
  // would also cover any other rounding mode).
  const double u_dot = bf16 ? std::ldexp(1.0, -23) : float32_products ? std::ldexp(1.0, -24) : std::ldexp(1.0, -53);
  const double g_dot = gamma(d, u_dot), g64 = gamma(d + 4, std::ldexp(1.0, -53));
  const double t = static_cast<double>(d) * std::ldexp(1.0, float32_products || bf16 ? -120 : -1000);

  const std::vector<float> mu = bf16 ? feature_means(ys, N, d) : std::vector<float>();
  const RowStats sx = bf16 ? bf16_stats(xs, Q, d, mu.data()) : plain_row_stats(xs, Q, d);
  const RowStats sy = bf16 ? bf16_stats(ys, N, d, mu.data()) : plain_row_stats(ys, N, d);
  std::vector<double> p(N), r(N);
  for (int64_t j = 0; j < N; ++j) {
    p[j] = g_dot * sy.op_norm[j] + sy.err_norm[j];
    r[j] = sy.op_norm[j] + sy.err_norm[j];
  }
  CandidateState state(Q, k, std::max<int64_t>(64, 4 * k));
  const LowerBoundsF32 bounds_f32 = lower_bounds_f32();

  // Offers refs [n0, n0 + cols) to queries [q0, q1) given their products dp (row stride
  // ld). The bounds of a row are computed in one vectorizable pass; almost always none is
  // below the current k-th upper bound and the row costs nothing more.
  auto scan = [&](const auto* dp, int64_t ld, int64_t q0, int64_t q1, int64_t n0, int64_t cols) {
    thread_local std::vector<double> lo, err;
    lo.resize(cols);
    err.resize(cols);
    for (int64_t q = q0; q < q1; ++q) {
      const double bound = state.hi[q * k + k - 1];
      const RowBounds row{sx.sq[q],        sx.norm[q],      sx.op_norm[q], sx.err_norm[q], g64, t,
                          sy.sq.data() + n0, sy.norm.data() + n0, p.data() + n0, r.data() + n0};
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
  auto on_block = [&](int64_t q0, int64_t q1, int64_t j0, int64_t j1, const float* C, int64_t ldc) {
    scan(C, ldc, q0, q1, j0, j1 - j0);
  };

  bool screened = false;
  if (bf16) {
    const blocked::Bf16Screen<T> kernel{mu.data(), blocked::micro_bf16(common::forced("bf16-emulated"))};
    blocked::for_each_dot_block(kernel, xs, Q, ys, N, d, on_block);
    screened = true;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (!screened && fused) {
      blocked::for_each_dot_block(blocked::F32Avx512{}, xs, Q, ys, N, d, on_block);
      screened = true;
    }
  }
  if (!screened) {
    const int64_t q_blocks = (Q + kFloatQueryBlock - 1) / kFloatQueryBlock;
    for (int64_t n0 = 0; n0 < N; n0 += kRefTile) {
      const int64_t n1 = std::min(N, n0 + kRefTile), cols = n1 - n0;
      const at::Tensor yt = ieee_gemm ? Ys.slice(0, n0, n1).t() : Ys.slice(0, n0, n1).to(at::kDouble).t();
      at::parallel_for(0, q_blocks, 1, [&](int64_t b, int64_t e) {
        for (int64_t blk = b; blk < e; ++blk) {
          const int64_t q0 = blk * kFloatQueryBlock, q1 = std::min(Q, q0 + kFloatQueryBlock);
          const at::Tensor xb = ieee_gemm ? Xs.slice(0, q0, q1) : Xs.slice(0, q0, q1).to(at::kDouble);
          const at::Tensor dots = at::mm(xb, yt);  // a serial GEMM: we are inside the thread pool
          if (dots.scalar_type() == at::kFloat)
            scan(dots.const_data_ptr<float>(), cols, q0, q1, n0, cols);
          else
            scan(dots.const_data_ptr<double>(), cols, q0, q1, n0, cols);
        }
      });
    }
  }

  if (screen_counts != nullptr)
    for (int64_t q = 0; q < Q; ++q) {
      int64_t n = 0;
      for (int64_t t = 0; t < state.count[q]; ++t) n += state.kept(q, t);
      screen_counts[q] = state.overflow[q] ? -1 : n;
    }
  finish_float(state, xp, yp, N, d, k, out_dist, out_idx, /*brute_force_overflow=*/!bf16);
  if (!bf16) return;
  // Queries whose bfloat16 candidates overflowed: the float32 or float64 screen, at least
  // 2^8 times tighter.
  std::vector<int64_t> rest;
  for (int64_t q = 0; q < Q; ++q)
    if (state.overflow[q]) rest.push_back(q);
  if (rest.empty()) return;
  const int64_t m = static_cast<int64_t>(rest.size());
  const at::Tensor rows = at::from_blob(rest.data(), {m}, at::TensorOptions().dtype(at::kLong));
  std::vector<double> dist(m * k);
  std::vector<int64_t> idx(m * k);
  topk_float<T>(X.index_select(0, rows), Y, k, dist.data(), idx.data(), /*allow_bf16=*/false, nullptr);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < k; ++c) {
      out_dist[rest[i] * k + c] = dist[i * k + c];
      out_idx[rest[i] * k + c] = idx[i * k + c];
    }
}

}  // namespace

void topk_float_cpu(const at::Tensor& X, const at::Tensor& Y, int64_t k, double* out_dist, int64_t* out_idx,
                    int64_t* screen_counts) {
  if (X.scalar_type() == at::kFloat)
    topk_float<float>(X, Y, k, out_dist, out_idx, /*allow_bf16=*/true, screen_counts);
  else
    topk_float<double>(X, Y, k, out_dist, out_idx, /*allow_bf16=*/true, screen_counts);
}

}  // namespace diffmem::knn
