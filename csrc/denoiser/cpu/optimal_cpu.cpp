// CPU implementation of diffmem::optimal_denoise: the closed-form optimal denoiser
// D(x) = sum_n softmax_n(l_n) y_n, l_n = -||x - m y_n||^2 / (2 sigma^2), and log-sum-exp.
//
// Streams over the training set in tiles with an online softmax (running max, running
// sum, running weighted sum, flash-attention style); memory is O(B d + tiles), never B x N.
// Work is split into (query block) x (training slice) units run by at::parallel_for; the
// slices' partial softmax states are merged at the end.
//
// Precision. At sigma = 0.002 a logit is a squared distance times 125,000, so the float32
// expansion ||x||^2 + m^2 ||y||^2 - 2 m x.y (error ~ 1e-3 for CIFAR-sized rows) would
// scramble the weights. The expansion (a fast GEMM in the compute dtype) is used for what
// it is good at, and direct differences in float64 for the rest:
//   * it rules out items: an item whose logit is, by the rigorous error bound, more than
//     kNegligible below the best item so far weighs < e^-50 relative and is skipped;
//   * an item whose estimated logit error is below kLogitTol keeps the expansion's logit
//     (large sigma, where all items matter and the error is divided by 2 sigma^2);
//   * every other item (the few near the top at small sigma, near-ties) gets its squared
//     distance recomputed by direct differences in float64;
//   * where a tile has many such items (middle and large sigma with large-norm, noisy
//     queries: every item matters and the float32 error is not yet divided away), the
//     tile's dot products are recomputed by one float64 GEMM instead, which is far
//     cheaper than per-item direct differences and accurate enough there.
// The accuracy target (relative error of D <= 5e-4 against float64 for sigma in
// [0.002, 80], near-ties included) is asserted by tests/test_optimal.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "denoiser/optimal.h"

namespace diffmem::denoiser {
namespace {

constexpr int64_t kTrainTile = 256;    // training rows per GEMM tile (3 MB of float32 at d = 3072)
constexpr int64_t kMaxQueryBlock = 64;  // queries per unit: GEMM rows, and the accumulator's size
constexpr double kNegligible = 50.0;   // e^-50 = 2e-22: such weights cannot move D in float64
// Largest accepted error (estimate) of an expansion logit. A logit error e changes a weight
// by a factor e^(+-e), so D moves by about e times the posterior spread; 2e-4 keeps that
// well under the 5e-4 relative budget, and at sigma >= ~8 (CIFAR rows) it lets every item
// use the GEMM's logit.
constexpr double kLogitTol = 2e-4;
// float64 input asks for float64 accuracy: the same rule with a budget near its roundoff.
constexpr double kLogitTol64 = 1e-10;
constexpr double kInf = std::numeric_limits<double>::infinity();

template <typename T>
constexpr double unit_roundoff() {
  return std::is_same_v<T, double> ? 0x1p-53 : 0x1p-24;
}
inline double gamma(int64_t n, double u) { return n * u / (1.0 - n * u); }

// ---- reading training rows -------------------------------------------------------------
// uint8 pixels are images: y = img / 127.5 - 1 (the data pipeline's scaling).
inline double exact_value(uint8_t v) { return v / 127.5 - 1.0; }
inline double exact_value(c10::BFloat16 v) { return static_cast<float>(v); }
inline double exact_value(float v) { return v; }
inline double exact_value(double v) { return v; }

// Rows [n0, n1) of Y in the compute dtype T: a pointer into Y where it already is T,
// else converted into buf (one tile, so the uint8 set is never expanded as a whole).
template <typename T, typename S>
const T* rows_as(const S* Y, int64_t n0, int64_t n1, int64_t d, std::vector<T>& buf) {
  if constexpr (std::is_same_v<T, S>) {
    return Y + n0 * d;
  } else {
    buf.resize(static_cast<size_t>((n1 - n0) * d));
    const S* src = Y + n0 * d;
    if constexpr (std::is_same_v<S, uint8_t>) {
      T lut[256];  // correctly rounded img / 127.5 - 1
      for (int v = 0; v < 256; ++v) lut[v] = static_cast<T>(exact_value(static_cast<uint8_t>(v)));
      for (size_t i = 0; i < buf.size(); ++i) buf[i] = lut[src[i]];
    } else {
      for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<T>(static_cast<float>(src[i]));
    }
    return buf.data();
  }
}

// ||x - m y||^2 by direct differences in float64: no cancellation, whatever the norms.
template <typename T, typename S>
double exact_sqdist(const T* x, const S* y, double m, int64_t d) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t f = 0; f < d; ++f) {
    const double t = static_cast<double>(x[f]) - m * exact_value(y[f]);
    s += t * t;
  }
  return s;
}

