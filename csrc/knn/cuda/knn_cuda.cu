// CUDA implementation of diffmem::knn_topk (exact k nearest neighbours under
// squared Euclidean distance).
//
//   knn_topk(Tensor queries, Tensor refs, int k) -> (Tensor sqdist, Tensor idx)
//
// queries (Q, d), refs (N, d): contiguous CUDA tensors of the same dtype
// (uint8, float32 or float64).  Output rows are sorted ascending by
// (sqdist, idx); sqdist is int64 for uint8 input and float64 otherwise.
//
// The Q x N distance matrix is never materialised: refs (outer loop) and
// queries (inner loop) are processed in tiles, and a per-query running top-k
// state of O(Q * k) lives in global memory between tiles.
//
// uint8 path (exact):
//   x' = x - 128 (int8; distances are shift invariant), d padded to a multiple
//   of 16 with zeros.  Per tile dot = x'.y'^T via at::_int_mm (int8 tensor
//   cores, int32 out), then a fused kernel computes
//   dist = |x'|^2 + |y'|^2 - 2 x'.y' and merges it into the running top-k.
//   Candidates are 64-bit keys (dist << s) | idx with s = bits(N - 1), so the
//   order of keys is exactly the lexicographic order of (dist, idx).
//
// float path (float32 / float64):
//   per tile dot via at::mm (TF32 disabled), an interval [lo, hi] that
//   rigorously contains the true distance, a running list of the L smallest
//   lo (candidates) and of the k smallest hi (U = k-th smallest hi is an upper
//   bound of the k-th distance).  A query is verified when every
//   non-candidate has lo > U; then its candidates are re-ranked with exact
//   float64 direct differences.  Unverified queries are brute forced exactly.
//
// Testing knobs (environment variables, read on every call):
//   DIFFMEM_KNN_TILE_Q, DIFFMEM_KNN_TILE_N : tile sizes (rows of queries / refs)
//   DIFFMEM_KNN_FORCE_FALLBACK=1           : float path, brute force all queries

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <math_constants.h>

#include "common/matmul_precision.h"
#include "knn/knn.h"

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <type_traits>

