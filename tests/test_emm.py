"""EMM estimation and the adaptive search, on synthetic memorization curves."""
import math

import numpy as np
import pytest

from diffmem.emm import SearchRange, estimate, plan
from diffmem.emm.search import converged, geometric_midpoint


# ----------------------------------------------------------------------------------------
# estimate()

def test_linear_interpolation_between_the_bracket():
    est = estimate([10, 20, 40, 80], [1.0, 0.95, 0.7, 0.1])
    assert (est.lower, est.upper, est.bracketed, est.monotone) == (20, 40, True, True)
    # The line through (20, 0.95) and (40, 0.7) crosses 0.9 at 20 + 20 * 0.05 / 0.25.
    assert est.value == pytest.approx(20 + 20 * 0.05 / 0.25, rel=1e-12)
    assert est.threshold == pytest.approx(0.9)


def test_log_interpolation():
    est = estimate([10, 20, 40, 80], [1.0, 0.95, 0.7, 0.1], log=True)
    t = 0.05 / 0.25
    assert est.value == pytest.approx(math.exp(math.log(20) + t * math.log(2)), rel=1e-12)
    assert est.lower < est.value < est.upper


def test_exact_threshold_counts_as_memorized():
    est = estimate([10, 20], [0.9, 0.5])
    assert (est.lower, est.upper) == (10, 20)
    assert est.value == pytest.approx(10.0)


def test_random_curves_against_a_brute_force_crossing():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 8))
        sizes = np.sort(rng.choice(np.arange(2, 5000), size=n, replace=False))
        ratios = np.sort(rng.uniform(0, 1, size=n))[::-1]
        est = estimate(sizes, ratios, eps=0.1)
        above = [s for s, r in zip(sizes, ratios) if r >= 0.9]
        below = [s for s, r in zip(sizes, ratios) if r < 0.9]
        assert est.monotone
        if not above or not below:
            assert not est.bracketed and est.value is None
            continue
        lo, hi = max(above), min(below)
        assert (est.lower, est.upper) == (lo, hi)
        # Brute force: the crossing of the segment, found on a fine grid.
        r_lo, r_hi = ratios[list(sizes).index(lo)], ratios[list(sizes).index(hi)]
        grid = np.linspace(lo, hi, 200001)
        line = r_lo + (grid - lo) / (hi - lo) * (r_hi - r_lo)
        crossing = grid[np.argmax(line < 0.9)]
        assert abs(est.value - crossing) <= (hi - lo) / 200000 + 1e-9


def test_open_brackets():
    above = estimate([8, 16, 32], [1.0, 0.99, 0.95])
    assert not above.bracketed and above.value is None
    assert above.lower == 32 and above.upper is None
    assert "EMM >= 32" in above.describe()
    below = estimate([8, 16, 32], [0.8, 0.5, 0.1])
    assert not below.bracketed and below.value is None
    assert below.lower is None and below.upper == 8
    assert "EMM < 8" in below.describe()


def test_non_monotone_curve():
    # A dip below the threshold at 20, back above it at 40: EMM is bracketed above the last
    # size that memorizes, and the curve is flagged.
    est = estimate([10, 20, 40, 80], [0.95, 0.85, 0.92, 0.3])
    assert not est.monotone
    assert (est.lower, est.upper) == (40, 80)
    assert "monotonically" in est.describe()
    assert estimate([10, 20], [0.5, 0.6]).monotone is False


def test_repeated_sizes_are_averaged_and_order_does_not_matter():
    est = estimate([40, 10, 20, 20], [0.2, 1.0, 0.9, 0.98])
    assert est.sizes == (10, 20, 40)
    assert est.ratios[1] == pytest.approx(0.94)
    assert (est.lower, est.upper) == (20, 40)


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_samples():
    rng = np.random.default_rng(1)
    sizes = [16, 32, 64, 128]
    truth = [1.0, 0.96, 0.8, 0.2]

    def width(n):
        flags = [rng.random(n) < p for p in truth]
        ratios = [f.mean() for f in flags]
        est = estimate(sizes, ratios, flags=flags, bootstrap=300, seed=3)
        assert est.bracketed and est.ci is not None
        assert est.ci[0] <= est.value <= est.ci[1]
        assert 0 < est.ci_bracketed_fraction <= 1
        return est.ci[1] - est.ci[0]

    assert width(20000) < width(500)


def test_bootstrap_is_deterministic_per_seed():
    flags = [np.ones(100, bool), np.r_[np.ones(90, bool), np.zeros(10, bool)], np.zeros(100, bool)]
    ratios = [f.mean() for f in flags]
    a = estimate([8, 16, 32], ratios, flags=flags, bootstrap=50, seed=5)
    b = estimate([8, 16, 32], ratios, flags=flags, bootstrap=50, seed=5)
    assert a.ci == b.ci


