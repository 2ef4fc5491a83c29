// All query-ref dot products, one cache-sized block at a time, each block handed to an
// epilogue (a top-k reduction) and then forgotten: the Q x N matrix is never stored.
//
// GotoBLAS-style blocking for the register kernels (uint8 with AVX-512 VNNI or as centred
// floats with AVX2 FMA, float32 with AVX-512 FMA): a 48-ref slice of `kGroups` feature
// groups (~18 KB) stays in L1 while the 8-query tiles of a block stream past it from L2,
// and the block's accumulators (128 x 480) stay in L2 across feature slices.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace diffmem::knn::blocked {

constexpr int64_t MR = 8;             // queries per register tile (broadcast operand)
constexpr int64_t NR = 48;            // refs per register tile (three 16-lane vectors)
constexpr int64_t kGroups = 96;       // feature groups per L1 slice
constexpr int64_t kQueryBlock = 128;  // queries per block (16 tiles)
constexpr int64_t kRefBlock = 480;    // refs per block (10 panels)

// Register kernels (blocked_dots_avx512.cpp, blocked_dots_avx2.cpp): c[MR x NR] (+)= a-tile
// . b-panel over `groups` feature groups; `accumulate` false overwrites c.
void micro_u8(const uint8_t* a, const int8_t* b, int64_t groups, int32_t* c, int64_t ldc, bool accumulate);
void micro_f32(const float* a, const float* b, int64_t groups, float* c, int64_t ldc, bool accumulate);
// uint8 pixels as centred floats: float32 sums over one slice (<= kGroups features of
// |x'y'| <= 2^14, so every partial sum is an integer below 2^24: exact), added to int32 c.
void micro_u8f32_avx2(const float* a, const float* b, int64_t groups, int32_t* c, int64_t ldc, bool accumulate);
// bfloat16 pairs: float32 sums of products of the packed operands, on AVX-512 BF16
// (blocked_dots_avx512.cpp), or emulated on any CPU for tests (blocked_dots_bf16.cpp);
// micro_bf16 picks one.
void micro_bf16_avx512(const uint16_t* a, const uint16_t* b, int64_t groups, float* c, int64_t ldc, bool accumulate);
using MicroBf16 = void (*)(const uint16_t* a, const uint16_t* b, int64_t groups, float* c, int64_t ldc, bool accumulate);
MicroBf16 micro_bf16(bool emulate);

// Packing: refs rows [r0, r0 + NR) -> [group][NR][group elements]; query rows [q0, q0 + MR)
// -> [group][MR][group]. Missing rows and features are zero. For VNNI, uint8 refs become
// y - 128 (the signed operand) and queries stay uint8; the `centred` float forms hold
// x - 128 and y - 128.
void pack_refs(const uint8_t* Y, int64_t N, int64_t d, int64_t groups, int64_t r0, int8_t* out);
void pack_refs(const float* Y, int64_t N, int64_t d, int64_t groups, int64_t r0, float* out);
void pack_queries(const uint8_t* X, int64_t Q, int64_t d, int64_t groups, int64_t q0, uint8_t* out);
void pack_queries(const float* X, int64_t Q, int64_t d, int64_t groups, int64_t q0, float* out);
void pack_refs_centred(const uint8_t* Y, int64_t N, int64_t d, int64_t r0, float* out);
void pack_queries_centred(const uint8_t* X, int64_t Q, int64_t d, int64_t q0, float* out);
// bfloat16 operands: bf16(fl32(fl32(v) - mu)) in pairs of features, [pair][rows][2].
void pack_refs_bf16(const float* Y, int64_t N, int64_t d, const float* mu, int64_t r0, uint16_t* out);
void pack_refs_bf16(const double* Y, int64_t N, int64_t d, const float* mu, int64_t r0, uint16_t* out);
void pack_queries_bf16(const float* X, int64_t Q, int64_t d, const float* mu, int64_t q0, uint16_t* out);
void pack_queries_bf16(const double* X, int64_t Q, int64_t d, const float* mu, int64_t q0, uint16_t* out);

