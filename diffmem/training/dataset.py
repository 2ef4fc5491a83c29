"""The training set a TrainingConfig describes, cut by diffmem.data's reference rules."""
from __future__ import annotations

from .. import data
from ..data import ImageDataset
from .config import TrainingConfig


def build_dataset(config: TrainingConfig) -> ImageDataset:
    """The training set D that `config` describes (diffmem.data rules, in the reference's order)."""
    if config.subset == "first":
        return _first_subset(config)
    return data.build(config.data, size=config.size, labels=config.label_mode, num_classes=config.num_classes,
                      resolution=config.resolution, root=config.data_root)


def _first_subset(config: TrainingConfig) -> ImageDataset:
    """The first |D| images in file order, then labels and resizing as data.build does:
    for subsets that the class-balanced rule cannot cut (e.g. 64 of 10 classes)."""
    if config.num_classes is not None and config.label_mode in ("true", "none"):
        raise ValueError("--subset first takes the first images of every class; --num-classes only applies "
                         "to --labels random with it")
    root = {"root": config.data_root} if config.data_root is not None else {}
    ds = data.load(config.data, **root)
    if config.size is not None:
        ds = data.first(ds, config.size)
    mode = config.label_mode
    if mode == "true" and ds.labels is None:
        raise ValueError(f"--labels true but {ds.name!r} has no labels")
    if mode == "none":
        ds = data.no_labels(ds)
    elif mode == "random":
        classes = config.num_classes if config.num_classes is not None else ds.num_classes
        if classes < 1:
            raise ValueError(f"--labels random on unlabelled {ds.name!r} needs --num-classes")
        ds = data.random_labels(ds, classes)
    elif mode == "unique":
        ds = data.unique_labels(ds)
    if config.resolution is not None:
        ds = data.resize(ds, config.resolution)
    return ds
