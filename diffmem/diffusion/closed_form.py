"""The denoiser that minimizes the denoising loss on a finite training set: the posterior
mean of y given x = m y + sigma n when y is drawn uniformly from the training images,

    D(x; sigma) = sum_n softmax_n(-||x - m y_n||^2 / (2 sigma^2)) y_n.

Sampling with it reproduces training images (it memorizes everything), which makes it the
100 % reference for memorization and an exactly known target for testing samplers. The
regularized forms of Baptista et al. (Tikhonov, empirical-Bayes truncation), the
class-conditional optimum and the top-k restricted one are options; the work is done by
diffmem.optimal (a fused streaming op: memory O(B d), never B x N).
"""
from __future__ import annotations

import torch

from .. import optimal

COMPUTE_DTYPES = (torch.float64, torch.float32)  # EmpiricalOptimalDenoiser(dtype=...)


class EmpiricalOptimalDenoiser:
    """D(x; sigma) over `train_images` (N, C, H, W): floats in [-1, 1], or uint8 images
    (read as img / 127.5 - 1). Computes on the training images' device in `dtype` and
    returns float64 on x's device (the samplers' state is float64 anyway).

    dtype: the compute precision. torch.float64 (default) casts the queries to float64,
    so the op computes in float64 (error ~1e-12). torch.float32 keeps float32 queries:
    on the CPU the native op then computes in float32 (float64 logits only where float32
    would lose them; relative error of D <= 5e-4, see diffmem.optimal), which is faster
    (1.4x at B = 64, N = 2,000, d = 3,072 on one core of the development CPU). On CUDA,
    float32 queries take the op's float16 tensor-core streaming kernel
    (diffmem/optimal_stream.py, same error budget) when it is enabled (diffmem._native:
    off by default until it has passed its tests on a GPU, DIFFMEM_CUDA_OPTIMAL=1 turns
    it on); otherwise the PyTorch reference computes in float64 whatever dtype says, and
    float32 only rounds the queries and D to float32. Deliberately
    there is no float32 mode of the reference: it is the float64 truth the tests and
    benchmarks compare against. float64 training images make the op compute in float64
    in either case.

    Options (see diffmem.optimal.denoise): `train_labels` (N,) ints make it
    class-conditional (label_dim = number of classes; calls without class_labels stay
    unconditional); `tikhonov`, `truncate` / `truncate_convention` and `topk` select the
    regularized forms; `scale` is the signal scale m (1: the VE/EDM parameterization)."""

    label_dim = 0

    def __init__(
        self,
        train_images: torch.Tensor,
        sigma_min: float = 0.002,
        sigma_max: float = 80,
        *,
        train_labels: torch.Tensor | None = None,
        tikhonov: float | None = None,
        truncate: float | None = None,
        truncate_convention: str = "kernel",
        topk: int | None = None,
        scale: float = 1.0,
        dtype: torch.dtype = torch.float64,
    ):
        if train_images.dim() != 4 or train_images.shape[0] == 0:
            raise ValueError(f"train_images must be a non-empty (N, C, H, W) batch, got shape {tuple(train_images.shape)}")
        if not (train_images.dtype.is_floating_point or train_images.dtype == torch.uint8):
            raise ValueError(f"train_images must be floats in [-1, 1] or uint8 images, got dtype {train_images.dtype}")
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype!r}")
        self.dtype = dtype
        self.train_images = train_images
        self.img_channels = int(train_images.shape[1])
        self.img_resolution = int(train_images.shape[2])
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.train_labels = None
        if train_labels is not None:
            self.train_labels = torch.as_tensor(train_labels).reshape(-1).long()
            if self.train_labels.shape[0] != train_images.shape[0]:
                raise ValueError(
                    f"train_labels has {self.train_labels.shape[0]} entries, train_images {train_images.shape[0]}"
                )
            self.label_dim = int(self.train_labels.max()) + 1
        self._options = dict(tikhonov=tikhonov, truncate=truncate, truncate_convention=truncate_convention, topk=topk)
        self.scale = scale

    def __call__(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        train = self.train_images
        q = x.to(device=train.device, dtype=self.dtype)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        labels = None
        if class_labels is not None and self.train_labels is not None:
            labels = torch.as_tensor(class_labels)
            labels = labels.argmax(1) if labels.dim() == 2 else labels.reshape(-1)
            labels = labels.expand(q.shape[0]) if labels.numel() == 1 else labels
        D = optimal.denoise(
            q,
            sigma,
            train,
            scale=self.scale,
            labels=labels,
            train_labels=self.train_labels if labels is not None else None,
            **self._options,
        )
        return D.to(device=x.device, dtype=torch.float64)

    def round_sigma(self, sigma) -> torch.Tensor:
        return torch.as_tensor(sigma)

    def to(self, device) -> "EmpiricalOptimalDenoiser":
        """The same denoiser with its training images on `device`."""
        return EmpiricalOptimalDenoiser(
            self.train_images.to(device),
            self.sigma_min,
            self.sigma_max,
            train_labels=self.train_labels,
            scale=self.scale,
            dtype=self.dtype,
            **self._options,
        )
