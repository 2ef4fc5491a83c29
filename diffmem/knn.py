"""Exact k-nearest-neighbour search under the Euclidean distance.

    dist, idx = diffmem.knn.topk(queries, refs, k=2)

uint8 input gives bit-exact squared distances (integer arithmetic end to end); float
input gets candidates from the fast GEMM expansion and an exact re-rank by direct
differences, so indices always match a float64 brute force (ties: smaller index first).
The Q x N distance matrix is never built; `refs` may be a numpy memmap or any iterable of
chunks, streamed with global indices.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from ._checks import all_finite
from . import _native
from .reference import knn as _reference

MAX_K = 32
SUPPORTED_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)
STREAM_BYTES = 256 * 2**20  # rows of a memmap read per chunk

if _native.AVAILABLE:

    @torch.library.register_fake("diffmem::knn_topk")
    def _knn_topk_fake(queries, refs, k):
        dist_dtype = torch.int64 if queries.dtype == torch.uint8 else torch.float64
        shape = (queries.shape[0], k)
        return queries.new_empty(shape, dtype=dist_dtype), queries.new_empty(shape, dtype=torch.int64)

    @torch.library.register_fake("diffmem::knn_screen_counts")
    def _knn_screen_counts_fake(queries, refs, k):
        return queries.new_empty((queries.shape[0],), dtype=torch.int64)


def topk(queries: Any, refs: Any, k: int = 2, *, squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest rows of `refs` for every row of `queries`.

    Args:
        queries: (Q, ...) tensor or numpy array; each row is flattened.
        refs: (N, ...) tensor, numpy array or memmap, or an iterable of such chunks
            (read one at a time; indices count across chunks).
        k: 1 <= k <= min(32, N).
        squared: return squared distances: exact int64 for uint8 input, float64 otherwise.

    Returns:
        (dist, idx), both (Q, k) on the queries' device: Euclidean distances ascending,
        float32 (float64 for float64 input), and int64 row indices into `refs`; equal
        distances are ordered by smaller index.
    """
    q = _as_rows(queries, "queries")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"queries are on an unsupported device {q.device}; use cpu or cuda")
    _check_finite(q, "queries")
    k = _check_k(k)
    if _is_stream(refs):
        chunks: Iterable[Any] = _stream(refs)
    else:
        chunks = [refs]

    sq_d = sq_i = None
    seen = 0
    out_dtype = None
    for chunk in chunks:
        r = _as_rows(chunk, "refs", allow_empty=True)
        if isinstance(chunk, np.ndarray):  # host arrays follow the queries to their device
            r = r.to(q.device)
        if r.shape[0] == 0:
            continue
        qc, rc, out_dtype = _common_form(q, r)
        _check_finite(r, "refs")
        d_c, i_c = _topk_block(qc, rc, min(k, rc.shape[0]))
        i_c = i_c + seen
        if sq_d is None:
            sq_d, sq_i = d_c, i_c
        else:
            sq_d, sq_i = _reference._merge(sq_d, sq_i, d_c, i_c, k)
        seen += r.shape[0]
    if seen == 0:
        raise ValueError("refs is empty: need at least k rows")
    if seen < k:
        raise ValueError(f"k={k} is larger than the number of refs N={seen}")
    if squared:
        return sq_d, sq_i
    return sq_d.double().sqrt().to(out_dtype), sq_i


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer, got {k!r}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
    return int(k)


def _is_stream(refs: Any) -> bool:
    if isinstance(refs, np.memmap):
        return True
    return not isinstance(refs, (torch.Tensor, np.ndarray)) and isinstance(refs, Iterable)


def _stream(refs: Any):
    if isinstance(refs, np.memmap):
        row_bytes = max(1, int(np.prod(refs.shape[1:], dtype=np.int64)) * refs.dtype.itemsize)
        step = max(1, STREAM_BYTES // row_bytes)
        for s in range(0, refs.shape[0], step):
            yield np.ascontiguousarray(refs[s : s + step])
    else:
        yield from refs


def _as_rows(x: Any, name: str, allow_empty: bool = False) -> torch.Tensor:
    """A 2-D tensor view of x, one flattened row per item."""
    if isinstance(x, np.ndarray):
        try:
            with warnings.catch_warnings():  # read-only memmaps: we never write to them
                warnings.simplefilter("ignore", UserWarning)
                x = torch.from_numpy(np.ascontiguousarray(x))
        except TypeError:
            raise ValueError(
                f"{name} has unsupported dtype {x.dtype}; use uint8, float16, bfloat16, float32 or float64"
            ) from None
    elif not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has unsupported dtype {x.dtype}; use uint8, float16, bfloat16, float32 or float64")
    if x.dim() == 0:
        raise ValueError(f"{name} must have a leading row dimension, got a scalar")
    if x.dim() == 1:
        raise ValueError(f"{name} must be (rows, features...), got a 1-D array of shape {tuple(x.shape)}")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (0 rows)")
    row = int(np.prod(x.shape[1:], dtype=np.int64))
    if row == 0:
        raise ValueError(f"{name} rows are empty (shape {tuple(x.shape)})")
    return x.reshape(x.shape[0], row)


def _check_finite(x: torch.Tensor, name: str) -> None:
    if x.dtype.is_floating_point and not all_finite(x):
        raise ValueError(f"{name} contains NaN or inf")


def _common_form(q: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """Queries and refs in one kernel dtype (uint8, float32 or float64) on one device,
    and the dtype of the distances returned."""
    if q.device != r.device:
        raise ValueError(f"queries are on {q.device} but refs are on {r.device}; move them to one device")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"row sizes differ: queries have {q.shape[1]} features per row, refs {r.shape[1]}")
    if (q.dtype == torch.uint8) != (r.dtype == torch.uint8):
        raise ValueError(
            f"queries are {q.dtype} but refs are {r.dtype}: uint8 pixels and float values have different "
            "scales; convert both to the same dtype"
        )
    if q.dtype == torch.uint8:
        return q.contiguous(), r.contiguous(), torch.float32
    # float16/bfloat16 widen to float32 exactly; any float64 makes the search float64.
    wide = torch.float64 if torch.float64 in (q.dtype, r.dtype) else torch.float32
    return q.to(wide).contiguous(), r.to(wide).contiguous(), wide


def _topk_block(q: torch.Tensor, r: torch.Tensor, k: int):
    if _native.use_native("knn_topk", q.device):
        return torch.ops.diffmem.knn_topk(q, r, k)
    return _reference.knn_topk(q, r, k)
