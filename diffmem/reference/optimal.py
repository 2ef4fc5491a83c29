"""Reference closed-form optimal denoiser in plain PyTorch (CPU or CUDA), chunk by chunk.

Same contract as torch.ops.diffmem.optimal_denoise: x (B, d) float32/float64, train
(N, d) uint8 (read as img / 127.5 - 1), bfloat16, float32 or float64; sigma, scale (B,)
float64; optional labels (B,) / train_labels (N,) int64; topk (0: all items). Returns
(D (B, d) in x's dtype, lse (B,) float64) with

    l_n = -||x - scale y_n||^2 / (2 sigma^2),  D = sum_n softmax(l)_n y_n,  lse = logsumexp(l)

over the items taking part. Everything is computed in float64, streaming over N with an
online softmax, so memory is O(B * CHUNK) whatever N is. Squared distances use the
expansion in float64 (error ~1e-12 of the norms: harmless at sigma >= 0.002); the top-k
selection uses direct differences (ties by smaller index, like the native op).
"""
from __future__ import annotations

import torch

CHUNK = 1024  # training rows per step


def rows_as_float64(train: torch.Tensor) -> torch.Tensor:
    if train.dtype == torch.uint8:
        return train.double() / 127.5 - 1.0
    return train.double()


def _mask(labels, train_labels, n0, n1):
    if labels is None:
        return None
    return labels[:, None] != train_labels[None, n0:n1]


def optimal_denoise(x, train, sigma, scale, labels=None, train_labels=None, topk=0):
    if topk > 0:
        return _topk(x, train, sigma, scale, labels, train_labels, topk)
    xd = x.double()
    m = scale.double()[:, None]
    inv = 1.0 / (2.0 * sigma.double()[:, None] ** 2)
    nx = (xd * xd).sum(1, keepdim=True)
    run_max = torch.full((x.shape[0], 1), -torch.inf, dtype=torch.float64, device=x.device)
    run_sum = torch.zeros_like(run_max)
    acc = torch.zeros_like(xd)
    for n0 in range(0, train.shape[0], CHUNK):
        y = rows_as_float64(train[n0 : n0 + CHUNK])
        ny = (y * y).sum(1)
        if not bool(torch.isfinite(ny).all()):
            raise ValueError("optimal_denoise: train contains NaN or inf")
        sq = (nx + m * m * ny[None] - 2.0 * m * (xd @ y.T)).clamp_min(0.0)
        logits = -sq * inv
        mask = _mask(labels, train_labels, n0, n0 + y.shape[0])
        if mask is not None:
            logits = logits.masked_fill(mask, -torch.inf)
        new_max = torch.maximum(run_max, logits.max(1, keepdim=True).values)
        safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        factor = torch.exp(run_max - safe)  # 0 where run_max is -inf
        p = torch.exp(logits - safe)
        run_sum = run_sum * factor + p.sum(1, keepdim=True)
        acc = acc * factor + p @ y
        run_max = new_max
    if not bool((run_sum > 0).all()):
        raise RuntimeError("optimal_denoise: a query has no training item to average over")
    return (acc / run_sum).to(x.dtype), (run_max + run_sum.log()).squeeze(1)


def _topk(x, train, sigma, scale, labels, train_labels, k):
    """k nearest items by float64 direct differences (ties: smaller index), then softmax."""
    xd = x.double()
    m = scale.double()[:, None, None]
    best_d = best_i = None
    step = max(1, 2**22 // max(1, x.shape[0] * x.shape[1]))
    for n0 in range(0, train.shape[0], step):
        y = rows_as_float64(train[n0 : n0 + step])
        if not bool(torch.isfinite(y).all()):
            raise ValueError("optimal_denoise: train contains NaN or inf")
        sq = ((xd[:, None, :] - m * y[None]) ** 2).sum(-1)
        mask = _mask(labels, train_labels, n0, n0 + y.shape[0])
        if mask is not None:
            sq = sq.masked_fill(mask, torch.inf)
        idx = torch.arange(n0, n0 + y.shape[0], device=x.device).expand_as(sq)
        if best_d is not None:
            sq, idx = torch.cat([best_d, sq], 1), torch.cat([best_i, idx], 1)
        sq, order = torch.sort(sq, dim=1, stable=True)  # earlier (smaller) index first on ties
        best_d, best_i = sq[:, :k], torch.gather(idx, 1, order[:, :k])
    logits = -best_d / (2.0 * sigma.double()[:, None] ** 2)
    if not bool(torch.isfinite(logits).any(1).all()):
        raise RuntimeError("optimal_denoise: a query has no training item to average over")
    w = torch.softmax(logits, dim=1)
    y = rows_as_float64(train[best_i.reshape(-1)]).reshape(*best_i.shape, -1)
    D = (w[..., None] * y).sum(1)
    return D.to(x.dtype), torch.logsumexp(logits, dim=1)
