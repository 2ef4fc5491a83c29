"""Input data for the kNN benchmark: random pixels or real CIFAR-10 rows."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.machine import REPO_ROOT

# Shared data lives beside the checkout, not in it; a fresh clone may lack it.
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


def random_pixels(Q: int, N: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Uniform uint8 rows: the worst case for pruning, so only raw speed counts."""
    rng = np.random.default_rng(seed)
    refs = rng.integers(0, 256, size=(N, d), dtype=np.uint8)
    queries = rng.integers(0, 256, size=(Q, d), dtype=np.uint8)
    return queries, refs, {"source": "random", "seed": seed}


def _load_cifar_rows(data_dir: Path, count: int, d: int) -> np.ndarray:
    """First `count` CIFAR-10 rows, train then test, flattened to d = 3072."""
    parts = []
    for name in ("cifar10-train.npz", "cifar10-test.npz"):
        path = data_dir / name
        if path.exists():
            with np.load(path) as npz:
                parts.append(npz["images"].reshape(len(npz["images"]), -1))
        if sum(len(p) for p in parts) >= count:
            break
    rows = np.concatenate(parts) if parts else np.empty((0, 3072), np.uint8)
    if rows.shape[1] != d:
        raise ValueError(f"--data cifar10 has d=3072 rows; got --d {d}")
    if len(rows) < count:
        raise ValueError(f"--data cifar10 needs Q+N={count} rows; {data_dir} has {len(rows)}")
    return rows[:count]


def _plant_copies(queries: np.ndarray, refs: np.ndarray, rng: np.random.Generator) -> dict:
    """Overwrite ~1% of queries with exact and ~1% with slightly perturbed copies of refs.

    Memorization search is about finding such near-duplicates, and exact copies
    (distance 0) exercise the tie / cancellation paths that random data never hits.
    """
    n_each = max(1, len(queries) // 100)
    slots = rng.choice(len(queries), size=min(2 * n_each, len(queries)), replace=False)
    sources = rng.choice(len(refs), size=len(slots), replace=False)
    exact, perturbed = slots[:n_each], slots[n_each:]
    queries[exact] = refs[sources[:n_each]]
    noise = rng.integers(-2, 3, size=(len(perturbed), refs.shape[1]))
    queries[perturbed] = np.clip(refs[sources[n_each:]].astype(np.int16) + noise, 0, 255)
    return {"exact_copies": int(len(exact)), "perturbed_copies": int(len(perturbed)),
            "perturbation": "uniform integer noise in [-2, 2] per pixel"}


def cifar10(Q: int, N: int, d: int, seed: int,
            data_dir: Path = DEFAULT_DATA_DIR) -> tuple[np.ndarray, np.ndarray, dict]:
    """refs = first N images; queries = the next Q images with planted copies."""
    rows = _load_cifar_rows(Path(data_dir), N + Q, d)
    refs, queries = rows[:N].copy(), rows[N:].copy()
    planted = _plant_copies(queries, refs, np.random.default_rng(seed))
    return queries, refs, {"source": "cifar10", "data_dir": str(data_dir), "seed": seed,
                           **planted}


def load(kind: str, Q: int, N: int, d: int, seed: int, data_dir: Path = DEFAULT_DATA_DIR):
    if kind == "random":
        return random_pixels(Q, N, d, seed)
    if kind == "cifar10":
        return cifar10(Q, N, d, seed, data_dir)
    raise ValueError(f"unknown --data {kind!r}")
