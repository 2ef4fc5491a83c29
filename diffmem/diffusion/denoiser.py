"""The interface the samplers need: a denoiser D(x; sigma) with its supported noise range.

Trained networks wrapped in VPPrecond / VEPrecond / EDMPrecond and closed-form denoisers
(EmpiricalOptimalDenoiser) both satisfy it, so anything that samples works with either.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Denoiser(Protocol):
    sigma_min: float  # lowest noise level the denoiser supports; samplers clip to it
    sigma_max: float  # highest supported noise level
    label_dim: int  # number of classes, 0 = unconditional
    img_channels: int
    img_resolution: int

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """D(x; sigma), the estimate of the clean image, same shape as x (B, C, H, W). sigma is
        one noise level for the batch or one per image; class_labels is one-hot (B, label_dim)."""
        ...

    def round_sigma(self, sigma) -> torch.Tensor:
        """The nearest noise level the denoiser can be evaluated at (identity for
        continuous-time denoisers)."""
        ...