namespace diffmem::knn {

namespace {

// ---------------------------------------------------------------------------
// constants and small helpers
// ---------------------------------------------------------------------------

constexpr unsigned kFullMask = 0xffffffffu;
constexpr uint64_t kKeyMax = ~0ull;   // empty slot / "+infinity" key
constexpr int kWarpsPerBlock = 8;     // one warp per query row
constexpr int kBuf = 128;             // per-warp candidate buffer (keys)
constexpr int kU8Groups = 4;          // uint8 fuse: 4 x 128 columns per iteration
constexpr int kFGroups = 4;           // float fuse: 4 x 32 columns per iteration

// Largest d for which the uint8 distance (<= d * 255^2) fits in 32 bits
// (and |x'.y'| <= d * 2^14 cannot overflow the int32 GEMM accumulator).
constexpr int64_t kU8NarrowMaxD = 66051;
// d-chunk for the wide uint8 path: |dot| <= 65536 * 2^14 = 2^30 per chunk.
constexpr int64_t kU8WideChunk = 65536;

constexpr int64_t kDefaultTileQ = 4096;
constexpr int64_t kDefaultTileN = 2048;   // 4096 x 2048 x 4 B = 32 MiB tiles

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

inline int64_t env_int(const char* name, int64_t def) {
  const char* s = std::getenv(name);
  if (s == nullptr || *s == '\0') return def;
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  if (end == s || v <= 0) return def;
  return static_cast<int64_t>(v);
}

// Number of bits needed to store any index in [0, n) (at least 1).
inline int index_bits(int64_t n) {
  int b = 1;
  while (b < 63 && (int64_t{1} << b) < n) ++b;
  return b;
}

__device__ __forceinline__ uint64_t umin64(uint64_t a, uint64_t b) { return a < b ? a : b; }
__device__ __forceinline__ uint64_t umax64(uint64_t a, uint64_t b) { return a < b ? b : a; }

// Order-preserving map double -> uint64 (for non-NaN values).
__device__ __forceinline__ uint64_t ord_double(double x) {
  const uint64_t b = static_cast<uint64_t>(__double_as_longlong(x));
  return (b >> 63) ? ~b : (b | 0x8000000000000000ull);
}

// ---------------------------------------------------------------------------
// Warp-level sorted lists of 64-bit keys.
//
// A list of L = 32 * LPL keys is held in registers, element i = r * 32 + lane
// in v[r], sorted ascending over i.  Keys are unique (they embed the ref
// index), so "the L smallest keys seen" is well defined and independent of the
// order in which candidates arrive: this is what makes the result
// deterministic and the tie rule (smaller index first) exact.
// ---------------------------------------------------------------------------

// Ascending bitonic sort of one key per lane across the warp.
__device__ __forceinline__ uint64_t warp_sort32(uint64_t x, int lane) {
#pragma unroll
  for (int size = 2; size <= 32; size <<= 1) {
#pragma unroll
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      const uint64_t o = __shfl_xor_sync(kFullMask, x, stride);
      const bool asc = (lane & size) == 0;
      const bool lower = (lane & stride) == 0;
      x = (asc == lower) ? umin64(x, o) : umax64(x, o);
    }
  }
  return x;
}

// v <- the L smallest of (v ∪ chunk); chunk is sorted ascending across lanes.
// min(A[i], B[L-1-i]) of two ascending sequences is bitonic and holds the L
// smallest elements; B is the chunk padded with +inf, so only the last row is
// touched.  A bitonic merge then restores ascending order.
template <int LPL>
__device__ __forceinline__ void warp_merge(uint64_t (&v)[LPL], uint64_t chunk_sorted, int lane) {
  const uint64_t rev = __shfl_sync(kFullMask, chunk_sorted, 31 - lane);
  v[LPL - 1] = umin64(v[LPL - 1], rev);
#pragma unroll
  for (int s = LPL / 2; s >= 1; s >>= 1) {
#pragma unroll
    for (int r = 0; r < LPL; ++r) {
      if ((r & s) == 0) {
        const uint64_t a = v[r];
        const uint64_t b = v[r + s];
        v[r] = umin64(a, b);
        v[r + s] = umax64(a, b);
      }
    }
  }
#pragma unroll
  for (int s = 16; s >= 1; s >>= 1) {
#pragma unroll
    for (int r = 0; r < LPL; ++r) {
      const uint64_t o = __shfl_xor_sync(kFullMask, v[r], s);
      v[r] = ((lane & s) == 0) ? umin64(v[r], o) : umax64(v[r], o);
    }
  }
}

// Element `pos` (warp uniform) of the list.
template <int LPL>
__device__ __forceinline__ uint64_t list_get(const uint64_t (&v)[LPL], int pos) {
  uint64_t x = v[0];
#pragma unroll
  for (int r = 1; r < LPL; ++r) {
    if ((pos >> 5) == r) x = v[r];
  }
  return __shfl_sync(kFullMask, x, pos & 31);
}

// Merge the n buffered keys into the list, 32 at a time.
template <int LPL>
__device__ __forceinline__ void warp_flush(uint64_t (&v)[LPL], const uint64_t* buf, int n,
                                           int thr_pos, int lane) {
  __syncwarp();
  for (int c0 = 0; c0 < n; c0 += 32) {
    const uint64_t thr = list_get<LPL>(v, thr_pos);
    uint64_t x = (c0 + lane < n) ? buf[c0 + lane] : kKeyMax;
    if (x >= thr) x = kKeyMax;  // stale candidate (threshold moved)
    if (__any_sync(kFullMask, x != kKeyMax)) {
      x = warp_sort32(x, lane);
      warp_merge<LPL>(v, x, lane);
    }
  }
  __syncwarp();
}

// Append the keys of the lanes with p set to the warp's buffer (at most 32 per
// call).  When the buffer would overflow, it is merged into the list first and
// the threshold (element thr_pos of the list) is refreshed.
template <int LPL>
__device__ __forceinline__ void warp_push(bool p, uint64_t key, uint64_t* buf, int& n,
                                          uint64_t (&v)[LPL], uint64_t& thr, int thr_pos,
                                          int lane) {
  unsigned b = __ballot_sync(kFullMask, p);
  if (b == 0u) return;
  int cnt = __popc(b);
  if (n + cnt > kBuf) {
    warp_flush<LPL>(v, buf, n, thr_pos, lane);
    n = 0;
    thr = list_get<LPL>(v, thr_pos);
    p = p && (key < thr);
    b = __ballot_sync(kFullMask, p);
    cnt = __popc(b);
  }
  if (p) buf[n + __popc(b & ((1u << lane) - 1u))] = key;
  n += cnt;
}

// ---------------------------------------------------------------------------
// uint8 path kernels
// ---------------------------------------------------------------------------

template <bool WIDE>
struct U8Types;
template <>
struct U8Types<false> {
  using Dot = int32_t;
  using Norm = uint32_t;  // also the distance type (wrap-around arithmetic)
};
template <>
struct U8Types<true> {
  using Dot = int64_t;
  using Norm = uint64_t;
};

// Convert rows [0, rows_valid) of src (uint8, row length d) to int8 (x - 128)
// rows of length D8 (zero padded), rows [rows_valid, rows_total) are zero.
// norms[r] = ||x'_r||^2.  One warp per row.
template <typename NormT>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
u8_convert_kernel(const uint8_t* __restrict__ src, int64_t rows_valid, int64_t rows_total,
                  int64_t d, int64_t D8, bool word_path, int8_t* __restrict__ dst,
                  NormT* __restrict__ norms) {
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (r >= rows_total) return;
  int8_t* drow = dst + r * D8;
  long long acc = 0;
  if (r < rows_valid) {
    const uint8_t* srow = src + r * d;
    if (word_path) {
      // d % 4 == 0 and src 4-byte aligned: 4 bytes per lane per step.
      const uint32_t* s4 = reinterpret_cast<const uint32_t*>(srow);
      uint32_t* d4 = reinterpret_cast<uint32_t*>(drow);
      const int64_t nw = d >> 2;
      const int64_t nw8 = D8 >> 2;
      for (int64_t w = lane; w < nw8; w += 32) {
        const uint32_t x = (w < nw) ? (s4[w] ^ 0x80808080u) : 0u;
        d4[w] = x;
        acc += __dp4a(static_cast<int>(x), static_cast<int>(x), 0);
      }
    } else {
      for (int64_t c = lane; c < D8; c += 32) {
        const int x = (c < d) ? static_cast<int>(static_cast<int8_t>(srow[c] ^ 0x80u)) : 0;
        drow[c] = static_cast<int8_t>(x);
        acc += x * x;
      }
    }
  } else {
    for (int64_t c = lane; c < D8; c += 32) drow[c] = 0;
  }
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) acc += __shfl_xor_sync(kFullMask, acc, o);
  if (lane == 0) norms[r] = static_cast<NormT>(acc);
}

