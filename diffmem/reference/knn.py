"""Reference exact top-k search in plain PyTorch (CPU or CUDA), tile by tile.

Same contract as torch.ops.diffmem.knn_topk: 2-D queries and refs of one dtype (uint8,
float32 or float64), 1 <= k <= min(32, N); returns (squared distances, indices), (Q, k),
ascending, ties by smaller index; squared distances int64 for uint8, float64 otherwise.
"""
from __future__ import annotations

import contextlib
import math

import torch

QUERY_TILE = 1024
REF_TILE = 4096


@contextlib.contextmanager
def ieee_float32_matmul():
    """TF32/bf16 matmuls would break the error bound of the float path. Whichever API the
    user set the precision with is the one restored: since torch 2.9 the legacy getter
    raises once the per-backend settings (torch.backends.*.fp32_precision) were changed."""
    try:
        saved = torch.get_float32_matmul_precision()
    except RuntimeError:
        saved = None
    if saved is not None:
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(saved)
        return
    backends = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
    before = [b.fp32_precision for b in backends]
    for b in backends:
        b.fp32_precision = "ieee"
    try:
        yield
    finally:
        for b, value in zip(backends, before):
            b.fp32_precision = value


def _merge(run_d, run_i, new_d, new_i, k):
    """k best of two candidate lists; run_* hold smaller indices than new_*, so a stable
    sort on distance keeps ties ordered by index."""
    d = torch.cat([run_d, new_d], dim=1)
    i = torch.cat([run_i, new_i], dim=1)
    d, order = torch.sort(d, dim=1, stable=True)
    return d[:, :k], torch.gather(i, 1, order[:, :k])


def _topk_u8(x: torch.Tensor, y: torch.Tensor, k: int):
    # float64 holds every integer involved exactly (d * 255^2 << 2^53).
    Q, N = x.shape[0], y.shape[0]
    out_d = torch.empty(Q, k, dtype=torch.int64, device=x.device)
    out_i = torch.empty(Q, k, dtype=torch.int64, device=x.device)
    for q0 in range(0, Q, QUERY_TILE):
        xq = x[q0 : q0 + QUERY_TILE].double()
        nx = xq.square().sum(1, keepdim=True)
        run_d = run_i = None
        for n0 in range(0, N, REF_TILE):
            yt = y[n0 : n0 + REF_TILE].double()
            dist = (nx + yt.square().sum(1) - 2.0 * xq @ yt.T).round().long()
            cols = dist.shape[1]
            kk = min(k, cols)
            # Unique keys make topk tie-correct: smaller column wins among equal distances.
            keys = dist * cols + torch.arange(cols, device=x.device)
            key, col = torch.topk(keys, kk, dim=1, largest=False, sorted=True)
            d_t, i_t = key.div(cols, rounding_mode="floor"), col + n0
            if run_d is None:
                run_d, run_i = d_t, i_t
            else:
                run_d, run_i = _merge(run_d, run_i, d_t, i_t, k)
        out_d[q0 : q0 + QUERY_TILE], out_i[q0 : q0 + QUERY_TILE] = run_d, run_i
    return out_d, out_i


def _gamma(n: int, u: float) -> float:
    return n * u / (1.0 - n * u)


