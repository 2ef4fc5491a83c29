"""The reference rules that turn a full training set into the experiment's D.

Each rule is a pure function ImageDataset -> new ImageDataset (inputs are never
modified) reproducing one of the DiffMemorize dataset tools (Gu et al. 2023,
dataset_utils/*.py):

  class_balanced  dataset_size.py       first |D|/C images of every class, class by class
  first_classes   dataset_diversity.py  floor(|D|/C) from classes 0..C-1, last takes the rest
  random_labels   dataset_random.py     labels i.i.d. uniform in [0, C-1], Python random, seed 1024
  unique_labels   dataset_unique.py     label = index, C = |D|
  mix             intra_diversity.py    first images of one set, then the first of another
  resize          dataset_tool.py       PIL LANCZOS per image
  first, no_labels                      plain prefix; drop labels

"First" always means file order of the loaded dataset.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from .dataset import ImageDataset

REFERENCE_SEED = 1024  # random.seed(1024) in dataset_random.py


def _check_size(size, rule: str) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise ValueError(f"{rule}: size must be an integer, got {size!r}")
    if size < 1:
        raise ValueError(f"{rule}: size must be at least 1, got {size}")
    return int(size)


def _class_indices(ds: ImageDataset, rule: str) -> list[np.ndarray]:
    """For every class c, the indices of its images in file order."""
    if ds.labels is None:
        raise ValueError(f"{rule} needs a labelled dataset; {ds.name or 'this dataset'} has no labels")
    labels = ds.labels.numpy()
    return [np.flatnonzero(labels == c) for c in range(ds.num_classes)]


def first(ds: ImageDataset, size: int) -> ImageDataset:
    """The first ``size`` images (and labels), unchanged."""
    size = _check_size(size, "first")
    if size > len(ds):
        raise ValueError(f"first: |D| = {size} is larger than the dataset: only {len(ds)} images are available")
    return ds.select(torch.arange(size), name=f"{ds.name}|first({size})")


def class_balanced(ds: ImageDataset, size: int) -> ImageDataset:
    """The first size/C images of each of the C classes in file order, concatenated class
    by class (all of class 0, then class 1, ...). Labels are kept."""
    size = _check_size(size, "class_balanced")
    per_class_index = _class_indices(ds, "class_balanced")
    classes = ds.num_classes
    if size % classes:
        raise ValueError(f"class_balanced: |D| = {size} is not a multiple of the number of classes ({classes})")
    per_class = size // classes
    smallest = min(len(ix) for ix in per_class_index)
    if per_class > smallest:
        short = min(range(classes), key=lambda c: len(per_class_index[c]))
        raise ValueError(
            f"class_balanced: |D| = {size} needs {per_class} images of every class, but class {short} "
            f"has only {smallest}; at most {smallest * classes} images are available class-balanced"
        )
    chosen = np.concatenate([ix[:per_class] for ix in per_class_index])
    return ds.select(chosen, name=f"{ds.name}|class_balanced({size})")


def first_classes(ds: ImageDataset, size: int, num_classes: int) -> ImageDataset:
    """The class-diversity rule: floor(size/C) images (file order) from each of classes
    0..C-2 and the remaining size - (C-1)*floor(size/C) from class C-1, concatenated class
    by class. Labels are kept and num_classes becomes C (labels now lie in 0..C-1)."""
    size = _check_size(size, "first_classes")
    per_class_index = _class_indices(ds, "first_classes")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"first_classes: num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    if num_classes > ds.num_classes:
        raise ValueError(f"first_classes: num_classes = {num_classes} exceeds the dataset's {ds.num_classes} classes")
    per_class = size // num_classes
    counts = [per_class] * (num_classes - 1) + [size - per_class * (num_classes - 1)]
    for c, count in enumerate(counts):
        if count > len(per_class_index[c]):
            raise ValueError(
                f"first_classes: |D| = {size} over {num_classes} classes needs {count} images of class {c}, "
                f"but only {len(per_class_index[c])} are available"
            )
    chosen = np.concatenate([per_class_index[c][:count] for c, count in enumerate(counts)])
    subset = ds.select(chosen, name=f"{ds.name}|first_classes({size}, C={num_classes})")
    return subset.replace(num_classes=num_classes)


def random_labels(ds: ImageDataset, num_classes: int, seed: int = REFERENCE_SEED) -> ImageDataset:
    """Images unchanged; label i is the i-th draw of random.Random(seed).randint(0, C-1),
    the exact stream of the reference's random.seed(1024) + random.randint. The labels are
    i.i.d. uniform, not balanced. Works on unlabelled data too."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"random_labels: num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    draw = random.Random(seed)
    labels = torch.tensor([draw.randint(0, num_classes - 1) for _ in range(len(ds))], dtype=torch.int64)
    return ds.replace(labels=labels, num_classes=num_classes, name=f"{ds.name}|random_labels(C={num_classes}, seed={seed})")


