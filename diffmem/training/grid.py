"""PNG grid of generated samples beside their two nearest training images.

One row per sample: [sample | NN1 | NN2 | d1/d2]. A memorized sample (d1/d2 below the
threshold) gets a red frame, the others a grey one, so copies stand out at a glance.
Small images are enlarged with nearest-neighbour so pixels stay visible.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from .checkpoint import write_atomic

MEMORIZED_COLOR = (220, 30, 30)
OTHER_COLOR = (150, 150, 150)
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)


def _to_rgb(image: torch.Tensor, scale: int) -> np.ndarray:
    """uint8 (C, H, W) -> uint8 (H*scale, W*scale, 3)."""
    array = image.cpu().numpy()
    if array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    array = array[:3].transpose(1, 2, 0)
    return np.repeat(np.repeat(array, scale, axis=0), scale, axis=1)


def save_nn_grid(
    path: str | os.PathLike,
    samples: torch.Tensor,
    train: torch.Tensor,
    nn_index: np.ndarray,
    nn_dist: np.ndarray,
    memorized: np.ndarray,
    rows: int = 16,
    min_tile: int = 64,
) -> None:
    """samples: uint8 (Q, C, H, W); train: uint8 (N, C, H, W); nn_index, nn_dist: (Q, 2);
    memorized: (Q,) bool. The first `rows` samples are drawn (seeds 0, 1, ...)."""
    from PIL import Image, ImageDraw

    rows = min(rows, samples.shape[0])
    if rows == 0:
        return
    height, width = samples.shape[2:]
    scale = max(1, math.ceil(min_tile / max(height, width)))
    tile_h, tile_w = height * scale, width * scale
    frame, gap, text_w, header = 3, 4, 110, 16
    cell_w, cell_h = tile_w + 2 * frame + gap, tile_h + 2 * frame + gap
    canvas = Image.new("RGB", (gap + 3 * cell_w + text_w, header + gap + rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(("sample", "NN1", "NN2")):
        draw.text((gap + column * cell_w + frame, 2), title, fill=TEXT_COLOR)
    for row in range(rows):
        y = header + gap + row * cell_h
        color = MEMORIZED_COLOR if memorized[row] else OTHER_COLOR
        tiles = (samples[row], train[int(nn_index[row, 0])], train[int(nn_index[row, 1])])
        for column, image in enumerate(tiles):
            x = gap + column * cell_w
            # The sample's frame shows the verdict; the neighbours get a neutral frame.
            draw.rectangle([x, y, x + tile_w + 2 * frame - 1, y + tile_h + 2 * frame - 1],
                           fill=color if column == 0 else OTHER_COLOR)
            canvas.paste(Image.fromarray(_to_rgb(image, scale)), (x + frame, y + frame))
        d1, d2 = float(nn_dist[row, 0]), float(nn_dist[row, 1])
        ratio = d1 / d2 if d2 > 0 else float("nan")
        label = f"d1/d2={ratio:.3f}" + ("\nmemorized" if memorized[row] else "")
        draw.text((gap + 3 * cell_w, y + frame), label, fill=MEMORIZED_COLOR if memorized[row] else TEXT_COLOR)
    write_atomic(path, lambda file: canvas.save(file, format="PNG"), "wb")