// Round to nearest even, then zero if subnormal: the value vdpbf16ps reads (it treats
// subnormal inputs as zero). Callers keep |v| far below the float32 maximum (no overflow).
inline uint16_t to_bf16(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  b += 0x7FFFu + ((b >> 16) & 1u);
  uint16_t h = static_cast<uint16_t>(b >> 16);
  if ((h & 0x7F80u) == 0) h &= 0x8000u;
  return h;
}
inline float from_bf16(uint16_t h) {
  const uint32_t b = static_cast<uint32_t>(h) << 16;
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}
// Per row of V (rows x d): sq = ||v - mu||^2 (float64), and the norms of the packed bfloat16
// operand h and of its rounding error (v - mu) - h, which bound the screen's error.
void bf16_row_stats(const float* V, int64_t rows, int64_t d, const float* mu, double* sq, double* rounded_norm,
                    double* err_norm);
void bf16_row_stats(const double* V, int64_t rows, int64_t d, const float* mu, double* sq, double* rounded_norm,
                    double* err_norm);

// Ref rows [r0, r0 + NR) -> out[feature][NR] floats, convert(element) each, missing rows
// zero. Through a small row-major buffer: rows of the same matrix lie a multiple of 4 KB
// apart for common d, so reading them feature by feature would thrash one L1 set, while
// writing them row by row would scatter every write to a new line.
template <typename In, typename Convert>
void pack_rows_transposed(const In* Y, int64_t N, int64_t d, int64_t r0, float* out, Convert convert) {
  constexpr int64_t F = 64;
  alignas(64) In tmp[NR][F];
  std::fill(out, out + d * NR, 0.0f);
  const int64_t rows = std::min<int64_t>(NR, N - r0);
  for (int64_t f0 = 0; f0 < d; f0 += F) {
    const int64_t fn = std::min<int64_t>(F, d - f0);
    for (int64_t r = 0; r < rows; ++r) std::memcpy(tmp[r], Y + (r0 + r) * d + f0, static_cast<size_t>(fn) * sizeof(In));
    for (int64_t f = 0; f < fn; ++f)
      for (int64_t r = 0; r < rows; ++r) out[(f0 + f) * NR + r] = convert(tmp[r][f]);
  }
}

// A register kernel with its operand layouts: In (input rows), A/B (packed queries/refs),
// Acc (a block's dot products), G (features per group), and what packing needs to know.
struct U8Vnni {  // Acc = x . (y - 128)
  using In = uint8_t; using A = uint8_t; using B = int8_t; using Acc = int32_t;
  static constexpr int64_t G = 4;
  static void pack_a(const In* X, int64_t Q, int64_t d, int64_t g, int64_t q0, A* o) { pack_queries(X, Q, d, g, q0, o); }
  static void pack_b(const In* Y, int64_t N, int64_t d, int64_t g, int64_t r0, B* o) { pack_refs(Y, N, d, g, r0, o); }
  static void micro(const A* a, const B* b, int64_t g, Acc* c, int64_t ldc, bool acc) { micro_u8(a, b, g, c, ldc, acc); }
};
struct U8Avx2 {  // Acc = (x - 128) . (y - 128)
  using In = uint8_t; using A = float; using B = float; using Acc = int32_t;
  static constexpr int64_t G = 1;
  static void pack_a(const In* X, int64_t Q, int64_t d, int64_t, int64_t q0, A* o) { pack_queries_centred(X, Q, d, q0, o); }
  static void pack_b(const In* Y, int64_t N, int64_t d, int64_t, int64_t r0, B* o) { pack_refs_centred(Y, N, d, r0, o); }
  static void micro(const A* a, const B* b, int64_t g, Acc* c, int64_t ldc, bool acc) { micro_u8f32_avx2(a, b, g, c, ldc, acc); }
};
struct F32Avx512 {
  using In = float; using A = float; using B = float; using Acc = float;
  static constexpr int64_t G = 1;
  static void pack_a(const In* X, int64_t Q, int64_t d, int64_t g, int64_t q0, A* o) { pack_queries(X, Q, d, g, q0, o); }
  static void pack_b(const In* Y, int64_t N, int64_t d, int64_t g, int64_t r0, B* o) { pack_refs(Y, N, d, g, r0, o); }
  static void micro(const A* a, const B* b, int64_t g, Acc* c, int64_t ldc, bool acc) { micro_f32(a, b, g, c, ldc, acc); }
};
template <typename T>
struct Bf16Screen {  // float or double rows; Acc ~ bf16(x - mu) . bf16(y - mu)
  using In = T; using A = uint16_t; using B = uint16_t; using Acc = float;
  static constexpr int64_t G = 2;
  const float* mu;  // d per-feature shifts
  MicroBf16 kernel;
  void pack_a(const In* X, int64_t Q, int64_t d, int64_t, int64_t q0, A* o) const { pack_queries_bf16(X, Q, d, mu, q0, o); }
  void pack_b(const In* Y, int64_t N, int64_t d, int64_t, int64_t r0, B* o) const { pack_refs_bf16(Y, N, d, mu, r0, o); }
  void micro(const A* a, const B* b, int64_t g, Acc* c, int64_t ldc, bool acc) const { kernel(a, b, g, c, ldc, acc); }
};

