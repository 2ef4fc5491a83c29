"""diffmem.data: training sets and the reference rules that cut them to size.

    ds = diffmem.data.build("cifar10:../shared/data/cifar10-train.npz", size=1000, labels="random", num_classes=10)

``load`` reads a dataset (see sources.ACCEPTED_FORMS), the functions of ``subsets`` apply
one reference rule each, and ``build`` chains them in the reference's order.
"""
from __future__ import annotations

import os

from .dataset import ImageDataset
from .sources import ACCEPTED_FORMS, load
from .subsets import (
    REFERENCE_SEED,
    class_balanced,
    first,
    first_classes,
    mix,
    no_labels,
    random_labels,
    resize,
    unique_labels,
)

LABEL_MODES = ("none", "true", "random", "unique")


def build(
    data: str | os.PathLike,
    size: int | None = None,
    labels: str = "true",
    num_classes: int | None = None,
    resolution: int | tuple[int, int] | None = None,
    root: str | os.PathLike | None = None,
    seed: int = REFERENCE_SEED,
) -> ImageDataset:
    """The training set D of one experiment, built in a fixed order:

    1. load(data, root=root)
    2. choose the images (size=None keeps every image, in file order):
       * labelled data, num_classes given and smaller than the dataset's class count,
         labels 'true' or 'none': first_classes(size, num_classes), the class-diversity
         study (for 'none' the classes pick the images, then the labels are dropped);
       * other labelled data: class_balanced(size), the |D| study. This includes
         'random' and 'unique', which the reference also draws class-balanced;
       * unlabelled data: first(size).
    3. set the labels: 'true' keeps them, 'none' drops them, 'random' draws
       random_labels(num_classes, seed) (num_classes defaults to the dataset's class
       count), 'unique' gives unique_labels.
    4. resize(resolution) when given.

    Labels come after selection because the reference draws its random labels for the
    selected images in their final order; resizing comes last because it acts on each
    image alone and is cheapest on the smallest set.

    Raises ValueError for |D| larger than the data allows, a size the rule cannot split,
    'true' labels on unlabelled data, or num_classes larger than the dataset's.
    """
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}")
    if labels == "unique" and num_classes is not None:
        raise ValueError("labels='unique' sets num_classes = |D|; do not pass num_classes")

    ds = load(data, root=root)

    if ds.labels is None:
        if labels == "true":
            raise ValueError(f"labels='true' but {ds.name!r} has no labels; use 'none', 'random' or 'unique'")
        if num_classes is not None and labels != "random":
            raise ValueError(f"num_classes={num_classes} selects classes, but {ds.name!r} has no labels")
        if size is not None:
            ds = first(ds, size)
    else:
        if num_classes is not None and labels in ("true", "none") and num_classes > ds.num_classes:
            raise ValueError(f"num_classes={num_classes} exceeds the {ds.num_classes} classes of {ds.name!r}")
        by_class_diversity = num_classes is not None and labels in ("true", "none") and num_classes < ds.num_classes
        if by_class_diversity:
            ds = first_classes(ds, size if size is not None else len(ds), num_classes)
        elif size is not None:
            ds = class_balanced(ds, size)

    if labels == "none":
        ds = no_labels(ds)
    elif labels == "random":
        classes = num_classes if num_classes is not None else ds.num_classes
        if classes < 1:
            raise ValueError(f"labels='random' on unlabelled {ds.name!r} needs num_classes")
        ds = random_labels(ds, classes, seed)
    elif labels == "unique":
        ds = unique_labels(ds)

    if resolution is not None:
        ds = resize(ds, resolution)
    return ds


__all__ = [
    "ACCEPTED_FORMS",
    "ImageDataset",
    "LABEL_MODES",
    "REFERENCE_SEED",
    "build",
    "class_balanced",
    "first",
    "first_classes",
    "load",
    "mix",
    "no_labels",
    "random_labels",
    "resize",
    "unique_labels",
]