// One warp per query row of a (query tile x ref tile) block of dot products:
// dist = nx + ny - 2 dot, key = (dist << shift) | global ref index, merged into
// the row's running top-k state (k sorted keys, global memory).
//
// dot: row-major, leading dimension ld (multiple of 8), rows [0, rows) used.
// nyt: norms of the ref tile rows (>= round_up(ncols, 8) entries, padded).
template <bool WIDE>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
u8_fuse_kernel(const typename U8Types<WIDE>::Dot* __restrict__ dot, int64_t ld,
               const typename U8Types<WIDE>::Norm* __restrict__ nx,
               const typename U8Types<WIDE>::Norm* __restrict__ nyt, int64_t q0, int rows,
               int64_t col0, int ncols, int k, int shift, uint64_t* __restrict__ state) {
  using Dist = typename U8Types<WIDE>::Norm;
  __shared__ uint64_t sbuf[kWarpsPerBlock][kBuf];

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int r = blockIdx.x * kWarpsPerBlock + warp;
  if (r >= rows) return;  // warp uniform
  const int64_t q = q0 + r;

  uint64_t* st = state + q * k;
  uint64_t v[1];
  v[0] = (lane < k) ? st[lane] : kKeyMax;
  uint64_t thr = list_get<1>(v, k - 1);
  uint64_t* buf = sbuf[warp];
  int n = 0;

  const Dist nxq = nx[q];
  const auto* drow = dot + static_cast<int64_t>(r) * ld;

  for (int base = 0; base < ncols; base += 128 * kU8Groups) {
    Dist dist[kU8Groups][4];
#pragma unroll
    for (int g = 0; g < kU8Groups; ++g) {
      const int jl = base + g * 128 + lane * 4;
      if (jl < ncols) {  // jl % 4 == 0 and ld, padded width % 8 == 0: jl + 3 is in bounds
        if constexpr (WIDE) {
          const longlong2 a = *reinterpret_cast<const longlong2*>(drow + jl);
          const longlong2 b = *reinterpret_cast<const longlong2*>(drow + jl + 2);
          const ulonglong2 na = *reinterpret_cast<const ulonglong2*>(nyt + jl);
          const ulonglong2 nb = *reinterpret_cast<const ulonglong2*>(nyt + jl + 2);
          dist[g][0] = nxq + na.x - 2ull * static_cast<uint64_t>(a.x);
          dist[g][1] = nxq + na.y - 2ull * static_cast<uint64_t>(a.y);
          dist[g][2] = nxq + nb.x - 2ull * static_cast<uint64_t>(b.x);
          dist[g][3] = nxq + nb.y - 2ull * static_cast<uint64_t>(b.y);
        } else {
          // Exact modulo 2^32 and the true distance is < 2^32.
          const int4 a = __ldcs(reinterpret_cast<const int4*>(drow + jl));
          const uint4 na = __ldg(reinterpret_cast<const uint4*>(nyt + jl));
          dist[g][0] = nxq + na.x - 2u * static_cast<uint32_t>(a.x);
          dist[g][1] = nxq + na.y - 2u * static_cast<uint32_t>(a.y);
          dist[g][2] = nxq + na.z - 2u * static_cast<uint32_t>(a.z);
          dist[g][3] = nxq + na.w - 2u * static_cast<uint32_t>(a.w);
        }
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) dist[g][i] = 0;
      }
    }
#pragma unroll
    for (int g = 0; g < kU8Groups; ++g) {
      const int jl = base + g * 128 + lane * 4;
      // Cheap pre-filter on the distance part of the threshold key.
      const uint64_t td64 = thr >> shift;
      constexpr Dist kDistMax = static_cast<Dist>(~Dist{0});
      const Dist td = td64 > static_cast<uint64_t>(kDistMax) ? kDistMax : static_cast<Dist>(td64);
      bool p[4];
      bool anyp = false;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        p[i] = (jl + i < ncols) && (dist[g][i] <= td);
        anyp = anyp || p[i];
      }
      if (!__any_sync(kFullMask, anyp)) continue;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint64_t key = (static_cast<uint64_t>(dist[g][i]) << shift) |
                             static_cast<uint64_t>(col0 + jl + i);
        warp_push<1>(p[i] && key < thr, key, buf, n, v, thr, k - 1, lane);
      }
    }
  }
  if (n > 0) warp_flush<1>(v, buf, n, k - 1, lane);
  if (lane < k) st[lane] = v[0];
}

__global__ void decode_keys_kernel(const uint64_t* __restrict__ keys, int64_t n, int shift,
                                   int64_t* __restrict__ dist, int64_t* __restrict__ idx) {
  const uint64_t mask = (1ull << shift) - 1ull;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t key = keys[i];
    dist[i] = static_cast<int64_t>(key >> shift);
    idx[i] = static_cast<int64_t>(key & mask);
  }
}

// ---------------------------------------------------------------------------
// float path kernels
// ---------------------------------------------------------------------------

// out[r] = sum_c x[r, c]^2 in float64.  One warp per row.
template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
row_sqnorm_kernel(const T* __restrict__ x, int64_t rows, int64_t d, double* __restrict__ out) {
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (r >= rows) return;
  const T* xr = x + r * d;
  double acc = 0.0;
  for (int64_t c = lane; c < d; c += 32) {
    const double v = static_cast<double>(xr[c]);
    acc = fma(v, v, acc);
  }
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) acc += __shfl_xor_sync(kFullMask, acc, o);
  if (lane == 0) out[r] = acc;
}

