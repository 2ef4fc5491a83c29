"""diffmem::optimal_denoise on GPUs: streaming over the training set on tensor cores.

The same contract as the op (csrc/ops.cpp; topk 0 only, float32 x): for x (B, d) and
training rows y_n (uint8 read as img / 127.5 - 1, bfloat16 or float32),

    D = sum_n w_n y_n,  w = softmax_n(l_n),  l_n = -||x - m y_n||^2 / (2 sigma^2),

and lse = log sum_n exp(l_n). Chunks of the training set stream past all queries with an
online softmax (running max, sum and weighted sum), so memory is O(B d + B * chunk).

Precision. The weighted sum runs as a float16 GEMM with float32 accumulation and output
(the tensor cores' fast path); so do the logits' products x . p for float rows, which is
why a logit needs care:
  * uint8 rows (pixels: CIFAR-10, MNIST) take int8 tensor cores instead (where
    torch._int_mm runs: int8_works; else the float16 path below), whose int32 sums are
    exact: p = v - 128 is int8 as it is, and x goes in int8 terms with per-query
    scales (int8_terms: 8 bits a term; two terms leave |e| <= 2^-16 max |x| per feature,
    three 2^-24), the int32 products combined in float64. x . p then errs by e . p alone:
    rigorously at most ||e|| ||p||, estimated as a random walk of INT8_WALK deviations, and
    no accumulation error and no model of the GPU's accumulator is needed. A chunk starts at
    two terms (one int8 GEMM, half a float16 one's time at the H100's peaks) and moves up
    to three (middle sigma), then to the float64 GEMM; the rules below (error bound and
    estimate, direct differences, weights) are the same.
  * x . y_n for float rows: first with one float16 term of x and of the rows (x = hi + O(2^-11 |x|)): at
    large sigma the logits are divided by so much that this is enough, and at small sigma
    only the few items that matter are inexact, which direct differences fix (below). Where
    many items would be inexact (middle sigma) the chunk moves up to two terms: x = hi + lo
    + O(2^-22 |x|), both multiplied by the rows, which are exact in float16 (uint8 pixel
    values 0..255, bfloat16 in range) or split the same way (float32 rows: hi . y_hi +
    lo . y_hi + hi . y_lo). What is left is the float32 accumulation, about what a float32
    GEMM errs.
  * The expansion logit l = (2 m x.y - m^2 ||y||^2 - ||x||^2) / (2 sigma^2) then carries
    a rigorous error bound E and an estimate A (the same rounding model as the CPU op,
    csrc/denoiser/cpu/optimal_cpu.cpp). Items whose logit is, by E, more than NEGLIGIBLE
    below the row's best weigh < e^-50 and are dropped; items with A <= LOGIT_TOL keep the
    expansion logit; the others (the few nearest items at small sigma, near-ties) get
    ||x - m y_n||^2 by direct differences in float64 (one fused gather-and-reduce).
  * Where a chunk still has many such items (middle sigma, where many items matter and the
    float32 error is not yet divided away), it moves up a tier: the products accumulated
    in float32 over blocks of BLOCK_K features and summed in float64 (the error grows with
    the block, not with d), then, if that is not enough, one float64 GEMM. On CIFAR-10 rows
    the blocked tier leaves at most a few percent of items to direct differences at every
    sigma, so the float64 GEMM is a safety net.
  * Weights exp(l - max) in [0, 1] are scaled by 2^15 before rounding to float16 (so
    nothing that matters underflows) and the sum of the weights as multiplied is the
    denominator: D is an exact convex combination of perturbed weights. A float16 weight
    errs by up to 2^-11 of itself, which moves D by up to 2^-11 max ||y_n - D|| when the
    errors align (few items carrying the weight, or duplicates): as much as the whole
    5e-4 budget. So the rounding residuals w_lo of the items that hold at least 1/1024 of
    some query's final weight are multiplied too (HeavyItems: one more product at the end,
    over those rows only): their weights are then exact to 2^-22, and what the others can
    add up to is 2^-11 of their share, random in sign unless they are duplicates. The
    log-sum-exp takes the sum of the exact (float64) weights.
    Where few weights of a chunk are nonzero (small sigma), the weighted sum multiplies
    only the rows some query weighs.
The tensor-core products `mm_f16_f32`/`bmm_f16_f32` are torch.mm/bmm(..., out_dtype=float32) on CUDA; on the
CPU (tests) it is emulated by a float32 product of the same float16 operands, which is
exact product by product (11-bit by 11-bit mantissas), so only the summation order differs.
`mm_i8_i32` is torch._int_mm on both, exact on both.
"""
from __future__ import annotations

import math
import os
import warnings
import weakref

import torch

from .reference.optimal import rows_as_float64

NEGLIGIBLE = 50.0  # e^-50 = 2e-22 relative weight: cannot move D
LOGIT_TOL = 2e-4  # largest accepted error estimate of an expansion logit (as the CPU op)
WEIGHT_SCALE = 2.0**15  # weights in (0, 1] -> (0, 2^15] before rounding to float16
# (query, item) pairs per direct-difference batch, as bytes of gathered float64 rows: eager
# kernels materialize them (~2^27 bytes per batch); the fused (compiled) one reads them in
# place. Its batch stays bounded by d all the same: should Dynamo run a stage eagerly after
# all (it does so silently past its recompile limit), each temporary is 2^30 bytes at most.
EAGER_PAIR_BYTES = 1 << 27
FUSED_PAIR_BYTES = 1 << 30
# A chunk moves up a precision tier (see the loop) when more than this share of its items
# would need direct differences: from one float16 term to two (one more GEMM), from two to
# the blocked products (about 2.5 float16 GEMMs' worth), from those to the float64 GEMM
# (about 13); modelled H100 costs, with direct differences at a few ns per pair.
ESCALATE = (1 / 96, 1 / 64, 1 / 16)
# The first chunks take two float16 terms; once a chunk has few items that matter (under
# half of ESCALATE[0]: small sigma), the later ones start from one term.
FIRST_TIER = 1
# uint8 training sets take int8 tensor cores instead (exact int32 sums, twice the float16
# rate on H100): two int8 terms of x, three, the float64 GEMM; a chunk moves up past these
# shares (the third term costs half a float16 GEMM, the float64 GEMM about 13).
ESCALATE_INT8 = (1 / 192, 1 / 16)
INT8_STEP = 254.0  # each int8 term of x resolves the last one's residual (|r| <= c/2) into [-127, 127]
INT8_TERMS = 3
INT8_WALK = 6.0  # deviations of x's residual . p counted in the estimate: P(|N(0,1)| > 6) = 2e-9 per pair
BLOCK_K = 256  # features per float32-accumulated block of the blocked products
U32 = 2.0**-23  # float32 accumulation, counted as truncation (one ulp)
U64 = 2.0**-53
SPLIT = 2.0**-21  # |v - hi - lo| <= 2^-22 |v| per float16 split; doubled for the dropped lo.lo
SPLIT_ONE = 2.0**-10  # |v - hi| <= 2^-11 |v| for one float16 term (x's), doubled; 2x more for split rows
SPARSE_WEIGHTS = 256  # a chunk with under 1/256 of its weights nonzero multiplies only the rows they weigh
HEAVY_SHARE = 1024  # items holding >= 1/1024 of a query's weight get their rounding residual added
F16_MAX_SAFE = 2.0**14  # |x| is scaled by a power of two below this before the split
# torch.mm/bmm(..., out_dtype=float32) on float16 CUDA operands came in torch 2.8; addmm
# with a float32 accumulator in 2.10 (pytorch/pytorch#167931): before that, add after.
_TORCH = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
HAS_OUT_DTYPE, HAS_ADDMM_F32_ACC = _TORCH >= (2, 8), _TORCH >= (2, 10)


