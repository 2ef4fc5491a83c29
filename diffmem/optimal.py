"""The closed-form optimal denoiser of a finite training set, and its regularized forms.

    D = diffmem.optimal.denoise(x, sigma, train)            # (B, ...) like x
    s = diffmem.optimal.score(x, sigma, train, tikhonov=0.01)

With x_t = m y + sigma n (m = `scale`; m = 1 for VE/EDM) and y uniform over the training
items y_1..y_N, the minimizer of the denoising loss is the posterior mean

    D(x; sigma) = sum_n w_n y_n,   w = softmax_n(l_n),   l_n = -||x - m y_n||^2 / (2 sigma^2),

and its score is s = (m D - x) / sigma^2. The native op streams over the training set with
an online softmax (memory O(B d), never B x N), in float32 (float64 when an input is
float64) with float64 logits where float32 would lose them; see csrc/denoiser/cpu. On CUDA
the op streams on float16 tensor cores with the same precision rules
(diffmem/optimal_stream.py); until that path has passed its tests on a GPU it is off by
default (DIFFMEM_CUDA_OPTIMAL=1 turns it on) and CUDA tensors take the float64 reference.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from ._checks import all_finite
from . import _native, optimal_stream
from .reference import optimal as _reference

CONVENTIONS = ("kernel", "density")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_op_inputs(x, train, sigma, scale, labels, train_labels, topk):
    """The op's contract, as the C++ check_inputs (csrc/denoiser/optimal.h) states it for the
    CPU kernel, for callers of the op itself on CUDA (the public API checks first)."""
    def require(ok, message):
        if not ok:
            raise RuntimeError(f"optimal_denoise: {message}")

    require(x.dim() == 2 and train.dim() == 2, "x and train must be 2-D (rows, features)")
    require(x.shape[1] == train.shape[1], f"row sizes differ: x has {x.shape[1]} features, train {train.shape[1]}")
    require(x.shape[0] >= 1 and train.shape[0] >= 1 and x.shape[1] >= 1, "empty input")
    require(x.dtype in (torch.float32, torch.float64), f"x must be float32 or float64, got {x.dtype}")
    require(train.dtype in (torch.uint8, torch.bfloat16, torch.float32, torch.float64),
            f"train must be uint8, bfloat16, float32 or float64, got {train.dtype}")
    require(train.dtype != torch.float64 or x.dtype == torch.float64, "float64 train needs float64 x")
    for t in (sigma, scale):
        require(t.dim() == 1 and t.shape[0] == x.shape[0] and t.dtype == torch.float64,
                "sigma and scale must be float64 of shape (B,)")
    require((labels is None) == (train_labels is None), "labels and train_labels go together")
    if labels is not None:
        require(labels.dim() == 1 and labels.shape[0] == x.shape[0] and labels.dtype == torch.int64,
                "labels must be int64 of shape (B,)")
        require(train_labels.dim() == 1 and train_labels.shape[0] == train.shape[0]
                and train_labels.dtype == torch.int64, "train_labels must be int64 of shape (N,)")
    require(0 <= topk <= train.shape[0], f"need 0 <= topk <= N, got topk={topk}, N={train.shape[0]}")
    others = (train, sigma, scale) + (() if labels is None else (labels, train_labels))
    require(all(t.device == x.device for t in others), "inputs are on different devices")
    if not all_finite(x):
        raise ValueError("optimal_denoise: x contains NaN or inf")


def _cuda_kernel(x, train, sigma, scale, labels, train_labels, topk):
    """The op's CUDA kernel: streaming on tensor cores (diffmem/optimal_stream.py) where it
    applies; float64 input and top-k take the float64 reference."""
    _check_op_inputs(x, train, sigma, scale, labels, train_labels, topk)
    impl = optimal_stream if optimal_stream.handles(x, train, topk) else _reference
    return impl.optimal_denoise(x, train, sigma, scale, labels, train_labels, topk)


if _native.AVAILABLE:

    @torch.library.register_fake("diffmem::optimal_denoise")
    def _optimal_denoise_fake(x, train, sigma, scale, labels, train_labels, topk):
        return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=torch.float64)

    torch.library.register_kernel("diffmem::optimal_denoise", "cuda", _cuda_kernel)


def denoise(
    x: Any,
    sigma: Any,
    train: Any,
    *,
    scale: Any = 1.0,
    labels: Any = None,
    train_labels: Any = None,
    tikhonov: float | None = None,
    truncate: float | None = None,
    truncate_convention: str = "kernel",
    topk: int | None = None,
    return_lse: bool = False,
):
    """The optimal denoiser D(x; sigma) over `train`, or one of its regularized forms.

    Args:
        x: (B, ...) noisy queries in the [-1, 1] scale; tensor or numpy array.
        sigma: noise level, a float or one per query (B,); finite and > 0.
        train: (N, ...) training items, same row size as x: floats in [-1, 1], or uint8
            images read as img / 127.5 - 1 (never expanded to float in memory).
        scale: the signal scale m of x_t = m y + sigma n (float or (B,)); 1 for VE/EDM.
        labels, train_labels: class-conditional optimum: query b averages only over the
            items with train_labels[n] == labels[b] (labels (B,) ints or one-hot (B, C);
            train_labels (N,) ints). With unique labels it returns the labelled image.
        tikhonov: c >= 0. Tikhonov-regularized optimum (Baptista et al.), whose score is
            s_c = (m D - x) / (sigma^2 + c). The denoiser returned is the one with that
            score, (m D_c - x) / sigma^2 = s_c, i.e.
                D_c = (sigma^2 D + (c / m) x) / (sigma^2 + c).
        truncate: tau > 0. Empirical-Bayes truncation: weights w~_n = phi_n / max(S, tau),
            S = sum_n phi_n, with, by `truncate_convention`,
                "kernel":  phi_n = exp(-||x - m y_n||^2 / (2 sigma^2))  (unnormalized
                           kernels, as in Baptista et al.'s code), or
                "density": phi_n = N(x; m y_n, sigma^2 I) / N = (2 pi sigma^2)^(-d/2)
                           exp(-||x - m y_n||^2 / (2 sigma^2)) / N, so S is the mixture
                           density at x (N: the number of items taking part).
            The score is s_tau = (m sum w~_n y_n - (sum w~_n) x) / sigma^2 = rho (m D - x) / sigma^2
            with rho = S / max(S, tau) = exp(lse - max(lse, log tau)) computed from the
            log-sum-exp (nothing overflows); the denoiser returned is the one with that
            score, D_tau = rho D + (1 - rho) x / m (note sum_n w~_n y_n = rho D). With
            tikhonov as well, the score is rho (m D - x) / (sigma^2 + c).
        topk: restrict the softmax to the k nearest training items (exact distances,
            ties by smaller index); 1 <= k <= N. With labels, the k nearest of the class.
        return_lse: also return lse = log sum_n exp(l_n) over the items taking part, (B,)
            float64.

    Returns:
        D with x's shape on x's device, float32 (float64 when x or train is float64),
        and lse when asked for.
    """
    q, rows, shape = _prepare(x, train)
    B, d = q.shape
    sig = _per_query(sigma, B, "sigma", q.device)
    m = _per_query(scale, B, "scale", q.device)
    lab, tlab = _labels(labels, train_labels, B, rows.shape[0], q.device)
    k = _topk(topk, rows.shape[0])
    c = _nonneg(tikhonov, "tikhonov")
    tau = _positive(truncate, "truncate")
    if truncate_convention not in CONVENTIONS:
        raise ValueError(f"truncate_convention must be one of {CONVENTIONS}, got {truncate_convention!r}")

    D, lse = optimal_denoise(q, rows, sig, m, lab, tlab, k)
    if tau is not None or c is not None:
        D = _regularized(D, lse, q, sig, m, c, tau, truncate_convention, _participants(lab, tlab, k, rows.shape[0], q.device))
    D = D.reshape(shape)
    return (D, lse) if return_lse else D


def score(x: Any, sigma: Any, train: Any, *, scale: Any = 1.0, **options):
    """The score of the (regularized) optimal denoiser, (m D - x) / sigma^2, with D from
    `denoise(x, sigma, train, scale=scale, **options)`; x's shape, D's dtype. For
    tikhonov=c this is (m D_plain - x) / (sigma^2 + c)."""
    return_lse = options.pop("return_lse", False)
    D, lse = denoise(x, sigma, train, scale=scale, return_lse=True, **options)
    xt = _as_tensor(x, "x").to(device=D.device, dtype=D.dtype).reshape(D.shape)
    B = D.shape[0]
    view = (B,) + (1,) * (D.dim() - 1)
    sig = _per_query(sigma, B, "sigma", D.device).to(D.dtype).reshape(view)
    m = _per_query(scale, B, "scale", D.device).to(D.dtype).reshape(view)
    s = (m * D - xt) / sig**2
    return (s, lse) if return_lse else s


def optimal_denoise(x, train, sigma, scale, labels=None, train_labels=None, topk=0):
    """The op on prepared 2-D inputs (see csrc/ops.cpp): native where available, else the
    PyTorch reference."""
    if _native.use_native("optimal_denoise", x.device):
        return torch.ops.diffmem.optimal_denoise(x, train, sigma, scale, labels, train_labels, topk)
    return _reference.optimal_denoise(x, train, sigma, scale, labels, train_labels, topk)


# ---- post-processing: functions of D, lse and x ------------------------------------------


def _regularized(D, lse, x, sigma, m, c, tau, convention, participants):
    """The denoiser whose score is rho (m D - x) / (sigma^2 + c) (see `denoise`)."""
    s2 = sigma.double() ** 2
    rho = torch.ones_like(lse)
    if tau is not None:
        log_s = lse
        if convention == "density":
            log_s = lse - 0.5 * x.shape[1] * torch.log(2 * math.pi * s2) - torch.log(participants.double())
        rho = torch.exp(log_s - torch.clamp(log_s, min=math.log(tau)))
    shrink = rho * s2 / (s2 + (c or 0.0))  # D_out = x/m + shrink (D - x/m)
    x_m = x.double() / m.double()[:, None]
    return (x_m + shrink[:, None] * (D.double() - x_m)).to(D.dtype)


def _participants(labels, train_labels, k, N, device):
    """How many items each query averages over (the N of the density convention), on
    `device` (a CPU tensor of shape (1,) would not mix with CUDA ones)."""
    if labels is None:
        n = torch.full((1,), N, dtype=torch.long, device=device)
    else:
        counts = torch.bincount(train_labels - train_labels.min())
        n = counts[labels - train_labels.min()]
    if k:
        n = torch.clamp(n, max=k)
    return n  # labels and train_labels are on the queries' device (_labels)


# ---- input checks --------------------------------------------------------------------------


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        try:
            with warnings.catch_warnings():  # read-only memmaps: we never write to them
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(np.ascontiguousarray(x))
        except TypeError:
            raise ValueError(f"{name} has unsupported dtype {x.dtype}") from None
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}")
    return x


def _prepare(x: Any, train: Any):
    """x and train as 2-D rows in the op's dtypes, and x's shape."""
    q = _as_tensor(x, "x")
    t = _as_tensor(train, "train")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be floats in [-1, 1] (float16/bfloat16/float32/float64), got {q.dtype}")
    if t.dtype not in _FLOAT_DTYPES + (torch.uint8,):
        raise ValueError(f"train must be uint8 images or floats, got {t.dtype}")
    if q.dim() < 2 or q.shape[0] == 0:
        raise ValueError(f"x must be a non-empty (B, ...) batch, got shape {tuple(q.shape)}")
    if t.dim() < 1 or t.shape[0] == 0:
        raise ValueError("train is empty: need at least one training item")
    shape = q.shape
    q = q.reshape(q.shape[0], -1)
    t = t.reshape(t.shape[0], -1)
    if q.shape[1] != t.shape[1]:
        raise ValueError(f"row sizes differ: x has {q.shape[1]} features per item, train {t.shape[1]}")
    if q.shape[1] == 0:
        raise ValueError("rows are empty (0 features)")
    if t.device != q.device:
        if isinstance(train, np.ndarray):
            t = t.to(q.device)
        else:
            raise ValueError(f"x is on {q.device} but train is on {t.device}; move them to one device")
    if not all_finite(q):
        raise ValueError("x contains NaN or inf")
    # NaN/inf in train: the op finds them in its norms pass (ValueError), at no extra cost.
    wide = torch.float64 in (q.dtype, t.dtype)
    q = q.to(torch.float64 if wide else torch.float32).contiguous()
    if t.dtype == torch.float16:  # exact in float32; the op reads bfloat16 itself
        t = t.to(torch.float32)
    return q, t.contiguous(), shape


def _per_query(v: Any, B: int, name: str, device) -> torch.Tensor:
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
        t = torch.full((B,), float(v), dtype=torch.float64)
    else:
        t = torch.as_tensor(v if not isinstance(v, np.ndarray) else np.asarray(v), dtype=torch.float64).cpu()
        if t.dim() == 0:
            t = t.expand(B)
        t = t.reshape(-1)
        if t.shape[0] == 1:
            t = t.expand(B)
        if t.shape[0] != B:
            raise ValueError(f"{name} must be a number or have one value per query ({B}), got {t.shape[0]}")
    if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        raise ValueError(f"{name} must be finite and > 0, got {t.tolist()[:8]}")
    return t.contiguous().to(device)


def _labels(labels, train_labels, B: int, N: int, device):
    if labels is None and train_labels is None:
        return None, None
    if labels is None:
        raise ValueError("train_labels given but labels is None: the conditional optimum needs a label per query")
    if train_labels is None:
        raise ValueError("labels given but train_labels is None: need a label per training item")
    lab = torch.as_tensor(labels).to("cpu")
    if lab.dim() == 2:  # one-hot (B, C), as the samplers pass class_labels
        lab = lab.argmax(1)
    tl = torch.as_tensor(train_labels).to("cpu").reshape(-1)
    lab = lab.reshape(-1)
    for t, n in ((lab, "labels"), (tl, "train_labels")):
        if t.dtype.is_floating_point and not bool((t == t.round()).all()):
            raise ValueError(f"{n} must be integers")
    lab, tl = lab.long(), tl.long()
    if lab.shape[0] != B:
        raise ValueError(f"labels has {lab.shape[0]} entries, x has {B} queries")
    if tl.shape[0] != N:
        raise ValueError(f"train_labels has {tl.shape[0]} entries, train has {N} items")
    missing = ~torch.isin(lab, tl)
    if bool(missing.any()):
        raise ValueError(
            f"no training item has label {int(lab[missing][0])} (query {int(missing.nonzero()[0])}); "
            "the conditional optimum is undefined there"
        )
    return lab.to(device), tl.to(device)


def _topk(topk, N: int) -> int:
    if topk is None:
        return 0
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)):
        raise ValueError(f"topk must be an integer, got {topk!r}")
    if not 1 <= topk <= N:
        raise ValueError(f"topk must be between 1 and N={N}, got {topk}")
    return int(topk)


def _nonneg(v, name):
    if v is None:
        return None
    v = float(v)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {v}")
    return v


def _positive(v, name):
    if v is None:
        return None
    v = float(v)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {v}")
    return v
