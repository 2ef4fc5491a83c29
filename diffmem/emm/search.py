"""Adaptive choice of the training-set sizes to train, so that EMM is found with few runs.

The search is a pure function of what is known: the ratios of finished runs and the
sizes still training. It first trains the two ends of the allowed range (which says
whether EMM lies inside it at all), then bisects the bracket in log |D| until
upper / lower <= 1 + tolerance (or the two are adjacent integers). With several workers
it keeps them busy by splitting the widest gap between the bracket's ends and the
sizes already training. Because the state is only the finished runs, a search that is
interrupted resumes by running it again.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

from .estimate import EMMEstimate, estimate


@dataclasses.dataclass(frozen=True)
class SearchRange:
    min_size: int
    max_size: int
    tolerance: float = 0.25  # stop when upper / lower <= 1 + tolerance
    eps: float = 0.1

    def __post_init__(self):
        if not (isinstance(self.min_size, int) and self.min_size >= 2):
            raise ValueError(f"the smallest size must be an integer >= 2 (NN1 and NN2 need 2 images), got {self.min_size!r}")
        if not (isinstance(self.max_size, int) and self.max_size > self.min_size):
            raise ValueError(f"the largest size must be an integer above the smallest ({self.min_size}), "
                             f"got {self.max_size!r}")
        if not self.tolerance > 0:
            raise ValueError(f"the tolerance must be positive, got {self.tolerance!r}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must lie in (0, 1), got {self.eps!r}")


@dataclasses.dataclass(frozen=True)
class SearchState:
    done: bool  # nothing more to train (bracket converged, or EMM outside the range)
    next_size: int | None  # a size to start now, if a worker is free
    estimate: EMMEstimate | None  # from the finished runs (None before the first)
    reason: str  # why the search stands where it does, for logs


def converged(lower: int, upper: int, tolerance: float) -> bool:
    return upper - lower <= 1 or upper / lower <= 1 + tolerance


def geometric_midpoint(lower: int, upper: int) -> int | None:
    """An integer strictly between lower and upper, near sqrt(lower * upper); None if none."""
    if upper - lower <= 1:
        return None
    mid = int(round(math.sqrt(lower * upper)))
    return min(max(mid, lower + 1), upper - 1)


def plan(search: SearchRange, finished: Mapping[int, float], pending: set[int] | frozenset[int] = frozenset()) -> SearchState:
    """What to do next, given the ratios of finished runs {size: ratio} and the sizes now training."""
    pending = set(pending)
    known = dict(finished)
    est = estimate(list(known), list(known.values()), eps=search.eps, log=True) if known else None

    for end in (search.min_size, search.max_size):
        if end not in known and end not in pending:
            return SearchState(False, end, est, f"training the range end |D|={end}")
    threshold = 1 - search.eps
    if search.min_size in known and known[search.min_size] < threshold:
        return SearchState(not pending, None, est, f"EMM is below the range: |D|={search.min_size} memorizes "
                                                   f"{known[search.min_size]:.3f} < {threshold:g}")
    if search.max_size in known and known[search.max_size] >= threshold:
        return SearchState(not pending, None, est, f"EMM is above the range: |D|={search.max_size} memorizes "
                                                   f"{known[search.max_size]:.3f} >= {threshold:g}")
    if est is None or not est.bracketed:
        # Both ends are still training.
        return SearchState(False, None, est, "waiting for the range ends")

    lower, upper = est.lower, est.upper
    if converged(lower, upper, search.tolerance):
        return SearchState(not pending, None, est,
                           f"bracket {lower}..{upper} is within the tolerance ({upper / lower:.3f} <= "
                           f"{1 + search.tolerance:g} or adjacent sizes)")
    # Split the widest (in log |D|) gap between the bracket's ends and the sizes training inside it.
    points = sorted({lower, upper} | {p for p in pending if lower < p < upper})
    gaps = sorted(((math.log(b / a), a, b) for a, b in zip(points, points[1:])), reverse=True)
    for _, a, b in gaps:
        if converged(a, b, search.tolerance):
            continue
        mid = geometric_midpoint(a, b)
        if mid is not None and mid not in pending and mid not in known:
            return SearchState(False, mid, est, f"bisecting {a}..{b} in log |D|")
    return SearchState(False, None, est, f"bracket {lower}..{upper}; waiting for the runs in progress")
