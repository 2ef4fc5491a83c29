"""Exponential moving average of the network weights, with the reference's decay rules.

After every optimizer step, ema <- beta * ema + (1 - beta) * net. The decay per step beta
comes from a half-life in training images that grows with training during the ramp-up
(EDM: half-life = min(half-life, ema_rampup_ratio * images seen so far)), so early EMA
weights do not remember the random initialization. DiffMemorize's modes
(training_loop.py, `ema_mode`):

    mode1  beta = 0.5 ** (batch / half-life)                         EDM's rule
    mode2  beta = 0.5 ** (512 / half-life / data_ratio)              the reference default
    mode3  beta = 0.5 ** (batch / 500,000)                           fixed, no ramp-up
    mode4  beta = final_ema / 0.5 ** (batch / 500,000)
                  * 0.5 ** (batch / half-life / data_ratio)          the EMA sweep

with data_ratio = 50,000 / |D|. mode2 hard-codes 512 (the reference batch), so its decay
per step does not follow the batch size; with the default half-life 0.5 (= 10 |D| images)
it settles at 0.5 ** (512 / 500,000) = 0.99929 for every |D|. mode4 settles at exactly
final_ema when the half-life is 0.5 in reference units.
"""
from __future__ import annotations

import copy

import torch

EMA_MODES = ("mode1", "mode2", "mode3", "mode4")
REFERENCE_BATCH = 512  # the constant of mode2
_TINY = 1e-8  # the reference's guard against a zero half-life


def ramped_halflife(halflife_nimg: float, cur_nimg: int, rampup_ratio: float | None) -> float:
    """EDM's ramp-up: the half-life never exceeds rampup_ratio * cur_nimg."""
    if rampup_ratio is None:
        return halflife_nimg
    return min(halflife_nimg, cur_nimg * rampup_ratio)


def ema_beta(
    mode: str,
    *,
    cur_nimg: int,
    batch_size: int,
    halflife_nimg: float,
    rampup_ratio: float | None,
    data_ratio: float,
    final_ema: float = 0.99929,
) -> float:
    """Decay per step for the step that starts after cur_nimg images (the reference
    computes it before incrementing cur_nimg, so the first step copies the network)."""
    halflife = ramped_halflife(halflife_nimg, cur_nimg, rampup_ratio)
    if mode == "mode1":
        return 0.5 ** (batch_size / max(halflife, _TINY))
    if mode == "mode2":
        return 0.5 ** (REFERENCE_BATCH / max(halflife, _TINY) / data_ratio)
    if mode == "mode3":
        return 0.5 ** (batch_size / 500 / 1000)
    if mode == "mode4":
        constant = 0.5 ** (batch_size / 500 / 1000)
        return final_ema / constant * (0.5 ** (batch_size / max(halflife, _TINY) / data_ratio))
    raise ValueError(f"ema mode must be one of {EMA_MODES}, got {mode!r}")


class EMA:
    """The averaged copy of a network, kept in eval mode without gradients."""

    def __init__(self, net: torch.nn.Module):
        self.module = copy.deepcopy(net).eval().requires_grad_(False)
        self._params = list(self.module.parameters())
        self._buffers = list(self.module.buffers())

    @torch.no_grad()
    def update(self, net: torch.nn.Module, beta: float) -> None:
        net_params = [p.detach() for p in net.parameters()]
        # lerp(p_net -> p_ema, beta) = beta * p_ema + (1 - beta) * p_net, as the reference
        # writes it; one fused call over all tensors (a tiny network is overhead-bound).
        torch._foreach_copy_(self._params, torch._foreach_lerp(net_params, self._params, beta))
        for b_ema, b_net in zip(self._buffers, net.buffers()):
            b_ema.copy_(b_net)  # buffers (embedding frequencies, filters) are not averaged

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