// One warp per query row of a tile of dot products (row-major, leading dim ld).
// For each ref j: a = nx + ny - 2 dot, e = rigorous bound of |a - dist|,
// lo = a - e (rounded down), hi = a + e (rounded up).  Keys embed the ref
// index; lo keys are truncated (rounded down), hi keys rounded up, so they
// remain rigorous bounds.
//   lo list: the L smallest lo keys among the refs with lo <= current U,
//            L - 1 candidates + the smallest dropped one (element L - 1);
//   hi list: the k smallest hi keys; U = element k - 1.
template <typename T, int LPL>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
float_fuse_kernel(const T* __restrict__ dot, int64_t ld, const double* __restrict__ nx,
                  const double* __restrict__ xn, const double* __restrict__ ny,
                  const double* __restrict__ yn, int64_t q0, int rows, int64_t col0, int ncols,
                  int k, int shift, double c1, double c2, double c3, double c4,
                  uint64_t* __restrict__ lo_state, uint64_t* __restrict__ hi_state) {
  constexpr int L = 32 * LPL;
  __shared__ uint64_t sbuf[kWarpsPerBlock][2][kBuf];

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int r = blockIdx.x * kWarpsPerBlock + warp;
  if (r >= rows) return;  // warp uniform
  const int64_t q = q0 + r;
  const uint64_t mask = (1ull << shift) - 1ull;

  uint64_t* lst = lo_state + q * L;
  uint64_t* hst = hi_state + q * k;
  uint64_t lov[LPL];
#pragma unroll
  for (int rr = 0; rr < LPL; ++rr) lov[rr] = lst[rr * 32 + lane];
  uint64_t hv[1];
  hv[0] = (lane < k) ? hst[lane] : kKeyMax;
  uint64_t thr_lo = list_get<LPL>(lov, L - 1);
  uint64_t thr_hi = list_get<1>(hv, k - 1);
  uint64_t* lbuf = sbuf[warp][0];
  uint64_t* hbuf = sbuf[warp][1];
  int nlo = 0, nhi = 0;

  const double nxq = nx[q];
  const double xnq = xn[q];
  const double c1x = c1 * xnq;
  const T* drow = dot + static_cast<int64_t>(r) * ld;

  for (int base = 0; base < ncols; base += 32 * kFGroups) {
    double dd[kFGroups], nyv[kFGroups], ynv[kFGroups];
#pragma unroll
    for (int g = 0; g < kFGroups; ++g) {
      const int j = base + g * 32 + lane;
      if (j < ncols) {
        dd[g] = static_cast<double>(drow[j]);
        nyv[g] = ny[col0 + j];
        ynv[g] = yn[col0 + j];
      } else {
        dd[g] = 0.0;
        nyv[g] = 0.0;
        ynv[g] = 0.0;
      }
    }
#pragma unroll
    for (int g = 0; g < kFGroups; ++g) {
      const int j = base + g * 32 + lane;
      const bool valid = j < ncols;
      if (!__any_sync(kFullMask, valid)) break;  // later groups are empty too
      const double s = nxq + nyv[g];
      const double a = fma(-2.0, dd[g], s);
      const double e = fma(c1x, ynv[g], fma(c2, s, fma(c3, xnq + ynv[g], c4)));
      double lo = __dsub_rd(a, e);
      double hi = __dadd_ru(a, e);
      if (lo == 0.0) lo = 0.0;  // canonicalise -0
      if (hi == 0.0) hi = 0.0;
      const uint64_t jj = static_cast<uint64_t>(col0 + j);
      const uint64_t lo_key = (ord_double(lo) & ~mask) | jj;
      uint64_t ho = ord_double(hi);
      ho = (ho > kKeyMax - mask) ? (kKeyMax & ~mask) : ((ho + mask) & ~mask);
      const uint64_t hi_key = ho | jj;

      warp_push<1>(valid && hi_key < thr_hi, hi_key, hbuf, nhi, hv, thr_hi, k - 1, lane);
      // Refs with lo > U (current, hence >= final U) can never be in the
      // result; they are not candidates and do not count as dropped.
      const uint64_t ucap = thr_hi | mask;
      warp_push<LPL>(valid && lo_key < thr_lo && lo_key <= ucap, lo_key, lbuf, nlo, lov,
                     thr_lo, L - 1, lane);
    }
  }
  if (nhi > 0) warp_flush<1>(hv, hbuf, nhi, k - 1, lane);
  if (nlo > 0) warp_flush<LPL>(lov, lbuf, nlo, L - 1, lane);
#pragma unroll
  for (int rr = 0; rr < LPL; ++rr) lst[rr * 32 + lane] = lov[rr];
  if (lane < k) hst[lane] = hv[0];
}

// acc + df^2 rounded twice, never contracted into an fma: summed in feature order, this
// is bit for bit what the CPU path computes, so both devices return the same indices even
// where distances tie to the last bit.
__device__ __forceinline__ double add_square(double acc, double df) { return __dadd_rn(acc, __dmul_rn(df, df)); }

// ||x - y||^2 by direct differences in float64, in feature order.
template <typename T>
__device__ __forceinline__ double exact_sqdist(const T* __restrict__ x, const T* __restrict__ y, int64_t d) {
  double acc = 0.0;
  for (int64_t i = 0; i < d; ++i) acc = add_square(acc, static_cast<double>(x[i]) - static_cast<double>(y[i]));
  return acc;
}

// One block per query.  Decides whether the query is verified and, if so,
// computes exact float64 distances (direct differences) of its candidates
// with lo <= U, one thread per candidate.  Unused slots get (+inf, INT64_MAX).
template <typename T, int LPL>
__global__ void __launch_bounds__(128)
float_rerank_kernel(const T* __restrict__ X, const T* __restrict__ Y, int64_t d,
                    const uint64_t* __restrict__ lo_state, const uint64_t* __restrict__ hi_state,
                    int k, int shift, bool force_fallback, double* __restrict__ cand_d,
                    int64_t* __restrict__ cand_i, uint8_t* __restrict__ verified) {
  constexpr int L = 32 * LPL;
  constexpr int C = L - 1;
  const int64_t q = blockIdx.x;
  const uint64_t mask = (1ull << shift) - 1ull;

  const uint64_t u_part = hi_state[q * k + (k - 1)] >> shift;
  const uint64_t drop_part = lo_state[q * L + (L - 1)] >> shift;
  const bool ok = !force_fallback && (drop_part > u_part);
  if (threadIdx.x == 0) verified[q] = ok ? 1 : 0;

  const T* x = X + q * d;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const uint64_t key = lo_state[q * L + c];
    const bool use = ok && key != kKeyMax && (key >> shift) <= u_part;
    double s = CUDART_INF;
    int64_t idx = INT64_MAX;
    if (use) {
      idx = static_cast<int64_t>(key & mask);
      s = exact_sqdist(x, Y + idx * d, d);
    }
    cand_d[q * C + c] = s;
    cand_i[q * C + c] = idx;
  }
}

