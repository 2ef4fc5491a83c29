"""The memorization criterion of Gu et al. (2023): a generated image x is memorized when
||x - NN1(x)|| / ||x - NN2(x)|| < threshold (1/3), with NN1, NN2 its nearest and
second-nearest training images under l2 on uint8 pixels.

    report = diffmem.memorization.evaluate(samples, train)
    report.ratio        # fraction of samples memorized

The verdict is decided on exact integer squared distances, so it never depends on
rounding. Exact duplicates in the training set (which make NN1 == NN2 and so hide a
copy) are detected and reported; remove_duplicates=True searches only one of each.
"""
from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from ._checks import all_finite
from . import knn


def quantize(images: Any) -> torch.Tensor:
    """Float images in [-1, 1] to uint8 the way generated images are saved:
    clip(127.5 x + 128, 0, 255), then truncation. uint8 input is returned as is."""
    x = torch.from_numpy(np.asarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"images must be a torch tensor or numpy array, got {type(images).__name__}")
    if x.dtype == torch.uint8:
        return x
    if not x.dtype.is_floating_point:
        raise ValueError(f"images must be uint8 pixels or floats in [-1, 1], got dtype {x.dtype}")
    if not all_finite(x):
        raise ValueError("images contain NaN or inf")
    x = x if x.dtype == torch.float64 else x.float()  # the samplers' float64 state stays float64
    return (x * 127.5 + 128.0).clamp_(0.0, 255.0).to(torch.uint8)


@dataclasses.dataclass
class MemorizationReport:
    ratio: float  # fraction of samples memorized
    memorized: np.ndarray  # (Q,) bool
    nn_dist: np.ndarray  # (Q, 2) l2 distances to NN1, NN2 on uint8 pixels
    nn_index: np.ndarray  # (Q, 2) indices into the training set as given
    knn_distance: float  # mean NN1 distance / sqrt(C*H*W), as the reference code logs it
    threshold: float
    n_train: int  # training images searched (after removing duplicates, if asked)
    duplicate_groups: list[np.ndarray]  # indices of identical training images, one array per group
    duplicates_removed: bool
    hidden_copies: int  # samples whose NN1 and NN2 are identical training images (d1 == d2)

    @property
    def n_samples(self) -> int:
        return int(self.memorized.shape[0])

    def summary(self) -> str:
        dup = sum(len(g) - 1 for g in self.duplicate_groups)
        text = (
            f"memorized {int(self.memorized.sum())}/{self.n_samples} samples (ratio {self.ratio:.4f}, "
            f"threshold {self.threshold:.4g}); mean NN1 RMS distance {self.knn_distance:.4f}"
        )
        if dup:
            what = "removed" if self.duplicates_removed else "kept"
            text += f"; {dup} duplicate training images {what}"
            if self.hidden_copies:
                text += f", hiding {self.hidden_copies} copies"
        return text

    def to_dict(self) -> dict:
        return {
            "ratio": self.ratio,
            "n_samples": self.n_samples,
            "n_memorized": int(self.memorized.sum()),
            "threshold": self.threshold,
            "knn_distance": self.knn_distance,
            "n_train": self.n_train,
            "n_duplicate_groups": len(self.duplicate_groups),
            "n_duplicates": int(sum(len(g) - 1 for g in self.duplicate_groups)),
            "duplicates_removed": self.duplicates_removed,
            "hidden_copies": self.hidden_copies,
        }


def duplicate_groups(train_rows: torch.Tensor) -> list[np.ndarray]:
    """Groups of identical rows of a 2-D uint8 tensor: ascending index arrays, ordered by
    their first index."""
    rows = np.ascontiguousarray(train_rows.cpu().numpy())
    keys = rows.view(np.dtype((np.void, rows.shape[1]))).ravel()
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    if counts.max(initial=0) <= 1:
        return []
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(counts)[:-1]
    return sorted((g for g in np.split(order, bounds) if len(g) > 1), key=lambda g: g[0])


def evaluate(
    samples: Any,
    train: Any,
    threshold: float = 1 / 3,
    *,
    remove_duplicates: bool = False,
    device: str | torch.device | None = None,
) -> MemorizationReport:
    """Memorization of generated `samples` (N, C, H, W) or (N, H, W, C) against `train`.

    Float arrays are read as images in [-1, 1] and quantized like saved PNGs; uint8 is used
    as is. Both must have the same per-image layout. `device` runs the search there
    (default: where `samples` is).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    s = quantize(samples)
    t = quantize(train)
    if s.dim() < 2 or t.dim() < 2:
        raise ValueError("samples and train must be batches of images (N, ...)")
    if s.shape[1:] != t.shape[1:]:
        raise ValueError(f"image shapes differ: samples {tuple(s.shape[1:])}, train {tuple(t.shape[1:])}")
    if s.shape[0] == 0:
        raise ValueError("samples is empty")
    if t.shape[0] < 2:
        raise ValueError(f"need at least 2 training images for NN1 and NN2, got {t.shape[0]}")
    dev = torch.device(device) if device is not None else s.device
    s_rows = s.reshape(s.shape[0], -1).to(dev)
    t_rows = t.reshape(t.shape[0], -1)

    groups = duplicate_groups(t_rows)
    index_map = None
    if remove_duplicates and groups:
        keep = np.ones(t_rows.shape[0], dtype=bool)
        for g in groups:
            keep[g[1:]] = False
        index_map = np.flatnonzero(keep)
        t_rows = t_rows[torch.from_numpy(index_map)]
        if t_rows.shape[0] < 2:
            raise ValueError("fewer than 2 distinct training images remain after removing duplicates")

    sq, idx = knn.topk(s_rows, t_rows.to(dev), k=2, squared=True)
    sq = sq.cpu().numpy()
    idx = idx.cpu().numpy()
    if index_map is not None:
        idx = index_map[idx]

    memorized = _below_ratio(sq[:, 0], sq[:, 1], threshold)
    dist = np.sqrt(sq.astype(np.float64))
    group_of = np.full(t.shape[0], -1, dtype=np.int64)
    for gi, g in enumerate(groups):
        group_of[g] = gi
    hidden = int(np.sum((group_of[idx[:, 0]] >= 0) & (group_of[idx[:, 0]] == group_of[idx[:, 1]])))
    return MemorizationReport(
        ratio=float(memorized.mean()),
        memorized=memorized,
        nn_dist=dist,
        nn_index=idx,
        knn_distance=float(dist[:, 0].mean() / math.sqrt(s_rows.shape[1])),
        threshold=float(threshold),
        n_train=int(t_rows.shape[0]),
        duplicate_groups=groups,
        duplicates_removed=bool(remove_duplicates and groups),
        hidden_copies=hidden,
    )


def _below_ratio(sq1: np.ndarray, sq2: np.ndarray, threshold: float) -> np.ndarray:
    """d1 / d2 < threshold from exact integer squared distances: with threshold = p/q,
    q^2 d1^2 < p^2 d2^2 (strict, so d1 == d2 == 0 is not memorized)."""
    frac = Fraction(threshold).limit_denominator(1000)
    if float(frac) == threshold and sq2.max(initial=0) < 2**62 // frac.denominator**2:
        return sq1 * frac.denominator**2 < sq2 * frac.numerator**2
    return np.sqrt(sq1.astype(np.float64)) < threshold * np.sqrt(sq2.astype(np.float64))
