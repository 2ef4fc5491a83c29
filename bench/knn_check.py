"""Correctness checks for top-k results: agreement with diffmem and with exact ground truth."""
from __future__ import annotations

import numpy as np
import torch


def to_numpy(x) -> np.ndarray | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """Max relative error over nonzero references (exact copies have distance 0)."""
    pos = want > 0
    if not pos.any():
        return 0.0
    return float((np.abs(got[pos] - want[pos]) / want[pos]).max())


def versus(dist, idx, ref_dist, ref_idx) -> dict:
    """How far a method's answer is from the reference method's (normally diffmem).

    Float baselines may legitimately pick another neighbour on a near-tie, so index
    disagreement is reported, not judged; distances are compared rank by rank.
    """
    dist, idx = to_numpy(dist).astype(np.float64), to_numpy(idx)
    ref_dist, ref_idx = to_numpy(ref_dist).astype(np.float64), to_numpy(ref_idx)
    if dist.shape != ref_dist.shape or idx.shape != ref_idx.shape:
        return {"error": f"shape {dist.shape}/{idx.shape} vs reference {ref_dist.shape}"}
    differ = np.any(np.sort(idx, axis=1) != np.sort(ref_idx, axis=1), axis=1)
    return {"rows_idx_differ": float(differ.mean()),
            "max_abs_dist_err": float(np.abs(dist - ref_dist).max(initial=0.0)),
            "max_rel_dist_err": _rel_err(dist, ref_dist)}


def exact_sq_dists(q: np.ndarray, refs: np.ndarray, block: int = 8192) -> np.ndarray:
    """Squared distances in float64: exact for pixel data (all terms are integers < 2**53)."""
    q = q.astype(np.float64)
    qn = (q * q).sum(1)[:, None]
    out = np.empty((len(q), len(refs)))
    for s in range(0, len(refs), block):
        r = refs[s:s + block].reshape(-1, q.shape[1]).astype(np.float64)
        out[:, s:s + block] = qn + (r * r).sum(1)[None, :] - 2.0 * (q @ r.T)
    return out


class ExactSample:
    """Ground-truth top-k for a random sample of query rows.

    A method's answer for a row is right when the true distances of the neighbours it
    returned equal the true k smallest distances: any choice among exact ties passes.
    """

    def __init__(self, queries: np.ndarray, refs: np.ndarray, k: int,
                 rows: int = 64, seed: int = 0):
        Q = len(queries)
        rng = np.random.default_rng(seed)
        self.rows = np.sort(rng.choice(Q, size=min(rows, Q), replace=False))
        self.d2 = exact_sq_dists(queries[self.rows].reshape(len(self.rows), -1), refs)
        self.want = np.sort(np.partition(self.d2, k - 1, axis=1)[:, :k], axis=1)

    def check(self, dist, idx) -> dict:
        dist, idx = to_numpy(dist), to_numpy(idx)
        if idx.shape[0] <= self.rows.max() or idx.shape[1] != self.want.shape[1]:
            return {"error": f"result shape {idx.shape} does not fit the sample"}
        idx, dist = idx[self.rows].astype(np.int64), dist[self.rows].astype(np.float64)
        in_range = np.all((idx >= 0) & (idx < self.d2.shape[1]), axis=1)
        unique = np.all(np.diff(np.sort(idx, axis=1), axis=1) != 0, axis=1)
        got = np.sort(np.take_along_axis(self.d2, np.clip(idx, 0, self.d2.shape[1] - 1), 1), 1)
        right = in_range & unique & np.all(np.isclose(got, self.want, rtol=1e-9, atol=1e-9), 1)
        true_dist = np.sqrt(np.maximum(self.want, 0))
        return {"rows_checked": int(len(self.rows)),
                "rows_wrong": int((~right).sum()),
                "max_abs_dist_err": float(np.abs(dist - true_dist).max(initial=0.0)),
                "max_rel_dist_err": _rel_err(dist, true_dist)}