// Squared norms of the rows in float64. uint8: from the exact integer sums of v and v^2,
// sum (v / 127.5 - 1)^2 = sum v^2 / 127.5^2 - 2 sum v / 127.5 + d (no per-pixel division).
template <typename S>
std::vector<double> row_sqnorms(const S* p, int64_t rows, int64_t d) {
  std::vector<double> out(rows);
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const S* row = p + r * d;
      if constexpr (std::is_same_v<S, uint8_t>) {
        int64_t s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
        for (int64_t f = 0; f < d; ++f) {
          const int32_t v = row[f];
          s1 += v;
          s2 += v * v;
        }
        out[r] = static_cast<double>(s2) / (127.5 * 127.5) - 2.0 * static_cast<double>(s1) / 127.5 + d;
      } else {
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (int64_t f = 0; f < d; ++f) s += exact_value(row[f]) * exact_value(row[f]);
        out[r] = s;
      }
    }
  });
  return out;
}

// ---- the problem -----------------------------------------------------------------------
template <typename T, typename S>
struct Problem {
  const T* X;
  const S* Y;
  int64_t B, N, d;
  const double* sigma;
  const double* scale;
  const int64_t* labels;        // nullptr: unconditional
  const int64_t* train_labels;
  std::vector<double> nx, xn, ny, yn;  // squared norms and norms of the rows, float64
  double logit_tol = std::is_same_v<T, double> ? kLogitTol64 : kLogitTol;
  double sqrt_d = std::sqrt(static_cast<double>(d));

  bool excluded(int64_t q, int64_t n) const { return labels != nullptr && train_labels[n] != labels[q]; }

  // Rigorous bound on the expansion's error for (q, n) given its dot product: the dot in
  // T (gamma_d), y rounded to T (u), the float64 sums; with a 1.25 margin.
  double rigorous_error(int64_t q, int64_t n, double m, double dot, double u) const {
    const double u64 = 0x1p-53;
    return 1.25 * (2.0 * m * xn[q] * yn[n] * (gamma(d, u) + 2.0 * u) +
                   gamma(4, u64) * (nx[q] + m * m * ny[n] + 2.0 * m * std::abs(dot)));
  }
  // Estimate of the same error, from a model of accumulated rounding: a length-d sum
  // whose partial sums grow coherently (x ~ y: the terms share a sign) errs by about
  // sqrt(d) u |x.y|, one with incoherent terms (noisy x) by about u ||x|| ||y||. Measured
  // with MKL on CIFAR rows the errors stay several times below this estimate in both
  // regimes; it is not a bound (rigorous_error is), so kLogitTol keeps a margin.
  double estimated_error(int64_t q, int64_t n, double m, double dot, double u) const {
    return 2.0 * m * u * (sqrt_d * std::abs(dot) + 3.0 * xn[q] * yn[n]) + 0x1p-50 * (nx[q] + m * m * ny[n]);
  }
};

// Online softmax state of one query over one slice of the training set.
struct RunningSoftmax {
  double max = -kInf;  // largest logit taken so far
  double sum = 0.0;    // sum of exp(logit - max)
};