@pytest.mark.parametrize("kwargs, message", [
    (dict(sizes=[1, 2], ratios=[0.5]), "differ in length"),
    (dict(sizes=[], ratios=[]), "at least one"),
    (dict(sizes=[0, 2], ratios=[1, 0]), "at least 1"),
    (dict(sizes=[1.5, 2], ratios=[1, 0]), "whole numbers"),
    (dict(sizes=[1, 2], ratios=[1.2, 0]), "[0, 1]"),
    (dict(sizes=[1, 2], ratios=[float("nan"), 0]), "[0, 1]"),
    (dict(sizes=[1, 2], ratios=[1, 0], eps=0), "eps"),
    (dict(sizes=[1, 2], ratios=[1, 0], bootstrap=10), "flags"),
    (dict(sizes=[1, 2], ratios=[1, 0], flags=[[1], [0]], bootstrap=-1), "bootstrap"),
    (dict(sizes=[1, 2], ratios=[1, 0], flags=[[1]], bootstrap=10), "entries"),
    (dict(sizes=[1, 2], ratios=[0.5, 0], flags=[[1, 1], [0]], bootstrap=10), "do not match"),
])
def test_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        estimate(**kwargs)


# ----------------------------------------------------------------------------------------
# The adaptive search

def _ratio_curve(emm: float):
    """A smooth memorization ratio falling through 0.9 at |D| = emm (a logistic in log |D|)."""
    def ratio(size):
        return 1 / (1 + math.exp(4 * (math.log(size) - math.log(emm))) * (1 / 0.9 - 1))
    return ratio


def _search(search, ratio, workers=1):
    """Run the planner with `workers` parallel slots; runs finish oldest first."""
    finished, pending, order = {}, [], []
    while True:
        while len(pending) < workers:
            state = plan(search, finished, set(pending))
            if state.next_size is None:
                break
            assert state.next_size not in finished and state.next_size not in pending
            assert search.min_size <= state.next_size <= search.max_size
            pending.append(state.next_size)
            order.append(state.next_size)
        if not pending:
            state = plan(search, finished, set())
            assert state.done
            return finished, order, state
        size = pending.pop(0)
        finished[size] = ratio(size)


@pytest.mark.parametrize("emm", [9.5, 37.0, 100.0, 613.0, 1000.0])
def test_search_brackets_emm_within_tolerance(emm):
    search = SearchRange(8, 1024, tolerance=0.25)
    finished, order, state = _search(search, _ratio_curve(emm))
    est = state.estimate
    assert est.bracketed
    assert est.lower <= emm <= est.upper
    assert converged(est.lower, est.upper, 0.25)
    # Two range ends, then bisection in log |D|: log2(ratio of range / 1.25) steps at most.
    assert len(order) <= 2 + math.ceil(math.log2(math.log(1024 / 8) / math.log(1.25)))
    assert order[:2] == [8, 1024]


def test_search_stops_when_emm_is_outside_the_range():
    search = SearchRange(8, 1024, tolerance=0.25)
    finished, order, state = _search(search, _ratio_curve(5000.0))
    assert order == [8, 1024] and "above the range" in state.reason
    assert not state.estimate.bracketed
    finished, order, state = _search(search, _ratio_curve(3.0))
    assert order == [8, 1024] and "below the range" in state.reason


def test_parallel_search_keeps_workers_busy_and_still_converges():
    search = SearchRange(8, 4096, tolerance=0.1)
    ratio = _ratio_curve(300.0)
    _, serial, state_serial = _search(search, ratio, workers=1)
    _, parallel, state_parallel = _search(search, ratio, workers=3)
    for state in (state_serial, state_parallel):
        assert state.estimate.lower <= 300 <= state.estimate.upper
        assert converged(state.estimate.lower, state.estimate.upper, 0.1)
    assert len(set(parallel)) == len(parallel)  # nothing trained twice


def test_search_is_resumable_from_finished_runs_alone():
    """Planning from the finished runs of an interrupted search continues where it was."""
    search = SearchRange(8, 1024, tolerance=0.25)
    ratio = _ratio_curve(50.0)
    finished, order, _ = _search(search, ratio)
    partial = {size: finished[size] for size in order[:3]}
    assert plan(search, partial).next_size == order[3]


def test_search_with_adjacent_sizes_stops():
    search = SearchRange(2, 3, tolerance=0.01)
    finished, order, state = _search(search, lambda size: 1.0 if size == 2 else 0.0)
    assert order == [2, 3] and state.done and state.estimate.bracketed


def test_geometric_midpoint():
    assert geometric_midpoint(8, 32) == 16
    assert geometric_midpoint(8, 9) is None
    assert geometric_midpoint(8, 10) == 9


@pytest.mark.parametrize("args, message", [
    ((1, 10), "at least 2|>= 2"), ((10, 10), "above"), ((2, 10, 0), "tolerance"), ((2, 10, 0.1, 1.0), "eps"),
])
def test_search_range_validation(args, message):
    with pytest.raises(ValueError, match=message):
        SearchRange(*args)
