// Exact uint8 top-k search on the blocked register kernels (blocked_dots.h): AVX-512 VNNI,
// or AVX2 FMA on centred floats where the CPU lacks VNNI.
//
// VNNI's dot products are acc = x.(y - 128) = x.y - 128 sum x, so
//   ||x - y||^2 = (sum x^2 - 256 sum x) + sum y^2 - 2 acc                  (exact integers)
// and AVX2's are acc = x'.y' of the centred x' = x - 128, y' = y - 128, so
//   ||x - y||^2 = ||x'||^2 + ||y'||^2 - 2 acc,  ||x'||^2 = sum x^2 - 256 sum x + 128^2 d.
// Each block is folded into the running top-k lists right after it is computed.
#include <algorithm>
#include <limits>
#include <vector>

#include "common/cpu_features.h"
#include "knn/cpu/blocked_dots.h"
#include "knn/cpu/sorted_topk.h"
#include "knn/knn.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define DIFFMEM_X86 1
#endif

namespace diffmem::knn {
namespace {

// Per-row sums in int32 over pieces of 2^15 features (255^2 * 2^15 < 2^31), so the compiler
// can vectorize them.
void row_sums(const uint8_t* row, int64_t d, int64_t& s1, int64_t& s2) {
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
}

#ifdef DIFFMEM_X86
// Folds a block into the top-k lists. Distances fit int32 when d * 255^2 < 2^31; the int32
// arithmetic may wrap in between but ends exact. ny32 is padded so 16-lane loads stay inside.
__attribute__((target("avx512f,avx512bw"))) void reduce_block_i32(const int32_t* C, int64_t ldc, int64_t q0,
                                                                  int64_t q1, int64_t j0, int64_t j1,
                                                                  const int64_t* nx, const int32_t* ny32, int64_t k,
                                                                  int64_t* dist, int64_t* idx) {
  for (int64_t q = q0; q < q1; ++q) {
    int64_t* dq = dist + q * k;
    int64_t* iq = idx + q * k;
    const int32_t* row = C + (q - q0) * ldc;
    const __m512i nxq = _mm512_set1_epi32(static_cast<int32_t>(nx[q]));
    for (int64_t j = j0; j < j1; j += 16) {
      const __mmask16 valid = j1 - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (j1 - j)) - 1);
      const __m512i acc = _mm512_loadu_si512(row + (j - j0));
      const __m512i dv = _mm512_sub_epi32(_mm512_add_epi32(nxq, _mm512_loadu_si512(ny32 + j)), _mm512_slli_epi32(acc, 1));
      __mmask16 m = valid;
      if (dq[k - 1] <= std::numeric_limits<int32_t>::max())  // list full: only improvements
        m &= _mm512_cmplt_epi32_mask(dv, _mm512_set1_epi32(static_cast<int32_t>(dq[k - 1])));
      if (!m) continue;
      alignas(64) int32_t dd[16];
      _mm512_store_si512(dd, dv);
      while (m) {
        const int t = __builtin_ctz(m);
        m &= m - 1;
        if (dd[t] < dq[k - 1]) sorted_insert(dq, iq, k, static_cast<int64_t>(dd[t]), j + t);
      }
    }
  }
}
#endif

// The same in int64, portable: for 33025 < d <= kBlockedU8MaxDim where distances pass 2^31,
// and for the AVX2 kernel (a small part of its time next to the products).
void reduce_block_i64(const int32_t* C, int64_t ldc, int64_t q0, int64_t q1, int64_t j0, int64_t j1,
                      const int64_t* nx, const int64_t* ny, int64_t k, int64_t* dist, int64_t* idx) {
  for (int64_t q = q0; q < q1; ++q)
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t dv = nx[q] + ny[j] - 2 * static_cast<int64_t>(C[(q - q0) * ldc + (j - j0)]);
      if (dv < dist[q * k + k - 1]) sorted_insert(dist + q * k, idx + q * k, k, dv, j);
    }
}

}  // namespace

void topk_u8_blocked(const uint8_t* X, int64_t Q, const uint8_t* Y, int64_t N, int64_t d, int64_t k,
                     int64_t* out_dist, int64_t* out_idx) {
  TORCH_CHECK(d <= kBlockedU8MaxDim, "topk_u8_blocked: d = ", d, " is too large for int32 accumulators");
  const bool vnni = common::use_avx512_vnni();
  TORCH_CHECK(vnni || common::use_avx2_fma(), "topk_u8_blocked: needs AVX-512 VNNI or AVX2 with FMA");
  // VNNI: nx = sum x^2 - 256 sum x cancels the -128 sum x inside acc, ny = sum y^2;
  // AVX2: both are norms of centred rows, sum v^2 - 256 sum v + 128^2 d
  const int64_t centring = vnni ? 0 : 16384 * d;
  std::vector<int64_t> nx(Q), ny(N);
  at::parallel_for(0, Q, 256, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      int64_t s1, s2;
      row_sums(X + q * d, d, s1, s2);
      nx[q] = s2 - 256 * s1 + centring;
    }
  });
  at::parallel_for(0, N, 256, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      int64_t s1, s2;
      row_sums(Y + j * d, d, s1, s2);
      ny[j] = vnni ? s2 : s2 - 256 * s1 + centring;
    }
  });
  std::fill(out_dist, out_dist + Q * k, std::numeric_limits<int64_t>::max());
  std::fill(out_idx, out_idx + Q * k, int64_t(-1));
  auto reduce_i64 = [&](int64_t q0, int64_t q1, int64_t j0, int64_t j1, const int32_t* C, int64_t ldc) {
    reduce_block_i64(C, ldc, q0, q1, j0, j1, nx.data(), ny.data(), k, out_dist, out_idx);
  };
  if (!vnni) {
    blocked::for_each_dot_block(blocked::U8Avx2{}, X, Q, Y, N, d, reduce_i64);
    return;
  }
#ifdef DIFFMEM_X86
  if (d <= 33025) {  // d * 255^2 < 2^31: distances fit int32
    std::vector<int32_t> ny32(N + 16, 0);  // padded so 16-lane loads stay inside
    for (int64_t j = 0; j < N; ++j) ny32[j] = static_cast<int32_t>(ny[j]);
    blocked::for_each_dot_block(
        blocked::U8Vnni{}, X, Q, Y, N, d, [&](int64_t q0, int64_t q1, int64_t j0, int64_t j1, const int32_t* C, int64_t ldc) {
          reduce_block_i32(C, ldc, q0, q1, j0, j1, nx.data(), ny32.data(), k, out_dist, out_idx);
        });
    return;
  }
#endif
  blocked::for_each_dot_block(blocked::U8Vnni{}, X, Q, Y, N, d, reduce_i64);
}

}  // namespace diffmem::knn