// Scratch of one unit, reused across its tiles. L, E: (qb x tile) expansion logits and
// their rigorous error bounds and error estimates, in logit units.
template <typename T>
struct TileScratch {
  std::vector<T> rows, dots, weights;
  std::vector<double> rows64, x64, dots64, L, E, A, logits;
};

// Expansion logits of query q against tile rows [t0, t0 + nt) from its dot products
// (computed with unit roundoff u), with rigorous error bounds E and estimates A; excluded
// items get -inf.
template <typename T, typename S, typename Dot>
void expansion_logits(const Problem<T, S>& p, int64_t q, int64_t t0, int64_t nt, const Dot* dots, double u,
                      double* L, double* E, double* A) {
  const double m = p.scale[q], inv = 1.0 / (2.0 * p.sigma[q] * p.sigma[q]);
  for (int64_t c = 0; c < nt; ++c) {
    const int64_t n = t0 + c;
    if (p.excluded(q, n)) {
      L[c] = -kInf;
      E[c] = A[c] = 0.0;
      continue;
    }
    const double dot = static_cast<double>(dots[c]);
    L[c] = -(p.nx[q] + m * m * p.ny[n] - 2.0 * m * dot) * inv;
    E[c] = p.rigorous_error(q, n, m, dot, u) * inv;
    A[c] = p.estimated_error(q, n, m, dot, u) * inv;
  }
}

// Lower bound on the largest logit of the row so far: items more than kNegligible
// below it carry no weight.
inline double best_lower_bound(const double* L, const double* E, int64_t nt, double running_max) {
  double best = running_max;
  for (int64_t c = 0; c < nt; ++c) best = std::max(best, L[c] - E[c]);
  return best;
}

// How many items of the row matter but have a too inexact expansion logit.
inline int64_t count_inexact(const double* L, const double* E, const double* A, int64_t nt, double running_max,
                             double tol) {
  const double cut = best_lower_bound(L, E, nt, running_max) - kNegligible;
  int64_t count = 0;
  for (int64_t c = 0; c < nt; ++c) count += L[c] + E[c] >= cut && A[c] > tol;
  return count;
}

// Final logits of query q for the tile (skip the negligible, keep accurate expansion
// logits, recompute the rest by direct differences), the online softmax update, and the
// tile's weights exp(l - max) into w. Returns the number of nonzero weights and the
// factor the row's accumulator must be rescaled by (the max moved).
template <typename T, typename S>
std::pair<int64_t, double> softmax_row(const Problem<T, S>& p, int64_t q, int64_t t0, int64_t nt, const double* L,
                                       const double* E, const double* A, RunningSoftmax& st, double* l, T* w) {
  const double m = p.scale[q], inv = 1.0 / (2.0 * p.sigma[q] * p.sigma[q]);
  const double cut = best_lower_bound(L, E, nt, st.max) - kNegligible;
  double new_max = st.max;
  for (int64_t c = 0; c < nt; ++c) {
    if (!(L[c] + E[c] >= cut)) {
      l[c] = -kInf;
      continue;
    }
    const int64_t n = t0 + c;
    if (A[c] <= p.logit_tol)
      l[c] = L[c];
    else
      l[c] = -exact_sqdist(p.X + q * p.d, p.Y + n * p.d, m, p.d) * inv;
    new_max = std::max(new_max, l[c]);
  }
  double rescale = 1.0;
  if (new_max > st.max) {
    rescale = std::exp(st.max - new_max);  // 0 when st.max is -inf
    st.sum *= rescale;
    st.max = new_max;
  }
  int64_t nnz = 0;
  double sum = 0.0;
  for (int64_t c = 0; c < nt; ++c) {
    const double e = l[c] == -kInf ? 0.0 : std::exp(l[c] - st.max);
    w[c] = static_cast<T>(e);
    sum += e;
    nnz += e > 0.0;
  }
  st.sum += sum;
  return {nnz, rescale};
}

