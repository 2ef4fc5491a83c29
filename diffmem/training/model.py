"""From a TrainingConfig to the network that is trained: SongUNet (DDPM++ or NCSN++) inside
its VP / VE / EDM preconditioner, and the matching loss.

The SongUNet arguments are stored in every snapshot (`network` entry) so a snapshot can be
rebuilt and sampled without the config that trained it: see load_denoiser.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from ..diffusion import EDMLoss, EDMPrecond, VELoss, VEPrecond, VPLoss, VPPrecond
from ..nn import SongUNet, configs
from . import checkpoint

_PRECONDS = {"vp": (VPPrecond, VPLoss), "ve": (VEPrecond, VELoss), "edm": (EDMPrecond, EDMLoss)}


def network_spec(config, img_resolution: int, img_channels: int, label_dim: int) -> dict[str, Any]:
    """Everything needed to rebuild the denoiser: plain values only (it goes into
    weights_only checkpoints)."""
    overrides = dict(
        img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels, label_dim=label_dim,
        model_channels=config.num_channels, channel_mult=list(config.channel_mult), num_blocks=config.num_blocks,
        attn_resolutions=list(config.attn_resolutions), dropout=config.dropout,
        skip_connections=None if config.skip_connections is None else list(config.skip_connections),
    )
    if config.embed is not None:
        overrides["embedding_type"] = config.embed
    song_unet = configs.ddpmpp(**overrides) if config.arch == "ddpmpp" else configs.ncsnpp(**overrides)
    return dict(arch=config.arch, precond=config.precond, img_resolution=img_resolution,
                img_channels=img_channels, label_dim=label_dim, song_unet=song_unet)


def build_denoiser(spec: dict[str, Any]) -> torch.nn.Module:
    """The preconditioned network of `spec` (from network_spec), freshly initialized with
    the global RNG."""
    precond_class, _ = _PRECONDS[spec["precond"]]
    net = SongUNet(**spec["song_unet"])
    _check_group_norms(net, spec["song_unet"]["model_channels"])
    return precond_class(net, img_resolution=spec["img_resolution"], img_channels=spec["img_channels"],
                         label_dim=spec["label_dim"])


def _check_group_norms(net: torch.nn.Module, model_channels: int) -> None:
    """GroupNorm uses min(32, channels // 4) groups, which must divide the channels; some
    widths (e.g. a 6 + 12 = 18-channel skip concatenation) do not. Found here, at
    construction, rather than as a shape error in the first forward pass."""
    for name, module in net.named_modules():
        groups = getattr(module, "num_groups", None)
        if groups is None or not hasattr(module, "weight"):
            continue
        channels = module.weight.numel()
        if groups < 1 or channels % groups:
            raise ValueError(
                f"--num-channels {model_channels} gives a {channels}-channel layer ({name}) that GroupNorm cannot "
                f"split into min(32, {channels} // 4) = {groups} groups; choose another width (16, 32, 64, 128, 256 work)")


def build_loss(precond: str):
    return _PRECONDS[precond][1]()


def load_denoiser(path: str | os.PathLike, which: str = "ema", device="cpu") -> tuple[torch.nn.Module, dict]:
    """A snapshot's denoiser (the EMA weights by default, or which='model' for the raw
    ones) in eval mode, and the snapshot's metadata."""
    state = checkpoint.load_snapshot(path)
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    denoiser = build_denoiser(state["network"])
    denoiser.load_state_dict(state[which])
    meta = {key: value for key, value in state.items() if key not in ("ema", "model")}
    return denoiser.eval().requires_grad_(False).to(device), meta


def cast_output_to_float32(denoiser: torch.nn.Module):
    """Under bf16 autocast the U-Net returns bf16, which the preconditioner rejects (it
    expects the dtype it asked for): cast the raw network's output back to float32. A
    hook, not a wrapper module, so parameter names and checkpoints stay unchanged."""
    return denoiser.model.register_forward_hook(lambda module, args, output: output.float())