def _exact_sqdist(xq: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Direct differences in float64 between each query and its listed refs."""
    out = torch.empty(idx.shape, dtype=torch.float64, device=xq.device)
    for s in range(0, xq.shape[0], chunk):
        diff = xq[s : s + chunk, None, :].double() - y[idx[s : s + chunk]].double()
        out[s : s + chunk] = diff.square().sum(-1)
    return out


def _sort_by_dist_then_index(d, i, k):
    i, order = torch.sort(i, dim=1)
    d = torch.gather(d, 1, order)
    d, order = torch.sort(d, dim=1, stable=True)
    return d[:, :k], torch.gather(i, 1, order[:, :k])


def _power_of_two_shift(x: torch.Tensor, y: torch.Tensor) -> int:
    """-e for rows whose largest |value| 2^e is outside [2^-32, 2^32], else 0: scaled by
    2^-e, the products neither overflow nor underflow (as the CPU op does)."""
    def max_abs(v: torch.Tensor) -> float:  # one reduction, no |v| copy of a training set
        lo, hi = torch.aminmax(v)
        return max(-float(lo), float(hi))

    m = max(max_abs(x), max_abs(y))
    if m == 0.0 or 2.0**-32 <= m < 2.0**32:
        return 0
    return 1 - math.frexp(m)[1]


def _shifted(v: torch.Tensor, shift: int) -> torch.Tensor:
    """v * 2^shift, in float64 and in two steps (2^shift itself may not be representable)."""
    if shift == 0:
        return v
    half = shift // 2
    return (v.double() * 2.0**half * 2.0 ** (shift - half)).to(v.dtype)


def _topk_float(x_in: torch.Tensor, y_in: torch.Tensor, k: int):
    """Expansion candidates with a rigorous rounding bound, then an exact re-rank (see
    csrc/knn/cpu/knn_float.cpp for the bound), on rows scaled by a power of two; the
    re-rank reads the rows as given."""
    shift = _power_of_two_shift(x_in, y_in)
    x, y = _shifted(x_in, shift), _shifted(y_in, shift)
    Q, N, d = x.shape[0], y.shape[0], x.shape[1]
    if x.dtype == torch.float32 and d > 2**21:  # gamma_d in float32 would no longer bound the sums
        x, y = x.double(), y.double()
    u = 2.0**-24 if x.dtype == torch.float32 else 2.0**-53
    g_dot, g64 = _gamma(d, u), _gamma(d + 4, 2.0**-53)
    t = d * (2.0**-120 if x.dtype == torch.float32 else 2.0**-1000)  # subnormal products and sums
    C = min(N, max(64, 4 * k))
    ny = y.double().square().sum(1)
    yn = ny.sqrt()
    out_d = torch.empty(Q, k, dtype=torch.float64, device=x.device)
    out_i = torch.empty(Q, k, dtype=torch.int64, device=x.device)
    inf = float("inf")
    for q0 in range(0, Q, QUERY_TILE):
        xq = x[q0 : q0 + QUERY_TILE]
        nq = xq.shape[0]
        nx = xq.double().square().sum(1, keepdim=True)
        xn = nx.sqrt()
        cand_lo = torch.empty(nq, 0, dtype=torch.float64, device=x.device)
        cand_i = torch.empty(nq, 0, dtype=torch.int64, device=x.device)
        hi_k = torch.full((nq, k), inf, dtype=torch.float64, device=x.device)
        dropped = torch.full((nq,), inf, dtype=torch.float64, device=x.device)
        for n0 in range(0, N, REF_TILE):
            yt = y[n0 : n0 + REF_TILE]
            with ieee_float32_matmul():
                dots = (xq @ yt.T).double()
            a = nx + ny[n0 : n0 + REF_TILE] - 2.0 * dots
            s = xn + yn[n0 : n0 + REF_TILE]
            err = 1.25 * (2.0 * g_dot * xn * yn[n0 : n0 + REF_TILE] + g64 * s * s + t * (1.0 + s))
            idx = torch.arange(n0, n0 + yt.shape[0], device=x.device).expand(nq, -1)
            lo = torch.cat([cand_lo, a - err], 1)
            li = torch.cat([cand_i, idx], 1)
            keep = min(C, lo.shape[1])
            vals, pos = torch.topk(lo, min(C + 1, lo.shape[1]), dim=1, largest=False, sorted=True)
            if vals.shape[1] > keep:  # the best candidate not kept bounds everything dropped
                dropped = torch.minimum(dropped, vals[:, keep])
            cand_lo, cand_i = vals[:, :keep], torch.gather(li, 1, pos[:, :keep])
            hi_k = torch.topk(torch.cat([hi_k, a + err], 1), k, dim=1, largest=False, sorted=True).values
        bound = hi_k[:, k - 1 : k]
        verified = dropped > bound[:, 0]
        exact = _exact_sqdist(x_in[q0 : q0 + QUERY_TILE], y_in, cand_i)
        exact = torch.where(cand_lo <= bound, exact, torch.full_like(exact, inf))
        res_d, res_i = _sort_by_dist_then_index(exact, cand_i, k)
        for row in torch.nonzero(~verified).flatten().tolist():  # masses of near-ties
            res_d[row], res_i[row] = _brute_force_row(x_in[q0 + row], y_in, k)
        out_d[q0 : q0 + nq], out_i[q0 : q0 + nq] = res_d, res_i
    return out_d, out_i


def _brute_force_row(xrow: torch.Tensor, y: torch.Tensor, k: int, chunk: int = 4096):
    dist = torch.cat(
        [(y[s : s + chunk].double() - xrow.double()).square().sum(1) for s in range(0, y.shape[0], chunk)]
    )
    d, i = torch.sort(dist, stable=True)
    return d[:k], i[:k]


def knn_topk(queries: torch.Tensor, refs: torch.Tensor, k: int):
    if queries.dtype == torch.uint8:
        return _topk_u8(queries, refs, k)
    return _topk_float(queries, refs, k)