// Where many items of a float32 tile matter and their float32 logits are too inexact,
// one float64 GEMM for the tile costs about two float32 GEMMs, while direct differences
// cost a scalar-ish float64 pass over d per item. Recomputes L and E from it.
template <typename T, typename S>
void float64_expansion(const Problem<T, S>& p, int64_t q0, int64_t qb, int64_t t0, int64_t nt, TileScratch<T>& s) {
  const int64_t d = p.d;
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  if (s.x64.empty()) {
    s.x64.resize(qb * d);
    for (int64_t i = 0; i < qb * d; ++i) s.x64[i] = static_cast<double>(p.X[q0 * d + i]);
  }
  const double* rows = rows_as<double>(p.Y, t0, t0 + nt, d, s.rows64);
  s.dots64.resize(qb * nt);
  at::Tensor dots = at::from_blob(s.dots64.data(), {qb, nt}, f64);
  at::mm_out(dots, at::from_blob(s.x64.data(), {qb, d}, f64),
             at::from_blob(const_cast<double*>(rows), {nt, d}, f64).t());
  for (int64_t i = 0; i < qb; ++i)
    expansion_logits(p, q0 + i, t0, nt, s.dots64.data() + i * nt, 0x1p-53, s.L.data() + i * nt,
                     s.E.data() + i * nt, s.A.data() + i * nt);
}

// One unit: queries [q0, q1) over training rows [n0, n1). acc ((q1 - q0) x d) receives
// sum_n exp(l_n - max) y_n, states the running max and sum.
template <typename T, typename S>
void stream_unit(const Problem<T, S>& p, int64_t q0, int64_t q1, int64_t n0, int64_t n1, RunningSoftmax* states,
                 T* acc) {
  const int64_t qb = q1 - q0, d = p.d;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  TileScratch<T> s;
  s.dots.resize(qb * kTrainTile);
  s.weights.resize(qb * kTrainTile);
  s.L.resize(qb * kTrainTile);
  s.E.resize(qb * kTrainTile);
  s.A.resize(qb * kTrainTile);
  s.logits.resize(kTrainTile);
  std::fill(acc, acc + qb * d, T(0));
  const at::Tensor xb = at::from_blob(const_cast<T*>(p.X + q0 * d), {qb, d}, opts);
  at::Tensor acc_t = at::from_blob(acc, {qb, d}, opts);

  // Once a tile of this unit has needed the float64 GEMM, its queries' sigmas lie where
  // the float32 logits are too inexact, and the later tiles go to float64 directly
  // (skipping a float32 GEMM whose result would be thrown away).
  bool dense64 = false;
  for (int64_t t0 = n0; t0 < n1; t0 += kTrainTile) {
    const int64_t nt = std::min(n1, t0 + kTrainTile) - t0;
    const T* rows = rows_as<T>(p.Y, t0, t0 + nt, d, s.rows);
    const at::Tensor yt = at::from_blob(const_cast<T*>(rows), {nt, d}, opts);
    if (dense64) {
      float64_expansion(p, q0, qb, t0, nt, s);
    } else {
      at::Tensor dots = at::from_blob(s.dots.data(), {qb, nt}, opts);
      at::mm_out(dots, xb, yt.t());  // serial: we are inside the thread pool
      int64_t inexact = 0;
      for (int64_t i = 0; i < qb; ++i) {
        const int64_t o = i * nt;
        expansion_logits(p, q0 + i, t0, nt, s.dots.data() + o, unit_roundoff<T>(), s.L.data() + o, s.E.data() + o,
                         s.A.data() + o);
        inexact += count_inexact(s.L.data() + o, s.E.data() + o, s.A.data() + o, nt, states[i].max, p.logit_tol);
      }
      if constexpr (!std::is_same_v<T, double>) {
        if (inexact * 16 > qb * nt) {
          float64_expansion(p, q0, qb, t0, nt, s);
          dense64 = true;
        }
      }
    }

    int64_t nnz = 0;
    for (int64_t i = 0; i < qb; ++i) {
      const int64_t o = i * nt;
      auto [row_nnz, rescale] = softmax_row(p, q0 + i, t0, nt, s.L.data() + o, s.E.data() + o, s.A.data() + o,
                                            states[i], s.logits.data(), s.weights.data() + o);
      if (rescale != 1.0) {
        T* a = acc + i * d;
        for (int64_t f = 0; f < d; ++f) a[f] = static_cast<T>(a[f] * rescale);
      }
      nnz += row_nnz;
    }
    if (nnz == 0) continue;
    // acc += W Y: a GEMM when the weights are dense (large sigma), else only the rows that
    // carry weight (small sigma: a handful per query).
    if (nnz * 8 >= qb * nt) {
      const at::Tensor w = at::from_blob(s.weights.data(), {qb, nt}, opts);
      acc_t.addmm_(w, yt);
    } else {
      for (int64_t i = 0; i < qb; ++i) {
        T* a = acc + i * d;
        for (int64_t c = 0; c < nt; ++c) {
          const T wc = s.weights[i * nt + c];
          if (wc == T(0)) continue;
          const T* y = rows + c * d;
#pragma omp simd
          for (int64_t f = 0; f < d; ++f) a[f] += wc * y[f];
        }
      }
    }
  }
}