def unique_labels(ds: ImageDataset) -> ImageDataset:
    """Every image its own class: label = index, num_classes = |D|."""
    if len(ds) == 0:
        raise ValueError("unique_labels: the dataset is empty")
    return ds.replace(labels=torch.arange(len(ds)), num_classes=len(ds), name=f"{ds.name}|unique_labels")


def no_labels(ds: ImageDataset) -> ImageDataset:
    """The same images, unlabelled (unconditional training)."""
    return ds.replace(labels=None, num_classes=0, name=f"{ds.name}|no_labels")


def resize(ds: ImageDataset, resolution: int | tuple[int, int]) -> ImageDataset:
    """Every image resampled to ``resolution`` (an int for square, or (height, width)) with
    PIL's LANCZOS filter, as the reference dataset_tool.py --resolution does. LANCZOS is
    antialiased when shrinking; enlarging is allowed too. Output stays uint8.

    1- and 3-channel images go through PIL as 'L' / 'RGB' images, bit-identical to the
    reference. Other channel counts are resampled one channel at a time (PIL would
    premultiply a 4th channel as alpha, which would mix channels)."""
    import PIL.Image

    if isinstance(resolution, (int, np.integer)) and not isinstance(resolution, bool):
        height = width = int(resolution)
    elif isinstance(resolution, (tuple, list)) and len(resolution) == 2 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in resolution
    ):
        height, width = (int(v) for v in resolution)
    else:
        raise ValueError(f"resize: resolution must be an int or a (height, width) pair, got {resolution!r}")
    if height < 1 or width < 1:
        raise ValueError(f"resize: resolution must be positive, got {height}x{width}")

    pixels = ds.images.numpy()
    out = np.empty((len(ds), ds.channels, height, width), dtype=np.uint8)
    lanczos = PIL.Image.Resampling.LANCZOS
    for i, image in enumerate(pixels):
        if ds.channels == 3:
            rgb = PIL.Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), "RGB")
            out[i] = np.asarray(rgb.resize((width, height), lanczos)).transpose(2, 0, 1)
        else:
            for c, channel in enumerate(image):
                out[i, c] = np.asarray(PIL.Image.fromarray(channel, "L").resize((width, height), lanczos))
    return ds.replace(images=torch.from_numpy(out), name=f"{ds.name}|resize({height}x{width})")


def mix(ds_a: ImageDataset, ds_b: ImageDataset, alpha: float, size: int) -> ImageDataset:
    """The intra-diversity mixture: the first round(size * (1 - alpha)) images of ds_a
    followed by the first size - that many of ds_b. alpha = 0 is all ds_a, alpha = 1 all
    ds_b. Labels are kept when both sets have them (num_classes = the larger of the two),
    otherwise dropped.

    Rounding is Python's round() (half to even), so float error cannot lose an image:
    one version of the reference script truncated with int(), which takes 399 rather
    than 400 images from ds_a at size 2000, alpha 0.8, since 1 - 0.8 < 0.2 in floats."""
    size = _check_size(size, "mix")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mix: alpha must lie in [0, 1], got {alpha}")
    if ds_a.images.shape[1:] != ds_b.images.shape[1:]:
        raise ValueError(
            f"mix: the two datasets' images differ in shape (C, H, W): "
            f"{tuple(ds_a.images.shape[1:])} vs {tuple(ds_b.images.shape[1:])}"
        )
    count_a = round(size * (1.0 - alpha))
    count_b = size - count_a
    for which, ds, count in (("first", ds_a, count_a), ("second", ds_b, count_b)):
        if count > len(ds):
            raise ValueError(
                f"mix: |D| = {size} at alpha = {alpha} takes {count} images from the {which} dataset, "
                f"but only {len(ds)} are available"
            )
    images = torch.cat([ds_a.images[:count_a], ds_b.images[:count_b]])
    if ds_a.labels is not None and ds_b.labels is not None:
        labels = torch.cat([ds_a.labels[:count_a], ds_b.labels[:count_b]])
        num_classes = max(ds_a.num_classes, ds_b.num_classes)
    else:
        labels, num_classes = None, 0
    return ImageDataset(images, labels, num_classes, f"mix({ds_a.name}, {ds_b.name}, alpha={alpha}, {size})")
