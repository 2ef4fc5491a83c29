"""SongUNet: the DDPM++ / NCSN++ U-Net of Song et al. (2021) as set up in EDM
(Karras et al., 2022), with DiffMemorize's per-skip-connection on/off mask.

Module and parameter names follow EDM exactly, so EDM and DiffMemorize checkpoints
load with strict=True:

    map_noise, map_label, map_augment, map_layer0, map_layer1   noise/label embedding MLP
    enc['{r}x{r}_conv' | '_down' | '_block{i}' | '_aux_down' | '_aux_skip' | '_aux_residual']
    dec['{r}x{r}_in0' | '_in1' | '_up' | '_block{i}' | '_aux_up' | '_aux_norm' | '_aux_conv']

Every non-aux encoder module pushes its output onto the skip stack; the decoder's
'_block{i}' modules pop them in reverse order and concatenate along channels.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .embedding import FourierEmbedding, PositionalEmbedding
from .layers import Conv2d, GroupNorm, Linear
from .unet_block import UNetBlock


class SongUNet(torch.nn.Module):
    def __init__(self,
                 img_resolution: int,               # input/output image resolution
                 in_channels: int,                  # image channels in
                 out_channels: int,                 # image channels out
                 label_dim: int = 0,                # classes; 0 = unconditional
                 augment_dim: int = 0,              # augmentation-label size; 0 = none
                 model_channels: int = 128,         # base channel count
                 channel_mult: Sequence[int] = (1, 2, 2, 2),  # channels per level, x model_channels
                 channel_mult_emb: int = 4,         # embedding width, x model_channels
                 num_blocks: int = 4,               # residual blocks per level (encoder)
                 attn_resolutions: Sequence[int] = (16,),  # resolutions with self-attention
                 dropout: float = 0.10,
                 label_dropout: float = 0,          # class-label drop rate (classifier-free guidance)
                 embedding_type: str = "positional",  # 'positional' (DDPM++) | 'fourier' (NCSN++)
                 channel_mult_noise: int = 1,       # noise-embedding width, x model_channels
                 encoder_type: str = "standard",    # 'standard' | 'skip' | 'residual' (NCSN++)
                 decoder_type: str = "standard",    # 'standard' | 'skip'
                 resample_filter: Sequence[float] = (1, 1),  # FIR taps: [1,1] DDPM++, [1,3,3,1] NCSN++
                 skip_connections: Sequence[int] | None = None,  # 0/1 per encoder output; None = all on
                 ):
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', got {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', got {decoder_type!r}")
        super().__init__()
        resample_filter = list(resample_filter)
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        # Output-side convs start near zero so each residual branch starts near identity.
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn,
        )

        # Mapping: noise level (+ class label, + augmentation label) -> embedding vector.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder. `aux` channels: the image for 'skip', the running residual for 'residual'.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(
                        caux, caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux, cout, kernel=3, down=True, resample_filter=resample_filter,
                        fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        skip_channels = [m.out_channels for name, m in self.enc.items() if "aux" not in name]
        self.skip_connections = self._check_skip_mask(skip_connections, len(skip_channels),
                                                      num_blocks, len(channel_mult))

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(idx == num_blocks and res in attn_resolutions), **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    @staticmethod
    def _check_skip_mask(mask, expected: int, num_blocks: int, levels: int) -> tuple[bool, ...]:
        # A plain tuple, not a buffer: the mask is configuration and must stay out of the
        # state dict so that EDM checkpoints keep loading strictly.
        if mask is None:
            return (True,) * expected
        mask = list(mask)
        if len(mask) != expected:
            raise ValueError(
                f"skip_connections has {len(mask)} entries; expected {expected} "
                f"= (num_blocks + 1) * len(channel_mult) = ({num_blocks} + 1) * {levels}")
        if any(m not in (0, 1) for m in mask):
            raise ValueError(f"skip_connections entries must be 0 or 1, got {mask}")
        return tuple(bool(m) for m in mask)

    def embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
              augment_labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError("class_labels is required when label_dim > 0")
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([batch, 1], device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            # Scaled so a one-hot vector has unit mean square, like the noise embedding.
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(noise_labels, class_labels, augment_labels, batch=x.shape[0])

        skips: list[torch.Tensor] = []
        kept: list[bool] = []  # whether skips[i] holds a real output (mask entry 1)
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = x + block(aux)
                if kept[-1]:  # a disabled skip stays zero
                    skips[-1] = x
            elif "aux_residual" in name:
                x = aux = (x + block(aux)) / math.sqrt(2)
                if kept[-1]:
                    skips[-1] = x
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                keep = self.skip_connections[len(skips)]
                skips.append(x if keep else torch.zeros_like(x))
                kept.append(keep)

        aux = None
        tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux
