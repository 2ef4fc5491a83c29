// Exact uint8 top-k search fused with an AVX-512 VNNI distance kernel.
//
// vpdpbusd multiplies unsigned bytes by signed bytes and sums groups of four into int32
// lanes without saturation: 64 exact multiply-adds per instruction, 4x the float32 FMA
// rate on these cores. Queries stay uint8 (the unsigned operand, broadcast straight from
// their rows); refs are packed as y - 128 (the signed operand), so
//   acc = sum x (y - 128) = x.y - 128 sum x
//   ||x - y||^2 = (sum x^2 - 256 sum x) + sum y^2 - 2 acc        (exact integers)
// The Q x N distance matrix is never written: each 8 x 48 register tile is reduced into
// the running top-k lists right after its dot products finish.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "knn/cpu/sorted_topk.h"
#include "knn/knn.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define DIFFMEM_HAVE_X86 1
#endif

namespace diffmem::knn {

#ifdef DIFFMEM_HAVE_X86
namespace {

constexpr int64_t MR = 8;        // queries per register tile (broadcast operand)
constexpr int64_t NV = 3;        // zmm registers of refs per register tile
constexpr int64_t NR = 16 * NV;  // refs per packed panel
constexpr int64_t kBlockBytes = 512 * 1024;  // packed refs per block: stays in the 1 MB L2

inline int32_t load_u32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Packs refs rows [r0, r0 + NR) as signed bytes y - 128 in the order the kernel reads them:
// for each group g of four features, NR rows x 4 bytes. Missing rows and features are the
// signed 0, so they add nothing to the dot products.
void pack_panel(const uint8_t* Y, int64_t N, int64_t d, int64_t K4, int64_t r0, int8_t* out) {
  std::memset(out, 0, static_cast<size_t>(K4 * NR * 4));
  const int64_t rows = std::min<int64_t>(NR, N - r0);
  const int64_t full = d / 4;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* src = Y + (r0 + r) * d;
    for (int64_t g = 0; g < full; ++g) {  // four bytes at a time; y - 128 flips the top bit
      const uint32_t v = static_cast<uint32_t>(load_u32(src + 4 * g)) ^ 0x80808080u;
      std::memcpy(out + (g * NR + r) * 4, &v, 4);
    }
    for (int64_t f = 4 * full; f < d; ++f)
      out[((f >> 2) * NR + r) * 4 + (f & 3)] = static_cast<int8_t>(static_cast<int>(src[f]) - 128);
  }
}

// Dot products of MR query rows with one packed panel of NR refs, over all features.
// rows[i] points at query row i; tail[i] holds its last, partial group of four bytes.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile_dots(const uint8_t* const* rows,
                                                                      const int32_t* tail, int64_t K4full,
                                                                      bool has_tail, const int8_t* panel,
                                                                      int32_t* out /* MR x NR */) {
  __m512i acc[MR][NV];
#pragma GCC unroll 8
  for (int64_t i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int64_t v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_si512();

  const int8_t* p = panel;
  for (int64_t g = 0; g < K4full; ++g, p += NR * 4) {
    __m512i b[NV];
#pragma GCC unroll 3
    for (int64_t v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(p + v * 64);
#pragma GCC unroll 8
    for (int64_t i = 0; i < MR; ++i) {
      const __m512i a = _mm512_set1_epi32(load_u32(rows[i] + 4 * g));
#pragma GCC unroll 3
      for (int64_t v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbusd_epi32(acc[i][v], a, b[v]);
    }
  }
  if (has_tail) {
    __m512i b[NV];
#pragma GCC unroll 3
    for (int64_t v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(p + v * 64);
#pragma GCC unroll 8
    for (int64_t i = 0; i < MR; ++i) {
      const __m512i a = _mm512_set1_epi32(tail[i]);
#pragma GCC unroll 3
      for (int64_t v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbusd_epi32(acc[i][v], a, b[v]);
    }
  }
#pragma GCC unroll 8
  for (int64_t i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int64_t v = 0; v < NV; ++v) _mm512_storeu_si512(out + i * NR + v * 16, acc[i][v]);
}

// Folds one tile of dot products into the top-k lists of its queries. Distances fit int32
// when d * 255^2 < 2^31; the int32 arithmetic wraps in between but ends exact.
// ny32 is padded to whole panels, so 16-lane loads never leave it.
__attribute__((target("avx512f,avx512bw"))) void reduce_tile_i32(const int32_t* dots, int64_t rows, int64_t cols,
                                                                 int64_t j0, const int64_t* nx, const int32_t* ny32,
                                                                 int64_t k, int64_t* dist, int64_t* idx) {
  for (int64_t i = 0; i < rows; ++i) {
    int64_t* di = dist + i * k;
    int64_t* ii = idx + i * k;
    const __m512i nxi = _mm512_set1_epi32(static_cast<int32_t>(nx[i]));
    for (int64_t v = 0; v * 16 < cols; ++v) {
      const int64_t c0 = v * 16;
      const __mmask16 valid = cols - c0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (cols - c0)) - 1);
      const __m512i dots_v = _mm512_loadu_si512(dots + i * NR + c0);
      const __m512i nyv = _mm512_loadu_si512(ny32 + j0 + c0);
      const __m512i dv = _mm512_sub_epi32(_mm512_add_epi32(nxi, nyv), _mm512_slli_epi32(dots_v, 1));
      const int64_t worst = di[k - 1];
      __mmask16 m = valid;
      if (worst <= std::numeric_limits<int32_t>::max())
        m &= _mm512_cmplt_epi32_mask(dv, _mm512_set1_epi32(static_cast<int32_t>(worst)));
      if (!m) continue;
      alignas(64) int32_t dd[16];
      _mm512_store_si512(dd, dv);
      while (m) {
        const int t = __builtin_ctz(m);
        m &= m - 1;
        const int64_t dist_t = dd[t];
        if (dist_t < di[k - 1]) sorted_insert(di, ii, k, dist_t, j0 + c0 + t);
      }
    }
  }
}

// The same reduction in int64 for 33025 < d <= kVnniMaxDim, where distances pass 2^31.
void reduce_tile_i64(const int32_t* dots, int64_t rows, int64_t cols, int64_t j0, const int64_t* nx,
                     const int64_t* ny, int64_t k, int64_t* dist, int64_t* idx) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t dv = nx[i] + ny[j0 + c] - 2 * static_cast<int64_t>(dots[i * NR + c]);
      if (dv < dist[i * k + k - 1]) sorted_insert(dist + i * k, idx + i * k, k, dv, j0 + c);
    }
  }
}

}  // namespace