// Streaming softmax over all items (or a label's items): the default path.
template <typename T, typename S>
void denoise_streaming(const Problem<T, S>& p, T* D, double* lse) {
  const int64_t B = p.B, N = p.N, d = p.d;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t qb = std::min<int64_t>(B, kMaxQueryBlock);
  const int64_t q_blocks = (B + qb - 1) / qb;
  const int64_t tiles = (N + kTrainTile - 1) / kTrainTile;
  // Split N as well when there are fewer query blocks than threads (small batches).
  const int64_t slices = std::clamp<int64_t>((threads + q_blocks - 1) / q_blocks, 1, tiles);
  const int64_t tiles_per_slice = (tiles + slices - 1) / slices;
  std::vector<RunningSoftmax> states(static_cast<size_t>(slices * B));
  std::vector<T> acc(static_cast<size_t>(slices * B * d));

  at::parallel_for(0, q_blocks * slices, 1, [&](int64_t b, int64_t e) {
    for (int64_t u = b; u < e; ++u) {
      const int64_t qblk = u / slices, slice = u % slices;
      const int64_t q0 = qblk * qb, q1 = std::min(B, q0 + qb);
      const int64_t n0 = slice * tiles_per_slice * kTrainTile;
      const int64_t n1 = std::min(N, n0 + tiles_per_slice * kTrainTile);
      if (n0 >= n1) continue;  // states stay empty (max -inf, sum 0)
      stream_unit(p, q0, q1, n0, n1, states.data() + slice * B + q0, acc.data() + (slice * B + q0) * d);
    }
  });

  // Merge the slices: scale each by exp(max_s - max) and add; D = acc / sum.
  at::parallel_for(0, B, 1, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      double max = -kInf;
      for (int64_t s = 0; s < slices; ++s) max = std::max(max, states[s * B + q].max);
      double sum = 0.0;
      std::vector<double> out(d, 0.0);
      for (int64_t s = 0; s < slices; ++s) {
        const RunningSoftmax& st = states[s * B + q];
        if (st.sum == 0.0) continue;
        const double f = std::exp(st.max - max);
        sum += st.sum * f;
        const T* a = acc.data() + (s * B + q) * d;
        for (int64_t i = 0; i < d; ++i) out[i] += f * static_cast<double>(a[i]);
      }
      lse[q] = sum > 0.0 ? max + std::log(sum) : -kInf;
      for (int64_t i = 0; i < d; ++i) D[q * d + i] = static_cast<T>(out[i] / sum);
    }
  });
}

// ---- top-k restricted softmax ----------------------------------------------------------
// The k nearest items by exact (float64 direct-difference) distance, ties by smaller
// index, found with the expansion's rigorous lower bounds as a filter; then the softmax
// over them in float64.
constexpr int64_t kTopkQueryBlock = 8;