// Exact float64 distances out[i, j] = sum_c (x_i - y_j)^2 (direct
// differences, summed in feature order with add_square) for a block of queries
// and refs.  64 x 64 outputs per block, 16 x 16 threads, 4 x 4 outputs per thread.
constexpr int kEdTile = 64;
constexpr int kEdK = 16;

template <typename T>
__global__ void __launch_bounds__(256)
exact_dist_kernel(const T* __restrict__ X, int64_t nq, const T* __restrict__ Y, int64_t nr,
                  int64_t d, double* __restrict__ out, int64_t ldo) {
  __shared__ double xs[kEdK][kEdTile + 1];
  __shared__ double ys[kEdK][kEdTile + 1];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int tid = ty * 16 + tx;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kEdTile;
  const int64_t colr0 = static_cast<int64_t>(blockIdx.x) * kEdTile;
  double acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0;

  for (int64_t k0 = 0; k0 < d; k0 += kEdK) {
#pragma unroll
    for (int t = 0; t < (kEdTile * kEdK) / 256; ++t) {
      const int lin = tid + t * 256;
      const int rr = lin / kEdK;
      const int cc = lin % kEdK;
      const int64_t gc = k0 + cc;
      const int64_t gx = row0 + rr;
      const int64_t gy = colr0 + rr;
      xs[cc][rr] = (gx < nq && gc < d) ? static_cast<double>(X[gx * d + gc]) : 0.0;
      ys[cc][rr] = (gy < nr && gc < d) ? static_cast<double>(Y[gy * d + gc]) : 0.0;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kEdK; ++kk) {
      double xv[4], yv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) xv[i] = xs[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) yv[j] = ys[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          acc[i][j] = add_square(acc[i][j], xv[i] - yv[j]);
        }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t gi = row0 + ty + 16 * i;
    if (gi >= nq) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gj = colr0 + tx + 16 * j;
      if (gj < nr) out[gi * ldo + gj] = acc[i][j];
    }
  }
}

// ---------------------------------------------------------------------------
// host helpers
// ---------------------------------------------------------------------------

inline unsigned grid_for_rows(int64_t rows) {
  const int64_t b = ceil_div(rows, kWarpsPerBlock);
  TORCH_CHECK(b <= std::numeric_limits<int>::max(), "knn_topk: too many rows for one launch (", rows, ")");
  return static_cast<unsigned>(b);
}

// ---------------------------------------------------------------------------
// uint8 path
// ---------------------------------------------------------------------------

