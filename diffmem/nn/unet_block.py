"""The residual U-Net block shared by DDPM++, NCSN++ (and ADM): GroupNorm-SiLU-conv,
noise-embedding injection, GroupNorm-SiLU-dropout-conv, a residual shortcut, and
optional self-attention."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .layers import Conv2d, GroupNorm, Linear, attention_weights


class UNetBlock(torch.nn.Module):
    """x -> skip_scale * (conv1(drop(silu(norm1(conv0(silu(norm0(x))) (+) emb)))) + skip(x)),
    then, with attention, h -> skip_scale * (proj(attn(norm2(h))) + h).

    The embedding enters as an added per-channel shift (adaptive_scale=False, DDPM++) or
    as scale-and-shift norm1(h) * (1 + scale) + shift (adaptive_scale=True, ADM).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int,
                 up: bool = False, down: bool = False, attention: bool = False,
                 num_heads: int | None = None, channels_per_head: int = 64, dropout: float = 0,
                 skip_scale: float = 1, eps: float = 1e-5, resample_filter: Sequence[float] = (1, 1),
                 resample_proj: bool = False, adaptive_scale: bool = True,
                 init: dict | None = None, init_zero: dict | None = None, init_attn: dict | None = None):
        super().__init__()
        init = {} if init is None else init
        init_zero = dict(init_weight=0) if init_zero is None else init_zero
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        # The shortcut needs a layer only when the shape changes; kernel 0 = resample only.
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1,
                              **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shortcut = x
        h = self.conv0(F.silu(self.norm0(x)))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))

        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        h = h + (self.skip(shortcut) if self.skip is not None else shortcut)
        h = h * self.skip_scale

        if self.num_heads:
            h = self.attend(h)
        return h

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = h.shape
        # qkv's 3C output channels are laid out as [head, channel-in-head, (q, k, v)]:
        # the layout EDM checkpoints were trained with.
        qkv = self.qkv(self.norm2(h)).reshape(batch * self.num_heads, channels // self.num_heads, 3, -1)
        q, k, v = qkv.unbind(2)
        w = attention_weights(q, k)
        a = torch.einsum("nqk,nck->ncq", w, v)
        h = self.proj(a.reshape(batch, channels, height, width)) + h
        return h * self.skip_scale
