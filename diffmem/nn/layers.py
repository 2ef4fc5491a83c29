"""Primitive layers of the EDM networks: Linear, Conv2d with FIR up/downsampling,
GroupNorm and the attention-weight op.

Parameters are created in the same order, with the same shapes, names and random draws
as EDM's training/networks.py, so that a state dict saved there loads here with
strict=True and a fixed seed gives the same initial weights.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random tensor for the given fan-in/fan-out rule (uniform bounds / normal stds):

    xavier_uniform  U(-a, a), a = sqrt(6 / (fan_in + fan_out))
    xavier_normal   N(0, s),  s = sqrt(2 / (fan_in + fan_out))
    kaiming_uniform U(-a, a), a = sqrt(3 / fan_in)
    kaiming_normal  N(0, s),  s = sqrt(1 / fan_in)
    """
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}")


class Linear(torch.nn.Module):
    """y = x W^T + b, with W of shape [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        # The bias is drawn even when init_bias == 0: keeps the random stream aligned with EDM.
        bias_value = weight_init([out_features], **fans) * init_bias if bias else None
        self.bias = torch.nn.Parameter(bias_value) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y


def fir_filter_2d(taps: Sequence[float]) -> torch.Tensor:
    """Separable 2-D FIR filter f f^T / (sum f)^2, shaped [1, 1, k, k] for conv2d."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square()).reshape(1, 1, len(taps), len(taps))


class Conv2d(torch.nn.Module):
    """k x k convolution ('same' padding), optionally preceded by 2x FIR upsampling or
    2x FIR downsampling. kernel=0 gives a pure resampler with no weight.

    fused_resample=True reorders the work the way EDM's NCSN++ residual path does:
    up: transposed-conv upsample then unpadded conv; down: padded conv then strided blur.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: Sequence[float] = (1, 1),
                 fused_resample: bool = False, init_mode: str = "kaiming_normal",
                 init_weight: float = 1, init_bias: float = 0):
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel,
                    fan_out=out_channels * kernel * kernel)
        if kernel:
            self.weight = torch.nn.Parameter(
                weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
        else:
            self.register_parameter("weight", None)
        if kernel and bias:
            self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias)
        else:
            self.register_parameter("bias", None)
        # A None buffer stays out of the state dict, as in EDM for non-resampling convs.
        self.register_buffer("resample_filter", fir_filter_2d(resample_filter) if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        # Depthwise filters; upsampling by zero insertion keeps 1/4 of the mass, hence the 4.
        if self.fused_resample and self.up and w is not None:
            f_up = (f * 4).tile([self.in_channels, 1, 1, 1])
            x = F.conv_transpose2d(x, f_up, groups=self.in_channels, stride=2, padding=w_pad + f_pad)
            x = F.conv2d(x, w)
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            f_down = f.tile([self.out_channels, 1, 1, 1])
            x = F.conv2d(x, f_down, groups=self.out_channels, stride=2)
        else:
            if self.up:
                f_up = (f * 4).tile([self.in_channels, 1, 1, 1])
                x = F.conv_transpose2d(x, f_up, groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                f_down = f.tile([self.in_channels, 1, 1, 1])
                x = F.conv2d(x, f_down, groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


class GroupNorm(torch.nn.Module):
    """Group normalization with min(num_groups, num_channels // min_channels_per_group)
    groups, so narrow layers keep at least min_channels_per_group channels per group."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
                            bias=self.bias.to(x.dtype), eps=self.eps)


def _attention_dtype(dtype: torch.dtype) -> torch.dtype:
    # At least float32 (EDM's choice, for fp16/bf16 stability); float64 stays float64 so
    # double-precision checks are not rounded to float32.
    return torch.promote_types(dtype, torch.float32)


class AttentionWeights(torch.autograd.Function):
    """w[n, i, j] = softmax_j( sum_c q[n, c, i] k[n, c, j] / sqrt(C) ).

    Computed in (at least) float32 but returned, saved and differentiated in the inputs'
    dtype, so fp16 training keeps fp16 activations without fp16 softmax overflow."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        acc = _attention_dtype(q.dtype)
        k_scaled = k / math.sqrt(k.shape[1])
        w = torch.einsum("ncq,nck->nqk", q.to(acc), k_scaled.to(acc)).softmax(dim=2).to(q.dtype)
        ctx.save_for_backward(q, k, w)
        return w

    @staticmethod
    def backward(ctx, dw: torch.Tensor):
        q, k, w = ctx.saved_tensors
        acc = _attention_dtype(q.dtype)
        dw, w32 = dw.to(acc), w.to(acc)
        # Softmax Jacobian-vector product: ds = w * (dw - sum_j dw_j w_j).
        ds = w32 * (dw - (dw * w32).sum(dim=2, keepdim=True))
        scale = math.sqrt(k.shape[1])
        dq = torch.einsum("nck,nqk->ncq", k.to(acc), ds).to(q.dtype) / scale
        dk = torch.einsum("ncq,nqk->nck", q.to(acc), ds).to(k.dtype) / scale
        return dq, dk


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmax attention weights for q, k of shape [N, C, L] -> [N, L_q, L_k]."""
    return AttentionWeights.apply(q, k)