// Calls epilogue(q0, q1, j0, j1, C, ldc) for every block, C[(q - q0) * ldc + (j - j0)]
// holding Kernel's dot product of query q and ref j. Within one query row, blocks arrive
// in increasing j, and every row is handled by one thread at a time.
template <typename Kernel, typename Epilogue>
void for_each_dot_block(const Kernel& kernel, const typename Kernel::In* X, int64_t Q, const typename Kernel::In* Y, int64_t N, int64_t d,
                        Epilogue&& epilogue) {
  using Acc = typename Kernel::Acc;
  constexpr int64_t G = Kernel::G;
  const int64_t groups = (d + G - 1) / G;
  const int64_t panel_elems = groups * NR * G, tile_elems = groups * MR * G;
  // Queries are packed once per super-block of at most ~32 MB (not once per ref block):
  // memory stays bounded while packing stays a small fraction of the work.
  const int64_t super_rows = std::max<int64_t>(
      kQueryBlock, (int64_t(32) << 20) / (d * int64_t(sizeof(typename Kernel::A))) / kQueryBlock * kQueryBlock);
  std::vector<typename Kernel::B> refs_packed(static_cast<size_t>((kRefBlock / NR) * panel_elems));
  std::vector<typename Kernel::A> queries_packed(
      static_cast<size_t>(std::min(super_rows, (Q + MR - 1) / MR * MR) / MR * tile_elems));

  for (int64_t s0 = 0; s0 < Q; s0 += super_rows) {
    const int64_t s1 = std::min(Q, s0 + super_rows);
    const int64_t s_tiles = (s1 - s0 + MR - 1) / MR;
    at::parallel_for(0, s_tiles, 8, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t)
        kernel.pack_a(X, Q, d, groups, s0 + t * MR, queries_packed.data() + t * tile_elems);
    });
    const int64_t q_blocks = (s1 - s0 + kQueryBlock - 1) / kQueryBlock;
    for (int64_t j0 = 0; j0 < N; j0 += kRefBlock) {
      const int64_t j1 = std::min(N, j0 + kRefBlock);
      const int64_t panels = (j1 - j0 + NR - 1) / NR;
      at::parallel_for(0, panels, 1, [&](int64_t b, int64_t e) {
        for (int64_t p = b; p < e; ++p)
          kernel.pack_b(Y, N, d, groups, j0 + p * NR, refs_packed.data() + p * panel_elems);
      });
      at::parallel_for(0, q_blocks, 1, [&](int64_t b, int64_t e) {
        const int64_t ldc = panels * NR;
        std::vector<Acc> C(static_cast<size_t>(kQueryBlock * ldc));
        for (int64_t blk = b; blk < e; ++blk) {
          const int64_t q0 = s0 + blk * kQueryBlock, q1 = std::min(s1, q0 + kQueryBlock);
          const int64_t tiles = (q1 - q0 + MR - 1) / MR;
          const typename Kernel::A* a0 = queries_packed.data() + blk * (kQueryBlock / MR) * tile_elems;
          for (int64_t g0 = 0; g0 < groups; g0 += kGroups) {
            const int64_t gn = std::min(kGroups, groups - g0);
            for (int64_t p = 0; p < panels; ++p) {
              const typename Kernel::B* bp = refs_packed.data() + p * panel_elems + g0 * NR * G;
              for (int64_t t = 0; t < tiles; ++t)
                kernel.micro(a0 + t * tile_elems + g0 * MR * G, bp, gn, C.data() + t * MR * ldc + p * NR, ldc, g0 > 0);
            }
          }
          epilogue(q0, q1, j0, j1, static_cast<const Acc*>(C.data()), ldc);
        }
      });
    }
  }
}

}  // namespace diffmem::knn::blocked