template <typename T, typename S>
void denoise_topk(const Problem<T, S>& p, int64_t k, T* D, double* lse) {
  const int64_t B = p.B, N = p.N, d = p.d;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const int64_t q_blocks = (B + kTopkQueryBlock - 1) / kTopkQueryBlock;
  at::parallel_for(0, q_blocks, 1, [&](int64_t b, int64_t e) {
    std::vector<T> rows_buf, dots(kTopkQueryBlock * kTrainTile);
    using Entry = std::pair<double, int64_t>;  // (squared distance, index): max-heap
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t q0 = blk * kTopkQueryBlock, q1 = std::min(B, q0 + kTopkQueryBlock), qb = q1 - q0;
      std::vector<std::vector<Entry>> heaps(qb);
      for (auto& h : heaps) h.reserve(k);
      const at::Tensor xb = at::from_blob(const_cast<T*>(p.X + q0 * d), {qb, d}, opts);
      for (int64_t t0 = 0; t0 < N; t0 += kTrainTile) {
        const int64_t nt = std::min(N, t0 + kTrainTile) - t0;
        const T* rows = rows_as<T>(p.Y, t0, t0 + nt, d, rows_buf);
        const at::Tensor yt = at::from_blob(const_cast<T*>(rows), {nt, d}, opts);
        at::Tensor dt = at::from_blob(dots.data(), {qb, nt}, opts);
        at::mm_out(dt, xb, yt.t());
        for (int64_t i = 0; i < qb; ++i) {
          const int64_t q = q0 + i;
          const double m = p.scale[q];
          auto& h = heaps[i];
          for (int64_t c = 0; c < nt; ++c) {
            const int64_t n = t0 + c;
            if (p.excluded(q, n)) continue;
            if (static_cast<int64_t>(h.size()) == k) {
              const double dot = static_cast<double>(dots[i * nt + c]);
              const double a = p.nx[q] + m * m * p.ny[n] - 2.0 * m * dot;
              if (a - p.rigorous_error(q, n, m, dot, unit_roundoff<T>()) > h.front().first) continue;
            }
            const Entry cand{exact_sqdist(p.X + q * d, p.Y + n * d, m, d), n};
            if (static_cast<int64_t>(h.size()) < k) {
              h.push_back(cand);
              std::push_heap(h.begin(), h.end());
            } else if (cand < h.front()) {  // items come in increasing index: ties keep the earlier
              std::pop_heap(h.begin(), h.end());
              h.back() = cand;
              std::push_heap(h.begin(), h.end());
            }
          }
        }
      }
      for (int64_t i = 0; i < qb; ++i) {
        const int64_t q = q0 + i;
        const double inv = 1.0 / (2.0 * p.sigma[q] * p.sigma[q]);
        const auto& h = heaps[i];
        double max = -kInf;
        for (const Entry& en : h) max = std::max(max, -en.first * inv);
        double sum = 0.0;
        std::vector<double> out(d, 0.0);
        for (const Entry& en : h) {
          const double w = std::exp(-en.first * inv - max);
          sum += w;
          const S* y = p.Y + en.second * d;
          for (int64_t f = 0; f < d; ++f) out[f] += w * exact_value(y[f]);
        }
        lse[q] = sum > 0.0 ? max + std::log(sum) : -kInf;
        for (int64_t f = 0; f < d; ++f) D[q * d + f] = static_cast<T>(out[f] / sum);
      }
    }
  });
}