void topk_u8_avx512(const uint8_t* X, int64_t Q, const uint8_t* Y, int64_t N, int64_t d, int64_t k,
                    int64_t* out_dist, int64_t* out_idx) {
  TORCH_CHECK(d <= kVnniMaxDim, "topk_u8_avx512: d = ", d, " is too large for int32 accumulators");
  const int64_t K4full = d / 4;
  const bool has_tail = d % 4 != 0;
  const int64_t K4 = K4full + (has_tail ? 1 : 0);
  const bool fits_i32 = d <= 33025;  // d * 255^2 < 2^31

  // Norm terms of the expansion: nx = sum x^2 - 256 sum x (queries), ny = sum y^2 (refs).
  std::vector<int64_t> nx(Q), ny(N);
  // Per-row sums in int32 over pieces of 2^15 features (255^2 * 2^15 < 2^31), so the
  // compiler can vectorize them.
  auto row_sums = [d](const uint8_t* row, int64_t& s1, int64_t& s2) {
    s1 = s2 = 0;
    for (int64_t f0 = 0; f0 < d; f0 += 32768) {
      int32_t a1 = 0, a2 = 0;
      const int64_t f1 = std::min<int64_t>(d, f0 + 32768);
      for (int64_t f = f0; f < f1; ++f) {
        const int32_t v = row[f];
        a1 += v;
        a2 += v * v;
      }
      s1 += a1;
      s2 += a2;
    }
  };
  at::parallel_for(0, Q, 256, [&](int64_t b, int64_t e) {
    int64_t s1, s2;
    for (int64_t q = b; q < e; ++q) {
      row_sums(X + q * d, s1, s2);
      nx[q] = s2 - 256 * s1;
    }
  });
  at::parallel_for(0, N, 256, [&](int64_t b, int64_t e) {
    int64_t s1, s2;
    for (int64_t j = b; j < e; ++j) {
      row_sums(Y + j * d, s1, s2);
      ny[j] = s2;
    }
  });
  const int64_t n_panels = (N + NR - 1) / NR;
  std::vector<int32_t> ny32;
  if (fits_i32) {
    ny32.assign(static_cast<size_t>(n_panels * NR), 0);
    for (int64_t j = 0; j < N; ++j) ny32[j] = static_cast<int32_t>(ny[j]);
  }
  std::fill(out_dist, out_dist + Q * k, std::numeric_limits<int64_t>::max());
  std::fill(out_idx, out_idx + Q * k, int64_t(-1));

  const int64_t panel_bytes = K4 * NR * 4;
  const int64_t panels_per_block = std::max<int64_t>(1, kBlockBytes / panel_bytes);
  std::vector<int8_t> packed(static_cast<size_t>(panels_per_block * panel_bytes));

  // Refs in L2-sized blocks, packed once; both threads then sweep their own query rows
  // over the block, so each thread owns its queries' top-k lists (no locks).
  const int64_t q_tiles = (Q + MR - 1) / MR;
  for (int64_t p0 = 0; p0 < n_panels; p0 += panels_per_block) {
    const int64_t p1 = std::min(n_panels, p0 + panels_per_block);
    at::parallel_for(p0, p1, 1, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) pack_panel(Y, N, d, K4, p * NR, packed.data() + (p - p0) * panel_bytes);
    });
    at::parallel_for(0, q_tiles, 1, [&](int64_t b, int64_t e) {
      alignas(64) int32_t dots[MR * NR];
      const uint8_t* rows[MR];
      int32_t tail[MR];
      for (int64_t t = b; t < e; ++t) {
        const int64_t qa = t * MR;
        const int64_t rows_valid = std::min<int64_t>(MR, Q - qa);
        for (int64_t i = 0; i < MR; ++i) {
          // Missing query rows repeat the last valid one; their results are ignored.
          rows[i] = X + (qa + std::min(i, rows_valid - 1)) * d;
          tail[i] = 0;
          if (has_tail) std::memcpy(&tail[i], rows[i] + 4 * K4full, static_cast<size_t>(d - 4 * K4full));
        }
        for (int64_t p = p0; p < p1; ++p) {
          tile_dots(rows, tail, K4full, has_tail, packed.data() + (p - p0) * panel_bytes, dots);
          const int64_t j0 = p * NR;
          const int64_t cols = std::min<int64_t>(NR, N - j0);
          if (fits_i32)
            reduce_tile_i32(dots, rows_valid, cols, j0, nx.data() + qa, ny32.data(), k, out_dist + qa * k,
                            out_idx + qa * k);
          else
            reduce_tile_i64(dots, rows_valid, cols, j0, nx.data() + qa, ny.data(), k, out_dist + qa * k,
                            out_idx + qa * k);
        }
      }
    });
  }
}

#else  // not x86: the dispatcher never calls this

void topk_u8_avx512(const uint8_t*, int64_t, const uint8_t*, int64_t, int64_t, int64_t, int64_t*, int64_t*) {
  TORCH_CHECK(false, "topk_u8_avx512: not an x86-64 build");
}

#endif

}  // namespace diffmem::knn
