"""Network architectures: EDM's SongUNet (DDPM++ / NCSN++) with DiffMemorize's
skip-connection mask, state-dict compatible with EDM checkpoints."""
from __future__ import annotations

import torch

from . import configs
from .song_unet import SongUNet


def count_parameters(module: torch.nn.Module) -> int:
    """Number of scalar parameters (buffers excluded; shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())


__all__ = ["SongUNet", "configs", "count_parameters"]
