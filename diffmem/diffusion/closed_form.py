"""The denoiser that minimizes the denoising loss on a finite training set: the posterior
mean of y given x = y + sigma n when y is drawn uniformly from the training images,

    D(x; sigma) = sum_n softmax_n(-||x - y_n||^2 / (2 sigma^2)) y_n.

Sampling with it reproduces training images (it memorizes everything), which makes it the
100 % reference for memorization and an exactly known target for testing samplers.
"""
from __future__ import annotations

import torch


class EmpiricalOptimalDenoiser:
    """D(x; sigma) over `train_images` (N, C, H, W), floats in [-1, 1], in the VE/EDM
    parameterization (x = y + sigma n, no signal scaling). Computes in float64 on the
    training images' device and returns float64 on x's device. Unconditional."""

    label_dim = 0

    def __init__(self, train_images: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80):
        if train_images.dim() != 4 or train_images.shape[0] == 0:
            raise ValueError(f"train_images must be a non-empty (N, C, H, W) batch, got shape {tuple(train_images.shape)}")
        if not train_images.dtype.is_floating_point:
            raise ValueError(f"train_images must be floats in [-1, 1], got dtype {train_images.dtype}")
        self.train_images = train_images
        self.img_channels = int(train_images.shape[1])
        self.img_resolution = int(train_images.shape[2])
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self._rows = train_images.reshape(train_images.shape[0], -1).to(torch.float64)
        self._sq_norms = (self._rows**2).sum(1)

    def __call__(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        rows = self._rows
        q = x.reshape(x.shape[0], -1).to(device=rows.device, dtype=torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=rows.device).reshape(-1, 1)
        # -||x - y||^2 = 2 x.y - ||y||^2 - ||x||^2; the last term is the same for every n and
        # cancels in the softmax, so it is left out.
        logits = (2 * q @ rows.T - self._sq_norms) / (2 * sigma**2)
        weights = torch.softmax(logits, dim=1)
        return (weights @ rows).reshape(x.shape).to(x.device)

    def round_sigma(self, sigma) -> torch.Tensor:
        return torch.as_tensor(sigma)

    def to(self, device) -> "EmpiricalOptimalDenoiser":
        """The same denoiser with its training images on `device`."""
        return EmpiricalOptimalDenoiser(self.train_images.to(device), self.sigma_min, self.sigma_max)
