"""Noise-level embeddings: sinusoidal (DDPM++) and random Fourier features (NCSN++).

Both return [cos(t f), sin(t f)] for each frequency f; SongUNet swaps the halves to
[sin, cos], as EDM does, so trained checkpoints see the layout they were trained on.
"""
from __future__ import annotations

import math

import torch


class PositionalEmbedding(torch.nn.Module):
    """Frequencies f_i = (1 / max_positions) ** (i / (C/2 - endpoint)), i = 0 .. C/2-1.
    endpoint=True makes the last frequency exactly 1 / max_positions."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        exponent = torch.arange(half, dtype=torch.float32, device=t.device) / (half - int(self.endpoint))
        freqs = (1 / self.max_positions) ** exponent
        angles = torch.outer(t, freqs.to(t.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random frequencies f ~ N(0, scale^2), fixed at construction (buffer `freqs`);
    angles are 2 pi t f."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(t, (2 * math.pi * self.freqs).to(t.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)
