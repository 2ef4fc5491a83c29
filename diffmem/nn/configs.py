"""SongUNet constructor arguments for the CIFAR-10 networks of EDM's train.py
(--arch=ddpmpp / --arch=ncsnpp), with DiffMemorize's training defaults (dropout 0.13,
num_blocks 2, attention at 16x16).

    net = SongUNet(**configs.ddpmpp(model_channels=256, num_blocks=4))

augment_dim is left at 0: EDM's train.py sets augment_dim=9 when its augmentation
pipeline is on, so pass augment_dim=9 to match a checkpoint trained with it.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any

from .song_unet import SongUNet

_CIFAR10 = dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=0, augment_dim=0)
_DIFFMEMORIZE = dict(dropout=0.13, num_blocks=2, attn_resolutions=[16], skip_connections=None)

_DDPMPP = dict(embedding_type="positional", encoder_type="standard", decoder_type="standard",
               channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2])
_NCSNPP = dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard",
               channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2])


def _build(arch: dict, overrides: dict[str, Any]) -> dict[str, Any]:
    accepted = set(inspect.signature(SongUNet.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise TypeError(f"unknown SongUNet arguments: {unknown}")
    # Deep copy: callers may mutate the returned lists without touching the defaults.
    return copy.deepcopy({**_CIFAR10, **_DIFFMEMORIZE, **arch, **overrides})


def ddpmpp(**overrides: Any) -> dict[str, Any]:
    """DDPM++: positional embedding, standard encoder/decoder, [1,1] resampling."""
    return _build(_DDPMPP, overrides)


def ncsnpp(**overrides: Any) -> dict[str, Any]:
    """NCSN++: Fourier embedding (2x wide), residual encoder, [1,3,3,1] resampling."""
    return _build(_NCSNPP, overrides)