template <typename T, typename S>
void run(const at::Tensor& X, const at::Tensor& Y, const at::Tensor& sigma, const at::Tensor& scale,
         const at::Tensor* labels, const at::Tensor* train_labels, int64_t topk, at::Tensor& D, at::Tensor& lse) {
  Problem<T, S> p{X.const_data_ptr<T>(),
                  Y.const_data_ptr<S>(),
                  X.size(0),
                  Y.size(0),
                  X.size(1),
                  sigma.const_data_ptr<double>(),
                  scale.const_data_ptr<double>(),
                  labels ? labels->const_data_ptr<int64_t>() : nullptr,
                  train_labels ? train_labels->const_data_ptr<int64_t>() : nullptr,
                  {},
                  {},
                  {},
                  {}};
  p.nx = row_sqnorms(p.X, p.B, p.d);
  p.ny = row_sqnorms(p.Y, p.N, p.d);
  // The norms pass reads every training value anyway: NaN/inf show up here for free.
  // (TORCH_CHECK_VALUE raises ValueError in Python.)
  TORCH_CHECK_VALUE(std::all_of(p.ny.begin(), p.ny.end(), [](double v) { return std::isfinite(v); }),
                    "optimal_denoise: train contains NaN or inf");
  TORCH_CHECK_VALUE(std::all_of(p.nx.begin(), p.nx.end(), [](double v) { return std::isfinite(v); }),
                    "optimal_denoise: x contains NaN or inf");
  p.xn.resize(p.B);
  p.yn.resize(p.N);
  for (int64_t q = 0; q < p.B; ++q) p.xn[q] = std::sqrt(p.nx[q]);
  for (int64_t n = 0; n < p.N; ++n) p.yn[n] = std::sqrt(p.ny[n]);
  if (topk > 0)
    denoise_topk(p, topk, D.mutable_data_ptr<T>(), lse.mutable_data_ptr<double>());
  else
    denoise_streaming(p, D.mutable_data_ptr<T>(), lse.mutable_data_ptr<double>());
}

template <typename T>
void dispatch_train(const at::Tensor& X, const at::Tensor& Y, const at::Tensor& sigma, const at::Tensor& scale,
                    const at::Tensor* labels, const at::Tensor* train_labels, int64_t topk, at::Tensor& D,
                    at::Tensor& lse) {
  switch (Y.scalar_type()) {
    case at::kByte:
      return run<T, uint8_t>(X, Y, sigma, scale, labels, train_labels, topk, D, lse);
    case at::kBFloat16:
      return run<T, c10::BFloat16>(X, Y, sigma, scale, labels, train_labels, topk, D, lse);
    case at::kFloat:
      return run<T, float>(X, Y, sigma, scale, labels, train_labels, topk, D, lse);
    default:
      if constexpr (std::is_same_v<T, double>) return run<T, double>(X, Y, sigma, scale, labels, train_labels, topk, D, lse);
      TORCH_CHECK(false, "optimal_denoise: unsupported train dtype");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> optimal_denoise_cpu(const at::Tensor& x, const at::Tensor& train,
                                                       const at::Tensor& sigma, const at::Tensor& scale,
                                                       const std::optional<at::Tensor>& labels,
                                                       const std::optional<at::Tensor>& train_labels,
                                                       int64_t topk) {
  check_inputs(x, train, sigma, scale, labels, train_labels, topk);
  const at::Tensor X = x.contiguous(), Y = train.contiguous();
  const at::Tensor sg = sigma.contiguous(), sc = scale.contiguous();
  at::Tensor lab, tlab;
  if (labels.has_value()) {
    lab = labels->contiguous();
    tlab = train_labels->contiguous();
  }
  at::Tensor D = at::empty_like(X);
  at::Tensor lse = at::empty({X.size(0)}, X.options().dtype(at::kDouble));
  const at::Tensor* lp = labels.has_value() ? &lab : nullptr;
  const at::Tensor* tp = labels.has_value() ? &tlab : nullptr;
  if (X.scalar_type() == at::kDouble)
    dispatch_train<double>(X, Y, sg, sc, lp, tp, topk, D, lse);
  else
    dispatch_train<float>(X, Y, sg, sc, lp, tp, topk, D, lse);
  TORCH_CHECK(bool(at::isfinite(lse).all().item<bool>()),
              "optimal_denoise: a query has no training item to average over (no item with its label?)");
  return {D, lse};
}

TORCH_LIBRARY_IMPL(diffmem, CPU, m) { m.impl("optimal_denoise", &optimal_denoise_cpu); }

}  // namespace diffmem::denoiser