def chunk_rows(B: int, N: int, d: int) -> int:
    """Training rows per chunk: up to 2^23 logits (fewer chunks: less per-chunk launch and
    sync overhead), at most 4 d rows (so a chunk's float64 logits stay O(B d))."""
    return int(max(1, min(N, 16384, max(256, (1 << 23) // max(1, B)), max(1024, 4 * d))))


def pair_batch_size(d: int, fused: bool) -> int:
    """(query, item) pairs per direct-difference batch for rows of d features."""
    return max(16, (FUSED_PAIR_BYTES if fused else EAGER_PAIR_BYTES) // (8 * d))


def mm_f16_f32(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) @ b (K, N) (+ acc) for float16 operands, with float32 accumulation and
    result (a new tensor)."""
    if a.is_cuda:
        if acc is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        if not HAS_ADDMM_F32_ACC:
            return torch.mm(a, b, out_dtype=torch.float32).add_(acc)
        return torch.addmm(acc, a, b, out_dtype=torch.float32)
    if acc is None:
        return torch.mm(a.float(), b.float())
    return torch.addmm(acc, a.float(), b.float())


def mm_i8_i32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b (K, N) for int8 operands, exact int32 result (int8 tensor cores on
    CUDA, which ask for M > 16, K and N multiples of 8 and b K-major)."""
    return torch._int_mm(a, b)


def int8_fits(d: int) -> bool:
    """Whether int32 holds every x-term . p sum over d features (|q| <= 127, |p| <= 128)."""
    return hasattr(torch, "_int_mm") and round8(d) * 127 * 128 < 2**31


_INT8_WORKS: dict[str, bool] = {}


def int8_works(device: torch.device) -> bool:
    """Whether mm_i8_i32 runs on `device`, probed once per device type with the kernel's
    shapes and layouts (R x K by K-major K x n, all multiples of 8): where it does not (an
    old GPU, a torch without int8 products there), uint8 rows take the float16 path, with a
    warning, rather than failing every call."""
    key = device.type
    if key not in _INT8_WORKS:
        R, d8 = int8_shapes(1, 8)
        try:
            a = torch.ones(R, d8, dtype=torch.int8, device=device)
            b = torch.ones(8, d8, dtype=torch.int8, device=device)
            ok = bool((torch._int_mm(a, b.T) == d8).all())  # what mm_i8_i32 calls
        except RuntimeError as exc:
            warnings.warn(f"diffmem.optimal_stream: int8 products unavailable on {key} "
                          f"({str(exc).splitlines()[0][:200]}); uint8 rows take the float16 path")
            ok = False
        _INT8_WORKS[key] = ok
    return _INT8_WORKS[key]


def round8(n: int) -> int:
    return -(-n // 8) * 8


def int8_padded(p: torch.Tensor, cols: int) -> torch.Tensor:
    """int8 rows p zero-padded to a multiple of 8 rows and to `cols` features (what
    torch._int_mm asks of its second operand on CUDA)."""
    pad_rows, pad_cols = round8(p.shape[0]) - p.shape[0], cols - p.shape[1]
    return torch.nn.functional.pad(p, (0, pad_cols, 0, pad_rows)) if pad_rows or pad_cols else p


def int8_shapes(B: int, d: int) -> tuple[int, int]:
    """Rows per int8 term of x and padded features: torch._int_mm on CUDA asks for more
    than 16 rows and K a multiple of 8."""
    return max(24, round8(B)), round8(d)


def int8_terms(xd: torch.Tensor, rows_out: int, cols_out: int):
    """x (B, d) float64 = sum_j c_j q_j + e in INT8_TERMS int8 terms q_j, with per-query
    scales c_1 = max |x| / 127 and c_{j+1} = c_j / INT8_STEP: each term adds 8 bits, so two
    leave |e| <= 2^-16 max |x| per feature and three 2^-24. Returns q (terms, rows_out,
    cols_out) zero-padded (what torch._int_mm asks for), c (B, terms) and ||e|| / ||x||
    after each term (B, terms; 0 where x = 0). e is x minus the terms' float64 sum, which is
    exact to 2^-52 |x|: far inside the error bound's 3 d u term."""
    B, d = xd.shape
    top = xd.abs().amax(1, keepdim=True)
    c = torch.where(top > 0, top / 127.0, torch.ones_like(top))
    xn = xd.norm(dim=1, keepdim=True)
    q = torch.zeros(INT8_TERMS, rows_out, cols_out, dtype=torch.int8, device=xd.device)
    approx = torch.zeros_like(xd)
    scales, rel = [], []
    for j in range(INT8_TERMS):
        qj = torch.round((xd - approx) / c).clamp_(-127, 127)
        q[j, :B, :d] = qj.to(torch.int8)
        approx = approx + c * qj
        scales.append(c)
        rel.append(torch.where(xn > 0, (xd - approx).norm(dim=1, keepdim=True) / xn.clamp_min(1e-300), 0.0))
        c = c / INT8_STEP
    return q, torch.cat(scales, 1), torch.cat(rel, 1)


def bmm_f16_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched a (k, M, K) @ b (k, K, N) for float16 operands, float32 accumulation and result."""
    if a.is_cuda:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def split_f16(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v (float32/float64) = hi + lo + O(2^-22 |v|) with hi, lo float16; |v| < 2^15."""
    hi = v.to(torch.float16)
    lo = (v - hi.to(v.dtype)).to(torch.float16)
    return hi, lo


def _pow2_scale(top: float, what: str = "train") -> float:
    """A power of two s with max |s v| <= 2^14 for max |v| = top: float16 neither
    overflows nor, for what matters, underflows; multiplying by s is exact."""
    if not math.isfinite(top):
        raise ValueError(f"optimal_denoise: {what} contains NaN or inf")
    if top == 0.0:
        return 1.0
    return 2.0 ** math.floor(math.log2(F16_MAX_SAFE / top))


class _Train:
    """The training set in the forms the products need, per call: y_n = a p_n + b for the
    product rows p_n, whose float16 terms `hi` (+ `lo`) a chunk converts on the fly. uint8
    pixels v give p = v - 128 (exact in float16), a = 1 / 127.5, b = 0.5 / 127.5; float
    rows p = s_y y (a power of two s_y, so float16 neither overflows nor underflows), a =
    1 / s_y, b = 0, split into two float16 terms; bfloat16 rows are exact in float16 (8 of
    its 11 bits; values below 2^-24 of the largest excepted) and need no second term.
    Squared norms ||y_n||^2 and norms ||p_n|| (the error model's) come in one pass,
    remembered for the next call on the same set (_cached_norms)."""

    def __init__(self, train: torch.Tensor, step: int):
        self.raw = train
        self.uint8 = train.dtype == torch.uint8
        self.split = train.dtype == torch.float32
        self.s_y, self.ny, self.pn, self.yn = _cached_norms(train, step)
        self.a, self.b = (1.0 / 127.5, 0.5 / 127.5) if self.uint8 else (1.0 / self.s_y, 0.0)

    def product_rows(self, n0: int, n1: int):
        """float16 terms (hi, lo or None) of p_n for rows [n0, n1)."""
        return self.product_terms(self.raw[n0:n1])

    def product_rows_at(self, index: torch.Tensor):
        """The same for the rows `index` (a 1-d index tensor)."""
        return self.product_terms(self.raw.index_select(0, index))

    def product_terms(self, rows: torch.Tensor):
        if self.uint8:
            return rows.to(torch.float16) - 128.0, None  # integers: exact in float16
        if not self.split:
            return (rows * self.s_y).to(torch.float16), None
        return split_f16(rows * self.s_y)

    def int8_rows(self, n0: int, n1: int, cols: int) -> torch.Tensor:
        """p_n = v - 128 (uint8 rows) as int8 for rows [n0, n1), zero-padded to a multiple
        of 8 rows and to `cols` features (torch._int_mm's shapes on CUDA)."""
        return int8_padded((self.raw[n0:n1].to(torch.int16) - 128).to(torch.int8), cols)

    def as_float64(self, n0: int, n1: int) -> torch.Tensor:
        return rows_as_float64(self.raw[n0:n1])


def _train_norms(train: torch.Tensor, step: int):
    """s_y, ||y_n||^2, ||p_n|| and ||y_n|| (float64) of a training set, in chunks of `step`
    rows (no float64 copy of the whole set)."""
    uint8 = train.dtype == torch.uint8
    if uint8:
        s_y = 1.0
    else:
        low, high = torch.aminmax(train)  # no temporary of train's size
        s_y = _pow2_scale(max(-float(low), float(high)))
    N = train.shape[0]
    ny = torch.empty(N, dtype=torch.float64, device=train.device)
    pn = torch.empty_like(ny)
    for n0 in range(0, N, step):
        r = train[n0 : n0 + step].double()
        if uint8:
            ny[n0 : n0 + step] = (r - 127.5).square().sum(1) / 127.5**2
            pn[n0 : n0 + step] = (r - 128.0).square().sum(1).sqrt()
        else:
            ny[n0 : n0 + step] = r.square().sum(1)
            pn[n0 : n0 + step] = ny[n0 : n0 + step].sqrt() * s_y
    if not bool(torch.isfinite(ny).all()):
        raise ValueError("optimal_denoise: train contains NaN or inf")
    return s_y, ny, pn, ny.sqrt()


_NORMS_CACHE: dict = {}


def _cached_norms(train: torch.Tensor, step: int):
    """_train_norms, computed once for a training set used call after call (a sampler's
    every step): over N = 50,000 CIFAR-10 rows the norms pass reads and converts the whole
    set, several times the tensor cores' time for B = 512 queries. The last training set is
    remembered by a weak reference to its base tensor and the view's version counter
    (bumped by any in-place change), offset, shape, strides and dtype: a freed or modified
    set is computed again."""
    base = train._base if train._base is not None else train
    key = (train._version, train.storage_offset(), tuple(train.shape), tuple(train.stride()), train.dtype,
           train.device)
    entry = _NORMS_CACHE.get("last")
    if entry is not None and entry[0]() is base and entry[1] == key:
        return entry[2]
    norms = _train_norms(train, step)
    _NORMS_CACHE["last"] = (weakref.ref(base), key, norms)
    return norms


def small_products(x_hi, x_lo, hi, lo):
    """s x . p without its large term x_hi . hi: x_lo . hi (+ x_hi . lo for split rows),
    float32 accumulation; tier 1 adds x_hi . hi to it (small terms first)."""
    t = mm_f16_f32(x_lo, hi.T)
    return t if lo is None else mm_f16_f32(x_hi, lo.T, t)


def product_error(coh, inc, xp, u, split, c_coh: float, d: int, walk: float = 3.0):
    """The estimated error of x . p (see chunk_logits): coherent c_coh u coh, incoherent
    3 u inc, and the split residuals as a random walk of `walk` standard deviations."""
    return u * (c_coh * coh + 3.0 * inc) + walk * split * xp / math.sqrt(d)


def chunk_logits(t, t_scale, x_sum, nx, xn, ny, pn, m, inv, a, b, run_max, excluded, u, split, d: int,
                 coh=None, inc=None, c_coh: float | None = None, bound_coef: float | None = None,
                 walk: float = 3.0):
    """From t = t_scale x . p (float32 accumulation of unit u, float16 splits leaving a
    relative residual `split`; u = 2^-53, split = 0 for the float64 fallback; t_scale, a,
    b, u and split are 0-d float64 tensors, so the compiled form never specializes on
    their values): the row
    references ref (B, 1), the logits relative to them (-inf for negligible or excluded
    items; float64, as ref can lie far below the best logit when its bound is wide), which
    kept items have a too inexact logit, and how many. Elementwise work and two row
    reductions, written to be fused by torch.compile.

    The error of x . p is estimated as the CPU op does: a coherent part c_coh u coh (coh =
    |t|, c_coh = sqrt(d): partial sums growing together) and an incoherent one 3 u inc
    (inc = ||x|| ||p||), plus the split residuals, independent roundings that add up like a
    random walk, ~split ||x|| ||p|| / sqrt(d), counted three times. The rigorous bound is
    bound_coef ||x|| ||p|| (default: gamma_d for up to three products and the splits'
    worst case). The blocked products pass their own coh, inc, c_coh and bound_coef."""
    t = t.double() / t_scale
    ny, pn = ny[None], pn[None]
    dot = a * t + b * x_sum  # x . y
    xp = xn * pn
    coh = t.abs() if coh is None else coh / t_scale
    inc = xp if inc is None else inc
    c_coh = math.sqrt(d) if c_coh is None else c_coh
    bound_coef = 3.0 * d * u + 2.0 * split if bound_coef is None else bound_coef
    err = a * product_error(coh, inc, xp, u, split, c_coh, d, walk)
    bound = a * 1.25 * bound_coef * xp
    L = -(nx + m * m * ny - 2.0 * m * dot) * inv
    sums = U64 * 4 * (nx + m * m * ny + 2.0 * m * dot.abs())
    E = (2.0 * m * bound + 1.25 * sums) * inv
    A = (2.0 * m * err + sums) * inv
    if excluded is not None:
        L = L.masked_fill(excluded, -math.inf)
    ref = torch.maximum(run_max, (L - E).amax(1, keepdim=True))
    keep = torch.isfinite(L) & ((L + E) >= ref - NEGLIGIBLE)
    rel = torch.where(keep, L - ref, -math.inf)
    inexact = keep & (A > LOGIT_TOL)
    return ref, rel, inexact, torch.stack([inexact.sum(), keep.sum()])


def chunk_logits_blocked(tb, t_rest, inc, t_scale, x_sum, nx, xn, ny, pn, m, inv, a, b, run_max, excluded,
                         u, split, d: int):
    """chunk_logits for x . p accumulated in float32 over blocks of BLOCK_K features and
    summed in float64: tb (blocks, B, n) holds hi . p per block, t_rest the small products
    (lo . p, and hi . p_lo for split rows) in one float32 GEMM; inc = sqrt(sum over blocks
    of ||x_b||^2 ||p_b||^2). The float32 error then grows with the block length instead of
    d: sqrt(d / BLOCK_K) times smaller, which keeps middle sigma off the float64 GEMM."""
    t = tb.double().sum(0) + t_rest.double()
    coh = tb.double().abs().sum(0) + t_rest.double().abs()
    bound_coef = BLOCK_K * u + 2.0**-9 * d * u + 2.0 * split  # gamma_K per block; the small products
    return chunk_logits(t, t_scale, x_sum, nx, xn, ny, pn, m, inv, a, b, run_max, excluded, u, split, d,
                        coh=coh, inc=inc, c_coh=math.sqrt(BLOCK_K), bound_coef=bound_coef)


def chunk_logits_int8(t2, t3, c, split, x_sum, nx, xn, ny, pn, m, inv, a, b, run_max, excluded, one, u, d: int):
    """chunk_logits for x . p from exact int32 products of x's int8 terms with the rows
    (uint8 - 128): t2 (2 R, n8) holds terms 1 and 2 (R rows each, padded), t3 (R, n8) term
    3 or None; c (B, terms) the terms' scales. Summed in float64, x . p errs only by
    e . p for x's residual e after the terms, with ||e|| = split ||x|| (split per query,
    (B, 1)): the estimate and bound of chunk_logits with split that, and u = 2^-53. There
    e . p is the whole error, so its random walk is taken at INT8_WALK deviations: what
    the largest of a call's ~10^7 pairs reaches (3 is exceeded by a few of them)."""
    B, n, R = nx.shape[0], ny.shape[0], t2.shape[0] // 2
    t = t2[:B, :n].double() * c[:, 0:1] + t2[R : R + B, :n].double() * c[:, 1:2]
    if t3 is not None:
        t = t + t3[:B, :n].double() * c[:, 2:3]
    return chunk_logits(t, one, x_sum, nx, xn, ny, pn, m, inv, a, b, run_max, excluded, u, split, d,
                        walk=INT8_WALK)


def chunk_weights(rel, ref, run_max, run_sum, run_exact, acc):
    """Online softmax step: the new running max, the chunk's weights exp(l - max) * 2^15
    in float16, which of them may hold at least 1/HEAVY_SHARE of their query's weight so
    far (a superset: read off the rounded weights, 2^-10 to spare), the running sums of the
    rounded and of the exact weights, the accumulator rescaled to the new max, and the
    rescaling factor and shift (exact = exp(rel + shift) * 2^15) per query."""
    chunk_max = rel.amax(1, keepdim=True) + ref
    new_max = torch.maximum(run_max, chunk_max)
    safe_max = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
    factor = torch.where(torch.isfinite(run_max), torch.exp(run_max - safe_max), torch.zeros_like(run_max))
    shift = torch.where(torch.isfinite(ref), ref - safe_max, torch.zeros_like(ref))
    exact = torch.exp(rel + shift) * WEIGHT_SCALE
    w = exact.to(torch.float16)
    new_sum = run_sum * factor + w.double().sum(1, keepdim=True)
    new_exact = run_exact * factor + exact.sum(1, keepdim=True)
    maybe_heavy = w.double() * (HEAVY_SHARE * (1.0 + 2.0**-10)) >= new_exact
    return new_max, w, maybe_heavy, new_sum, new_exact, acc * factor.float(), factor, shift


def product_over_columns(acc, w, hi, lo, cols):
    """acc + w @ (hi + lo) (rows p_n in one or two float16 terms), over the columns `cols`
    only where they are fewer than half (None: all): the same tensor-core product over
    fewer columns, deterministic (no atomics). Returns it and the weights it multiplied."""
    if cols is not None and cols.numel() * 2 < w.shape[1]:
        w, hi = w.index_select(1, cols), hi.index_select(0, cols)
        lo = None if lo is None else lo.index_select(0, cols)
    acc = mm_f16_f32(w, hi, acc)
    return (acc if lo is None else mm_f16_f32(w, lo, acc)), w


def weighted_sum(acc, w, hi, lo, n_kept: int):
    """acc + w @ (hi + lo). Where few weights are nonzero (small sigma: n_kept items at
    most), only the rows some query weighs take part: far less work than the dense one."""
    sparse = n_kept * SPARSE_WEIGHTS < w.numel()
    active = torch.nonzero(w.ne(0).any(0)).squeeze(1) if sparse else None  # a host sync, in this case only
    return product_over_columns(acc, w, hi, lo, active)[0]


class HeavyItems:
    """The (query, item) pairs holding at least 1/HEAVY_SHARE of their query's weight so
    far, with their exact weights and float16 rounding residuals in units of the running
    max (as run_exact). A share only falls as the sum grows, so after every chunk the pairs
    that no longer hold it are dropped for good: at the end exactly those holding
    1/HEAVY_SHARE of the final weight remain (at most HEAVY_SHARE a query, whatever N),
    and only their residuals are multiplied, once (add_weight_residuals). Judged per chunk
    instead, the first chunks' items, weighed against the little summed so far, would all
    count: on CIFAR-10 (bench/optimal_work.py) up to twice the columns."""

    def __init__(self, device: torch.device):
        self.q = torch.empty(0, dtype=torch.long, device=device)
        self.n = torch.empty_like(self.q)
        self.exact = torch.empty(0, dtype=torch.float64, device=device)
        self.lo = torch.empty_like(self.exact)

    def add_chunk(self, maybe_heavy, rel, shift, w, factor, run_exact, n0: int) -> None:
        """Rescale the kept pairs to the new running max (factor), add the chunk's
        candidates (maybe_heavy, items n0 + column) and keep those that hold the share."""
        f = factor[self.q, 0]
        q, n = maybe_heavy.nonzero(as_tuple=True)  # a host sync
        exact = torch.exp(rel[q, n] + shift[q, 0]) * WEIGHT_SCALE  # as chunk_weights computed it
        lo = exact - w[q, n].double()
        self.q, self.n = torch.cat([self.q, q]), torch.cat([self.n, n + n0])
        self.exact, self.lo = torch.cat([self.exact * f, exact]), torch.cat([self.lo * f, lo])
        keep = torch.nonzero(self.exact * HEAVY_SHARE >= run_exact[self.q, 0]).squeeze(1)
        self.q, self.n, self.exact, self.lo = (t.index_select(0, keep) for t in (self.q, self.n, self.exact, self.lo))


def add_weight_residuals(acc, run_sum, heavy: HeavyItems, rows, block: int):
    """acc + w_lo @ (hi + lo) for the heavy pairs' residuals w_lo (rounded to float16), over
    the rows some query holds heavy, `block` of them at a time (memory as a chunk's), and
    the residuals added to the running sum: those items' weights are then exact to 2^-22."""
    if heavy.q.numel() == 0:
        return acc, run_sum
    cols, at = torch.unique(heavy.n, return_inverse=True)
    for c0 in range(0, cols.numel(), block):
        c1 = min(c0 + block, cols.numel())
        pick = torch.nonzero((at >= c0) & (at < c1)).squeeze(1)  # a host sync
        w_lo = torch.zeros(acc.shape[0], c1 - c0, dtype=torch.float64, device=acc.device)
        w_lo[heavy.q[pick], at[pick] - c0] = heavy.lo[pick]  # one entry per pair: no accumulation, deterministic
        w_lo = w_lo.to(torch.float16)
        hi, lo = rows.product_rows_at(cols[c0:c1])
        acc = product_over_columns(acc, w_lo, hi, lo, None)[0]
        run_sum = run_sum + w_lo.double().sum(1, keepdim=True)
    return acc, run_sum


def pair_logits(x, rows, q, n, m, inv):
    """-||x_q - m_q y_n||^2 / (2 sigma_q^2) by direct differences in float64 for the pairs
    (q, n) of the stored rows (uint8 read as img / 127.5 - 1). Compiled, the gathers and
    the reduction fuse into one kernel that reads the rows where they lie."""
    y = rows_as_float64(rows[n])
    diff = x[q].double() - m[q] * y
    return -diff.square().sum(1) * inv[q, 0]


def _stages(device: torch.device):
    """The elementwise stages, compiled into fused kernels by torch.compile where
    DIFFMEM_OPTIMAL_COMPILE says so (default: on CUDA only; "1" everywhere, "0" never).
    Should compilation fail (no working Triton, say), the eager stages take over with a
    warning: same results, more kernels."""
    flag = os.environ.get("DIFFMEM_OPTIMAL_COMPILE")
    stages = (chunk_logits, chunk_logits_blocked, chunk_logits_int8, chunk_weights, pair_logits)
    if not (flag == "1" or (flag is None and device.type == "cuda")):
        return stages + (False,)
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = tuple(_compiled_or_eager(f) for f in stages) + (True,)
    return _COMPILED


def _compiled_or_eager(fn):
    compiled = torch.compile(fn, dynamic=True)
    state = {"fn": compiled}

    def call(*args):
        try:
            return state["fn"](*args)
        except torch.OutOfMemoryError:
            raise  # memory, not the compiler: eager would need more
        except Exception as exc:  # a compiler failure, not a numerical one: eager computes the same
            if state["fn"] is fn:
                raise
            warnings.warn(f"diffmem.optimal_stream: torch.compile of {fn.__name__} failed "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); using eager kernels")
            state["fn"] = fn
            return fn(*args)

    return call


_COMPILED = None


def handles(x: torch.Tensor, train: torch.Tensor, topk: int) -> bool:
    """Whether this implementation applies: the full softmax over float32 queries and a
    uint8/bfloat16/float32 training set. (float64 asks for float64 accuracy, and top-k
    for exact neighbours: the float64 reference does those.) On CUDA it needs torch >= 2.8."""
    if x.is_cuda and not HAS_OUT_DTYPE:
        return False
    return topk == 0 and x.dtype == torch.float32 and train.dtype in (torch.uint8, torch.bfloat16, torch.float32)


def optimal_denoise(x, train, sigma, scale, labels=None, train_labels=None, topk=0):
    """The op for float32 x and a uint8/bfloat16/float32 training set (see module doc)."""
    if not handles(x, train, topk):
        raise ValueError("optimal_stream handles topk=0, float32 x and uint8/bfloat16/float32 train")
    # The op has no autograd; one grad mode also keeps the compiled stages from compiling
    # a second graph per signature (grad mode is part of their guards).
    with torch.no_grad():
        if x.shape[0] == 1:
            # one query as two: Dynamo specializes sizes 0 and 1, and each would compile its
            # own graphs of every stage (seconds of Triton on a GPU)
            D, lse = _optimal_denoise(x.repeat(2, 1), train, sigma.repeat(2), scale.repeat(2),
                                      None if labels is None else labels.repeat(2), train_labels)
            return D[:1].clone(), lse[:1].clone()
        return _optimal_denoise(x, train, sigma, scale, labels, train_labels)


def _optimal_denoise(x, train, sigma, scale, labels, train_labels):
    B, d = x.shape
    N = train.shape[0]
    dev = x.device
    logits_stage, blocked_stage, int8_stage, weights_stage, pairs_stage, fused = _stages(dev)
    pair_batch = pair_batch_size(d, fused)
    step = chunk_rows(B, N, d)
    rows = _Train(train, step)
    xd = x.double()
    nx = xd.square().sum(1, keepdim=True)
    xn = nx.sqrt()
    m = scale.double().to(dev)[:, None]
    inv = 1.0 / (2.0 * sigma.double().to(dev)[:, None] ** 2)
    s = _pow2_scale(float(x.abs().max()), "x")
    x_hi, x_lo = split_f16(x * s)
    x_sum = xd.sum(1, keepdim=True)
    # every scalar a compiled stage takes is a 0-d tensor: a Python float would be guarded
    # on its value, a graph for each
    split_one = SPLIT_ONE * (2.0 if rows.split else 1.0)  # one float16 term of x (and of split rows)
    scalars = torch.tensor([s, rows.a, rows.b, 1.0, 0.0, U32, U64, SPLIT, split_one], dtype=torch.float64, device=dev)
    s_t, a_t, b_t, one, zero, u32, u64, split_two, split_one = scalars.unbind()

    run_max = torch.full((B, 1), -math.inf, dtype=torch.float64, device=dev)  # absolute logits
    run_sum = torch.zeros((B, 1), dtype=torch.float64, device=dev)  # weights as multiplied, in WEIGHT_SCALE units
    run_exact = torch.zeros_like(run_sum)  # the exact weights (the log-sum-exp's)
    acc = torch.zeros((B, d), dtype=torch.float32, device=dev)  # sum of rounded weights x p_n
    heavy = HeavyItems(dev)  # whose rounding residuals are multiplied at the end

    nb = -(-d // BLOCK_K)
    pad = nb * BLOCK_K - d
    blocked_x = {}  # x's blocks for the blocked products, made on first use

    def in_blocks(v: torch.Tensor) -> torch.Tensor:
        """(rows, d) -> (rows, nb, BLOCK_K), zero-padded where d is not a multiple."""
        return (torch.nn.functional.pad(v, (0, pad)) if pad else v).view(v.shape[0], nb, BLOCK_K)

    def x_blocks():
        if not blocked_x:
            blocked_x["hi"] = in_blocks(x_hi).transpose(0, 1).contiguous()  # (nb, B, K)
            blocked_x["sq"] = in_blocks(xd).square().sum(-1)  # ||x_b||^2, (B, nb)
        return blocked_x["hi"], blocked_x["sq"]

    # Precision tiers of a chunk's logits. Float rows: 0 one float16 term of x and of the
    # rows, 1 two terms (float16 products with float32 accumulation), 2 the same accumulated
    # in blocks, 3 a float64 GEMM. uint8 rows: 0 two int8 terms of x, 1 three, 2 the float64
    # GEMM. A chunk with too many inexact items moves up; later chunks start at the tier the
    # last one needed (sigma, not the chunk, decides it), or at the first once a chunk had
    # few items that matter at all.
    int8 = rows.uint8 and int8_fits(d) and int8_works(dev)
    escalate = ESCALATE_INT8 if int8 else ESCALATE
    top_tier = len(escalate)  # the float64 GEMM
    small = {}  # chunk start -> its small products at tier 1 (int8: its int8 rows and two-term products)
    if int8:
        R, d8 = int8_shapes(B, d)
        x_terms, x_scales, x_rel = int8_terms(xd, R, d8)
        x_two, x_third = x_terms[:2].reshape(2 * R, d8), x_terms[2]
        int8_split = (x_rel[:, 1:2].contiguous(), x_rel[:, 2:3].contiguous())  # after two and three terms

    def expansion(bounds: tuple[int, int], best_so_far: torch.Tensor, tier: int):
        """Chunk [n0, n1)'s product rows, label mask and logits at `tier` (queued, no host sync)."""
        n0, n1 = bounds
        hi, lo = rows.product_rows(n0, n1)
        excluded = None if labels is None else labels[:, None] != train_labels[None, n0:n1]
        return (n0, n1, hi, lo, excluded, tier) + logits_at(tier, n0, n1, hi, lo, excluded, best_so_far)

    def logits_at(tier, n0, n1, hi, lo, excluded, best_so_far):
        common = (x_sum, nx, xn, rows.ny[n0:n1])
        if int8 and tier < top_tier:
            if n0 not in small:  # else kept from tier 0, the chunk moving up from there
                p8 = rows.int8_rows(n0, n1, d8)
                small[n0] = (p8, mm_i8_i32(x_two, p8.T))  # terms 1 and 2 . p, exact
            p8, t2 = small[n0]
            t3 = mm_i8_i32(x_third, p8.T) if tier == 1 else None
            return int8_stage(t2, t3, x_scales, int8_split[tier], *common, rows.pn[n0:n1], m, inv,
                              a_t, b_t, best_so_far, excluded, one, u64, d)
        if tier == top_tier:
            t64 = xd @ rows.as_float64(n0, n1).T
            return logits_stage(t64, one, *common, rows.yn[n0:n1], m, inv, one, zero, best_so_far, excluded,
                                u64, zero, d)
        if tier == 0:
            t = mm_f16_f32(x_hi, hi.T)  # s x_hi . p_hi
            return logits_stage(t, s_t, *common, rows.pn[n0:n1], m, inv, a_t, b_t, best_so_far, excluded,
                                u32, split_one, d)
        t = small.pop(n0, None)  # kept from tier 1 where the chunk moves up from there
        if t is None:
            t = small_products(x_hi, x_lo, hi, lo)  # scaled by s
        if tier == 1:
            small[n0] = t
            t = mm_f16_f32(x_hi, hi.T, t)  # s x . p, float32 accumulation (a new tensor)
            return logits_stage(t, s_t, *common, rows.pn[n0:n1], m, inv, a_t, b_t, best_so_far, excluded,
                                u32, split_two, d)
        xb, xb_sq = x_blocks()
        p_pad = in_blocks(hi)
        tb = bmm_f16_f32(xb, p_pad.permute(1, 2, 0))  # (nb, B, n)
        inc = (xb_sq @ p_pad.float().square().sum(-1).double().T).sqrt()
        return blocked_stage(tb, t, inc, s_t, *common, rows.pn[n0:n1], m, inv, a_t, b_t, best_so_far, excluded,
                             u32, split_two, d)

    tier = 0 if int8 else FIRST_TIER
    starts = list(range(0, N, step))
    if len(starts) > 1 and step > 1 and N - starts[-1] == 1:
        starts[-1] -= 1  # no one-row chunk (a size Dynamo would specialize on): the last takes two
    chunks = list(zip(starts, starts[1:] + [N]))
    pending = expansion(chunks[0], run_max, tier)
    for i in range(len(chunks)):
        # Queue the next chunk's products before this chunk's host sync, so the GPU has work
        # while the host decides. Its negligibility cut uses the running max before this
        # chunk: a lower bound of the true one, so it only keeps more items than needed.
        following = expansion(chunks[i + 1], run_max, tier) if i + 1 < len(chunks) else None
        n0, n1, hi, lo, excluded, chunk_tier, ref, rel, inexact, count = pending
        n_inexact, n_kept = count.tolist()  # the one host sync per chunk (more where the tier moves up)
        while chunk_tier < top_tier and n_inexact > escalate[chunk_tier] * inexact.numel():
            chunk_tier += 1
            ref, rel, inexact, count = logits_at(chunk_tier, n0, n1, hi, lo, excluded, run_max)
            n_inexact, n_kept = count.tolist()
        if n_kept < 0.5 * escalate[0] * inexact.numel():
            tier = 0  # few items matter: the first tier, direct differences for the inexact ones
        else:
            tier = max(tier, chunk_tier, 0 if int8 else 1)
        if n_inexact:
            q, n = inexact.nonzero(as_tuple=True)
            chunk = train[n0:n1]
            for b in range(0, q.shape[0], pair_batch):
                qb, nb_ = q[b : b + pair_batch], n[b : b + pair_batch]
                # fresh index tensors (repeat copies) of two entries or more: the compiled
                # stage guards on its inputs' view bases, offsets and sizes 0 and 1, and
                # would compile a graph for each variant
                reps = 2 if qb.shape[0] == 1 else 1
                pairs = pairs_stage(x, chunk, qb.repeat(reps), nb_.repeat(reps), m, inv)
                rel[qb, nb_] = pairs[: qb.shape[0]] - ref[qb, 0]

        run_max, w, maybe_heavy, run_sum, run_exact, acc, factor, shift = weights_stage(
            rel, ref, run_max, run_sum, run_exact, acc)
        if n_kept:  # else every weight is zero: nothing to add
            acc = weighted_sum(acc, w, hi, lo, n_kept)
        heavy.add_chunk(maybe_heavy, rel, shift, w, factor, run_exact, n0)
        small.pop(n0, None)
        pending = following

    acc, run_sum = add_weight_residuals(acc, run_sum, heavy, rows, step)

    if not bool((run_sum > 0).all()):
        raise RuntimeError("optimal_denoise: a query has no training item to average over")
    D = rows.a * (acc.double() / run_sum) + rows.b  # y = a p + b, and the weights sum to one
    lse = run_max + torch.log(run_exact / WEIGHT_SCALE)
    return D.float(), lse.squeeze(1)
