"""EMM (effective model memorization, Gu et al. 2023): estimation from measured
memorization ratios, an adaptive search over |D|, factor sweeps and their reports.

    est = diffmem.emm.estimate([16, 32, 64, 128], [1.0, 0.97, 0.6, 0.1])
    est.value, est.lower, est.upper, est.bracketed, est.monotone

`diffmem emm` / `diffmem sweep` (diffmem.cli.sweep) train the runs; `diffmem report`
draws the figures.
"""
from __future__ import annotations

from .estimate import EMMEstimate, estimate
from .search import SearchRange, SearchState, plan
from .sweep import SweepEntry, SweepSpec, parse_spec

__all__ = ["EMMEstimate", "SearchRange", "SearchState", "SweepEntry", "SweepSpec", "estimate", "parse_spec", "plan"]