template <bool WIDE>
std::tuple<at::Tensor, at::Tensor> topk_u8_impl(const at::Tensor& X, const at::Tensor& Y,
                                                int64_t k) {
  using NormT = typename U8Types<WIDE>::Norm;
  using DotT = typename U8Types<WIDE>::Dot;
  const int64_t Q = X.size(0);
  const int64_t N = Y.size(0);
  const int64_t d = X.size(1);
  // Padded width: a multiple of 16 (not just the 8 that _int_mm requires) so
  // that every row, hence every query tile, starts 16-byte aligned.
  const int64_t D8 = round_up(d, 16);
  const int shift = index_bits(N);
  {
    const uint64_t maxdist = static_cast<uint64_t>(d) * 65025ull;
    TORCH_CHECK(maxdist < (kKeyMax >> shift), "knn_topk: problem too large for 64-bit keys");
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto dev = X.device();
  const auto norm_dtype = WIDE ? at::kLong : at::kInt;
  const auto dot_dtype = WIDE ? at::kLong : at::kInt;

  int64_t Qt = std::min<int64_t>(env_int("DIFFMEM_KNN_TILE_Q", kDefaultTileQ), Q);
  // Ref tiles padded to a multiple of 16 columns: _int_mm asks for 8, but its own tests
  // never use fewer than 16, and the padding costs nothing.
  int64_t Nt = round_up(env_int("DIFFMEM_KNN_TILE_N", kDefaultTileN), 16);
  Nt = std::min<int64_t>(Nt, round_up(N, 16));
  const int64_t mq_max = std::max<int64_t>(Qt, 17);

  // Queries: converted once (Q + 16 rows so that a tile can always be padded
  // to the m > 16 that _int_mm requires; extra rows are zero).
  at::Tensor Xq = at::empty({Q + 16, D8}, X.options().dtype(at::kChar));
  at::Tensor nx = at::empty({Q + 16}, X.options().dtype(norm_dtype));
  const bool x_word = (d % 4 == 0) && (reinterpret_cast<uintptr_t>(X.data_ptr()) % 4 == 0);
  const bool y_word = (d % 4 == 0) && (reinterpret_cast<uintptr_t>(Y.data_ptr()) % 4 == 0);
  u8_convert_kernel<NormT><<<grid_for_rows(Q + 16), kWarpsPerBlock * 32, 0, stream>>>(
      X.data_ptr<uint8_t>(), Q, Q + 16, d, D8, x_word, Xq.data_ptr<int8_t>(),
      reinterpret_cast<NormT*>(nx.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Tile buffers.
  at::Tensor Yt = at::empty({Nt * D8}, X.options().dtype(at::kChar));
  at::Tensor nyt = at::empty({Nt}, X.options().dtype(norm_dtype));
  at::Tensor Cbuf = at::empty({mq_max * Nt}, X.options().dtype(dot_dtype));
  at::Tensor Cbuf32;
  if (WIDE) Cbuf32 = at::empty({mq_max * Nt}, X.options().dtype(at::kInt));

  at::Tensor state = at::full({Q, k}, -1, X.options().dtype(at::kLong));  // all keys = max
  uint64_t* state_ptr = reinterpret_cast<uint64_t*>(state.data_ptr<int64_t>());

  const uint8_t* yptr = Y.data_ptr<uint8_t>();
  for (int64_t col0 = 0; col0 < N; col0 += Nt) {
    const int64_t nc = std::min<int64_t>(Nt, N - col0);
    const int64_t ncp = round_up(nc, 16);  // <= Nt
    u8_convert_kernel<NormT><<<grid_for_rows(ncp), kWarpsPerBlock * 32, 0, stream>>>(
        yptr + col0 * d, nc, ncp, d, D8, y_word, Yt.data_ptr<int8_t>(),
        reinterpret_cast<NormT*>(nyt.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor Ytv = Yt.narrow(0, 0, ncp * D8).view({ncp, D8});

    for (int64_t q0 = 0; q0 < Q; q0 += Qt) {
      const int64_t qr = std::min<int64_t>(Qt, Q - q0);
      const int64_t mq = std::max<int64_t>(qr, 17);  // q0 + mq <= Q + 16
      at::Tensor A = Xq.narrow(0, q0, mq);
      at::Tensor Cv = Cbuf.narrow(0, 0, mq * ncp).view({mq, ncp});
      if constexpr (!WIDE) {
        at::_int_mm_out(Cv, A, Ytv.t());
      } else {
        at::Tensor C32 = Cbuf32.narrow(0, 0, mq * ncp).view({mq, ncp});
        for (int64_t c0 = 0; c0 < D8; c0 += kU8WideChunk) {
          const int64_t len = std::min<int64_t>(kU8WideChunk, D8 - c0);
          at::Tensor Ac = A.narrow(1, c0, len).contiguous();
          at::Tensor Bc = Ytv.narrow(1, c0, len).contiguous();
          at::_int_mm_out(C32, Ac, Bc.t());
          if (c0 == 0) {
            Cv.copy_(C32);
          } else {
            Cv.add_(C32);
          }
        }
      }
      u8_fuse_kernel<WIDE><<<grid_for_rows(qr), kWarpsPerBlock * 32, 0, stream>>>(
          reinterpret_cast<const DotT*>(Cv.data_ptr()), ncp,
          reinterpret_cast<const NormT*>(nx.data_ptr()),
          reinterpret_cast<const NormT*>(nyt.data_ptr()), q0, static_cast<int>(qr), col0,
          static_cast<int>(nc), static_cast<int>(k), shift, state_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

  at::Tensor out_d = at::empty({Q, k}, X.options().dtype(at::kLong));
  at::Tensor out_i = at::empty({Q, k}, X.options().dtype(at::kLong));
  const int64_t total = Q * k;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, 256), 65535));
  decode_keys_kernel<<<blocks, 256, 0, stream>>>(state_ptr, total, shift,
                                                 out_d.data_ptr<int64_t>(),
                                                 out_i.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out_d, out_i};
}

// ---------------------------------------------------------------------------
// float path
// ---------------------------------------------------------------------------

// Exact brute force for a subset of queries (Xu, already gathered), sorted by
// (dist, idx).  Returns float64 distances and int64 indices, both (Qu, k).
template <typename T>
std::tuple<at::Tensor, at::Tensor> brute_force_exact(const at::Tensor& Xu, const at::Tensor& Y,
                                                     int64_t k) {
  const int64_t Qu = Xu.size(0);
  const int64_t N = Y.size(0);
  const int64_t d = Y.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto dopt = Xu.options().dtype(at::kDouble);

  const int64_t bq = std::min<int64_t>(Qu, std::max<int64_t>(env_int("DIFFMEM_KNN_TILE_Q", 1024), 1));
  // nb >= min(N, 32) >= k for the first ref tile, so best always holds k real entries.
  const int64_t bn = std::min<int64_t>(N, std::max<int64_t>(env_int("DIFFMEM_KNN_TILE_N", 4096), 32));

  at::Tensor out_d = at::empty({Qu, k}, dopt);
  at::Tensor out_i = at::empty({Qu, k}, Xu.options().dtype(at::kLong));
  at::Tensor Dbuf = at::empty({bq * bn}, dopt);

  for (int64_t q0 = 0; q0 < Qu; q0 += bq) {
    const int64_t qb = std::min<int64_t>(bq, Qu - q0);
    at::Tensor best_d, best_i;
    for (int64_t c0 = 0; c0 < N; c0 += bn) {
      const int64_t nb = std::min<int64_t>(bn, N - c0);
      at::Tensor D = Dbuf.narrow(0, 0, qb * nb).view({qb, nb});
      const dim3 grid(static_cast<unsigned>(ceil_div(nb, kEdTile)),
                      static_cast<unsigned>(ceil_div(qb, kEdTile)));
      exact_dist_kernel<T><<<grid, dim3(16, 16), 0, stream>>>(
          Xu.data_ptr<T>() + q0 * d, qb, Y.data_ptr<T>() + c0 * d, nb, d,
          D.data_ptr<double>(), nb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // Columns are in increasing index order, so a stable sort orders the
      // tile by (dist, idx).
      auto [sd, si] = at::sort(D, /*stable=*/true, /*dim=*/1, /*descending=*/false);
      const int64_t kk = std::min<int64_t>(k, nb);
      at::Tensor td = sd.narrow(1, 0, kk);
      at::Tensor ti = si.narrow(1, 0, kk) + c0;
      if (!best_d.defined()) {
        best_d = td.contiguous();
        best_i = ti.contiguous();
      } else {
        // All indices in best are < c0 <= those of the tile: a stable sort of
        // [best | tile] by distance keeps the (dist, idx) order.
        at::Tensor cd = at::cat({best_d, td}, 1);
        at::Tensor ci = at::cat({best_i, ti}, 1);
        auto [s2, p2] = at::sort(cd, /*stable=*/true, /*dim=*/1, /*descending=*/false);
        at::Tensor pk = p2.narrow(1, 0, k);
        best_d = s2.narrow(1, 0, k).contiguous();
        best_i = ci.gather(1, pk).contiguous();
      }
    }
    out_d.narrow(0, q0, qb).copy_(best_d);
    out_i.narrow(0, q0, qb).copy_(best_i);
  }
  return {out_d, out_i};
}

// The screen runs on Xs, Ys (element type S: the input, or float64 copies scaled by a
// power of two); the exact re-rank and the brute force on the input X, Y (type T), so
// that distances are those of the rows given, with the same rounding as on the CPU.
template <typename S, typename T, int LPL>
std::tuple<at::Tensor, at::Tensor> topk_float_impl(const at::Tensor& Xs, const at::Tensor& Ys,
                                                   const at::Tensor& X, const at::Tensor& Y,
                                                   int64_t k) {
  constexpr int L = 32 * LPL;
  constexpr int C = L - 1;
  const int64_t Q = X.size(0);
  const int64_t N = Y.size(0);
  const int64_t d = X.size(1);
  const int shift = index_bits(N);
  TORCH_CHECK(Q <= std::numeric_limits<int>::max(), "knn_topk: too many queries for the float path (", Q, ")");
  TORCH_CHECK(shift <= 31, "knn_topk: too many refs for the float path (N must be <= 2^31)");
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto dopt = X.options().dtype(at::kDouble);
  const auto lopt = X.options().dtype(at::kLong);

  // Norms in float64.
  at::Tensor nx = at::empty({Q}, dopt);
  at::Tensor ny = at::empty({N}, dopt);
  row_sqnorm_kernel<S><<<grid_for_rows(Q), kWarpsPerBlock * 32, 0, stream>>>(
      Xs.data_ptr<S>(), Q, d, nx.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  row_sqnorm_kernel<S><<<grid_for_rows(N), kWarpsPerBlock * 32, 0, stream>>>(
      Ys.data_ptr<S>(), N, d, ny.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor xn = at::sqrt(nx);
  at::Tensor yn = at::sqrt(ny);

  // Error bound constants.
  //   |dot~ - dot| <= g * ||x|| ||y||           (GEMM in T, u = unit roundoff of T)
  //   float64 errors of nx, ny, a = nx + ny - 2 dot~: <= g64 * (nx + ny)
  //   flushed / underflowed operands: c3 * (||x|| + ||y||) + c4
  //   everything x 1.25 for the rounding of the bound itself.
  const double u = std::is_same<S, float>::value ? std::ldexp(1.0, -24) : std::ldexp(1.0, -53);
  const double u64 = std::ldexp(1.0, -53);
  const double dd = static_cast<double>(d);
  const double du = dd * u;
  const double g = du < 0.5 ? du / (1.0 - du) : std::numeric_limits<double>::infinity();
  const double du64 = (dd + 3.0) * u64;
  const double g64 = du64 < 0.5 ? du64 / (1.0 - du64) : std::numeric_limits<double>::infinity();
  const double tmin = std::is_same<S, float>::value ? static_cast<double>(FLT_MIN) : DBL_MIN;
  const double c1 = 1.25 * 2.0 * g;
  const double c2 = 1.25 * g64;
  const double c3 = 1.25 * 2.0 * tmin * std::sqrt(dd);
  const double c4 = 1.25 * 4.0 * (dd + 3.0) * tmin + 4.0 * DBL_MIN;

  at::Tensor lo_state = at::full({Q, L}, -1, lopt);
  at::Tensor hi_state = at::full({Q, k}, -1, lopt);
  uint64_t* lo_ptr = reinterpret_cast<uint64_t*>(lo_state.data_ptr<int64_t>());
  uint64_t* hi_ptr = reinterpret_cast<uint64_t*>(hi_state.data_ptr<int64_t>());

  const int64_t default_nt = std::is_same<S, float>::value ? kDefaultTileN : kDefaultTileN / 2;
  const int64_t Qt = std::min<int64_t>(env_int("DIFFMEM_KNN_TILE_Q", kDefaultTileQ), Q);
  const int64_t Nt = std::min<int64_t>(env_int("DIFFMEM_KNN_TILE_N", default_nt), N);

  {
    common::FullPrecisionMatmulGuard precision_guard;
    at::Tensor dotbuf = at::empty({Qt * Nt}, Xs.options());
    for (int64_t col0 = 0; col0 < N; col0 += Nt) {
      const int64_t nc = std::min<int64_t>(Nt, N - col0);
      at::Tensor Yt = Ys.narrow(0, col0, nc);
      for (int64_t q0 = 0; q0 < Q; q0 += Qt) {
        const int64_t qr = std::min<int64_t>(Qt, Q - q0);
        at::Tensor Cv = dotbuf.narrow(0, 0, qr * nc).view({qr, nc});
        at::mm_out(Cv, Xs.narrow(0, q0, qr), Yt.t());
        float_fuse_kernel<S, LPL><<<grid_for_rows(qr), kWarpsPerBlock * 32, 0, stream>>>(
            Cv.data_ptr<S>(), nc, nx.data_ptr<double>(), xn.data_ptr<double>(),
            ny.data_ptr<double>(), yn.data_ptr<double>(), q0, static_cast<int>(qr), col0,
            static_cast<int>(nc), static_cast<int>(k), shift, c1, c2, c3, c4, lo_ptr, hi_ptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  }

  // Verification + exact re-rank of the candidates.
  const bool force_fallback = env_int("DIFFMEM_KNN_FORCE_FALLBACK", 0) > 0;
  at::Tensor cand_d = at::empty({Q, C}, dopt);
  at::Tensor cand_i = at::empty({Q, C}, lopt);
  at::Tensor verified = at::empty({Q}, X.options().dtype(at::kByte));
  float_rerank_kernel<T, LPL><<<static_cast<unsigned>(Q), 128, 0, stream>>>(
      X.data_ptr<T>(), Y.data_ptr<T>(), d, lo_ptr, hi_ptr, static_cast<int>(k), shift,
      force_fallback, cand_d.data_ptr<double>(), cand_i.data_ptr<int64_t>(),
      verified.data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Sort candidates by (dist, idx): by idx first, then stable by distance.
  auto [si, p1] = at::sort(cand_i, /*dim=*/1, /*descending=*/false);
  at::Tensor cd = cand_d.gather(1, p1);
  auto [sd, p2] = at::sort(cd, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  at::Tensor out_d = sd.narrow(1, 0, k).contiguous();
  at::Tensor out_i = si.gather(1, p2.narrow(1, 0, k)).contiguous();

  // Unverified queries (many near ties), and queries whose k-th distance overflows
  // float64 (the screen ranks by true distances; a float64 brute force sees ties at
  // inf, broken by index): exact brute force.
  at::Tensor uq = at::nonzero((verified == 0).logical_or(out_d.select(1, k - 1).isinf())).view({-1});
  if (uq.numel() > 0) {
    at::Tensor Xu = X.index_select(0, uq).contiguous();
    auto [bd, bi] = brute_force_exact<T>(Xu, Y, k);
    out_d.index_copy_(0, uq, bd);
    out_i.index_copy_(0, uq, bi);
  }
  return {out_d, out_i};
}

template <typename S, typename T>
std::tuple<at::Tensor, at::Tensor> topk_float_screened(const at::Tensor& Xs, const at::Tensor& Ys,
                                                       const at::Tensor& X, const at::Tensor& Y,
                                                       int64_t k) {
  // L = max(64, 4k) rounded to a power of two: C = L - 1 candidates.
  if (k <= 16) return topk_float_impl<S, T, 2>(Xs, Ys, X, Y, k);
  return topk_float_impl<S, T, 4>(Xs, Ys, X, Y, k);
}

// v * 2^shift, in steps of at most 2^1000 (2^shift itself may not be a double).
at::Tensor& scale_by_power_of_two(at::Tensor& v, int shift) {
  while (shift != 0) {
    const int step = std::max(-1000, std::min(1000, shift));
    v.mul_(std::ldexp(1.0, step));
    shift -= step;
  }
  return v;
}

// When the largest |value| 2^e of the rows lies outside the range where the GEMM's
// products neither overflow nor underflow ([2^-32, 2^32) for float32, [2^-480, 2^480)
// for float64), the screen runs on float64 copies scaled by 2^-e: a power of two keeps
// the order of distances, and elements that underflow in the copies are covered by the
// bound's subnormal terms. The re-rank uses the rows as given.
template <typename T>
std::tuple<at::Tensor, at::Tensor> topk_float(const at::Tensor& X, const at::Tensor& Y,
                                              int64_t k) {
  auto [xlo, xhi] = at::aminmax(X);
  auto [ylo, yhi] = at::aminmax(Y);
  const at::Tensor ext = at::stack({xlo, xhi, ylo, yhi}).to(at::kDouble).cpu();  // one sync
  const double* e = ext.const_data_ptr<double>();
  TORCH_CHECK(std::isfinite(e[0]) && std::isfinite(e[1]) && std::isfinite(e[2]) && std::isfinite(e[3]),
              "knn_topk: queries and refs must be finite (found NaN or inf)");
  const double m = std::max({-e[0], e[1], -e[2], e[3]});
  const int range = std::is_same<T, float>::value ? 32 : 480;
  if (m == 0.0 || (m >= std::ldexp(1.0, -range) && m < std::ldexp(1.0, range)))
    return topk_float_screened<T, T>(X, Y, X, Y, k);
  const int shift = -std::ilogb(m);
  at::Tensor Xs = X.to(at::kDouble, /*non_blocking=*/false, /*copy=*/true);
  at::Tensor Ys = Y.to(at::kDouble, /*non_blocking=*/false, /*copy=*/true);
  scale_by_power_of_two(Xs, shift);
  scale_by_power_of_two(Ys, shift);
  return topk_float_screened<double, T>(Xs, Ys, X, Y, k);
}

}  // namespace

// ---------------------------------------------------------------------------
// entry point
// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> topk_cuda(const at::Tensor& queries, const at::Tensor& refs,
                                             int64_t k) {
  TORCH_CHECK(queries.is_cuda() && refs.is_cuda(), "knn_topk: expected CUDA tensors");
  check_inputs(queries, refs, k);  // shapes, dtypes, device, 1 <= k <= min(32, N), non-empty
  const auto st = queries.scalar_type();
  const int64_t d = queries.size(1);

  c10::cuda::CUDAGuard device_guard(queries.device());
  const at::Tensor X = queries.contiguous();
  const at::Tensor Y = refs.contiguous();

  if (st == at::kByte) {
    if (d <= kU8NarrowMaxD) return topk_u8_impl<false>(X, Y, k);
    return topk_u8_impl<true>(X, Y, k);
  }
  if (st == at::kFloat) return topk_float<float>(X, Y, k);
  return topk_float<double>(X, Y, k);
}

}  // namespace diffmem::knn

TORCH_LIBRARY_IMPL(diffmem, CUDA, m) { m.impl("knn_topk", &diffmem::knn::topk_cuda); }
