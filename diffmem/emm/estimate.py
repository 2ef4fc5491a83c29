"""EMM, the effective model memorization of Gu et al. (2023): the largest training-set
size |D| at which a model still memorizes at least 1 - eps of its samples.

From memorization ratios measured at a few sizes, EMM is bracketed by

    lower = the largest size whose ratio is >= 1 - eps
    upper = the smallest size above `lower` whose ratio is < 1 - eps

and estimated by linear interpolation of the ratio between the two (in |D|, or in
log |D| on request), i.e. where the straight line through (lower, r_lower) and
(upper, r_upper) crosses 1 - eps.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class EMMEstimate:
    lower: int | None  # largest size with ratio >= 1 - eps (None: every size is below)
    upper: int | None  # smallest size above `lower` with ratio < 1 - eps (None: none above)
    value: float | None  # interpolated crossing; None unless bracketed
    bracketed: bool  # both ends found
    monotone: bool  # ratios never rise with |D|
    eps: float
    log: bool  # interpolated in log |D|
    sizes: tuple[int, ...]  # distinct sizes, ascending
    ratios: tuple[float, ...]  # their (mean) ratios
    ci: tuple[float, float] | None = None  # bootstrap confidence interval of `value`
    ci_level: float | None = None
    ci_bracketed_fraction: float | None = None  # bootstrap replicates that were bracketed

    @property
    def threshold(self) -> float:
        return 1.0 - self.eps

    def describe(self) -> str:
        """One line for people, e.g. 'EMM ~ 41.3 (bracket 32..64)'."""
        if self.bracketed:
            text = f"EMM ~ {self.value:.1f} (bracket {self.lower}..{self.upper})"
            if self.ci is not None:
                text += f", {100 * self.ci_level:g}% CI {self.ci[0]:.1f}..{self.ci[1]:.1f}"
        elif self.lower is None:
            text = f"EMM < {self.upper} (every size memorizes less than {self.threshold:g})"
        else:
            text = f"EMM >= {self.lower} (every size memorizes at least {self.threshold:g})"
        if not self.monotone:
            text += "; ratios do not fall monotonically with |D|"
        return text

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["sizes"], out["ratios"] = list(self.sizes), list(self.ratios)
        out["ci"] = None if self.ci is None else list(self.ci)
        out["threshold"] = self.threshold
        return out


def _check(sizes, ratios, eps) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.asarray(sizes)
    ratios = np.asarray(ratios, dtype=np.float64)
    if sizes.ndim != 1 or ratios.ndim != 1:
        raise ValueError("sizes and ratios must be 1-D sequences")
    if len(sizes) != len(ratios):
        raise ValueError(f"sizes and ratios differ in length ({len(sizes)} vs {len(ratios)})")
    if len(sizes) == 0:
        raise ValueError("need at least one (size, ratio) pair")
    if not np.issubdtype(sizes.dtype, np.integer):
        as_float = sizes.astype(np.float64)
        if not (np.isfinite(as_float).all() and (as_float == np.round(as_float)).all()):
            raise ValueError(f"sizes must be whole numbers of training images, got {sizes.tolist()}")
        sizes = as_float.astype(np.int64)
    if (sizes < 1).any():
        raise ValueError(f"sizes must be at least 1, got {sizes.tolist()}")
    if not np.isfinite(ratios).all() or (ratios < 0).any() or (ratios > 1).any():
        raise ValueError(f"ratios must lie in [0, 1], got {ratios.tolist()}")
    if not (isinstance(eps, (int, float)) and 0 < eps < 1):
        raise ValueError(f"eps must lie in (0, 1), got {eps!r}")
    return sizes.astype(np.int64), ratios


def _bracket(sizes: np.ndarray, ratios: np.ndarray, threshold: float, log: bool):
    """(lower, upper, value) for distinct ascending sizes."""
    above = np.flatnonzero(ratios >= threshold)
    if len(above) == 0:
        return None, int(sizes[0]), None
    i = int(above[-1])  # every later size is below the threshold
    if i == len(sizes) - 1:
        return int(sizes[i]), None, None
    lo, hi, r_lo, r_hi = sizes[i], sizes[i + 1], ratios[i], ratios[i + 1]
    t = (r_lo - threshold) / (r_lo - r_hi)  # r_lo >= threshold > r_hi, so 0 <= t < 1
    if log:
        value = math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo)))
    else:
        value = lo + t * (hi - lo)
    return int(lo), int(hi), float(value)


def estimate(sizes: Sequence[int], ratios: Sequence[float], eps: float = 0.1, *, log: bool = False,
             flags: Sequence[Sequence[bool]] | None = None, bootstrap: int = 0, confidence: float = 0.95,
             seed: int = 0) -> EMMEstimate:
    """EMM from memorization ratios measured at several training-set sizes.

    sizes, ratios: one entry per trained model; a size given more than once (several
        seeds) counts with the mean of its ratios.
    eps: memorization counts as present at ratio >= 1 - eps (the papers: 0.1).
    log: interpolate in log |D| instead of |D|.
    flags, bootstrap: with the per-sample memorization flags of each model (same order as
        sizes) and bootstrap = B > 0, resample every model's samples B times, recompute the
        estimate and report the `confidence` percentile interval of the bracketed values
        (and the fraction of replicates that were bracketed).
    """
    sizes_arr, ratios_arr = _check(sizes, ratios, eps)
    threshold = 1.0 - eps
    distinct = np.unique(sizes_arr)
    groups = [np.flatnonzero(sizes_arr == s) for s in distinct]
    mean_ratios = np.array([ratios_arr[g].mean() for g in groups])
    lower, upper, value = _bracket(distinct, mean_ratios, threshold, log)
    monotone = bool(np.all(np.diff(mean_ratios) <= 0))

    ci = ci_level = ci_fraction = None
    if bootstrap:
        if flags is None:
            raise ValueError("bootstrap needs the per-sample memorization flags (flags=...)")
        if not (isinstance(bootstrap, int) and bootstrap > 0):
            raise ValueError(f"bootstrap must be a positive number of replicates, got {bootstrap!r}")
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
        if len(flags) != len(sizes_arr):
            raise ValueError(f"flags has {len(flags)} entries for {len(sizes_arr)} sizes")
        flag_arrays = [np.asarray(f, dtype=bool).ravel() for f in flags]
        for f, r in zip(flag_arrays, ratios_arr):
            if len(f) == 0:
                raise ValueError("every model needs at least one sample flag to bootstrap")
            if abs(f.mean() - r) > 1e-9:
                raise ValueError(f"flags do not match their ratio ({f.mean():.6f} memorized vs ratio {r:.6f})")
        rng = np.random.default_rng(seed)
        values = []
        for _ in range(bootstrap):
            # Resample each model's samples; a size's ratio is the mean over its models.
            resampled = np.array([rng.choice(f, size=len(f), replace=True).mean() for f in flag_arrays])
            means = np.array([resampled[g].mean() for g in groups])
            v = _bracket(distinct, means, threshold, log)[2]
            if v is not None:
                values.append(v)
        ci_fraction = len(values) / bootstrap
        ci_level = float(confidence)
        if values:
            alpha = (1 - confidence) / 2
            lo_q, hi_q = np.quantile(values, [alpha, 1 - alpha])
            ci = (float(lo_q), float(hi_q))

    return EMMEstimate(lower=lower, upper=upper, value=value, bracketed=value is not None, monotone=monotone,
                       eps=float(eps), log=bool(log), sizes=tuple(int(s) for s in distinct),
                       ratios=tuple(float(r) for r in mean_ratios), ci=ci, ci_level=ci_level,
                       ci_bracketed_fraction=ci_fraction)
