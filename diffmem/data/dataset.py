"""ImageDataset: a training set held in memory as uint8 pixels plus optional class labels."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images and labels of one training set, in a fixed order.

    images: uint8 (N, C, H, W). Pixels stay uint8 because that is how the reference
        pipeline stores training sets (PNGs in a zip) and how memorization distances are
        measured; ``to_float`` gives the network's [-1, 1] view.
    labels: int64 (N,) with values in [0, num_classes), or None for an unlabelled set.
    num_classes: size of the one-hot conditioning vector; 0 exactly when unlabelled.
        It may exceed max(labels) + 1 (a subset need not contain every class).
    name: where the data came from and which rules were applied, for logs.

    Frozen, so the subset rules can share tensors between datasets without one rule's
    output changing under another's feet. numpy arrays are accepted and converted.
    """

    images: torch.Tensor
    labels: torch.Tensor | None = None
    num_classes: int = 0
    name: str = ""

    def __post_init__(self):
        images = torch.as_tensor(self.images)
        if images.dtype != torch.uint8:
            # No silent conversion: a float array could be in [0, 1], [0, 255] or [-1, 1].
            raise ValueError(f"ImageDataset images must be uint8, got {images.dtype}")
        if images.dim() != 4:
            raise ValueError(
                f"ImageDataset images must have shape (N, C, H, W), got {tuple(images.shape)}"
            )
        object.__setattr__(self, "images", images)

        num_classes = int(self.num_classes)
        object.__setattr__(self, "num_classes", num_classes)
        if self.labels is None:
            if num_classes != 0:
                raise ValueError(f"an unlabelled ImageDataset must have num_classes=0, got {num_classes}")
            return

        labels = torch.as_tensor(self.labels)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"ImageDataset labels must be integers, got {labels.dtype}")
        labels = labels.to(torch.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"ImageDataset labels must have shape ({images.shape[0]},) to match the images, "
                f"got {tuple(labels.shape)}"
            )
        if num_classes < 1:
            raise ValueError(f"a labelled ImageDataset needs num_classes >= 1, got {num_classes}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"ImageDataset labels must lie in [0, {num_classes - 1}], "
                f"got values in [{int(labels.min())}, {int(labels.max())}]"
            )
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"ImageDataset(name={self.name!r}, images={n}x{c}x{h}x{w} uint8, num_classes={self.num_classes})"

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def resolution(self) -> tuple[int, int]:
        """(height, width)."""
        return tuple(self.images.shape[2:])

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def to_float(self) -> torch.Tensor:
        """float32 images in [-1, 1] as the reference trainer feeds them: img / 127.5 - 1.
        A sample quantized back with clip(127.5 * y + 128) gives exactly the uint8 image."""
        return self.images.to(torch.float32) / 127.5 - 1

    def one_hot(self) -> torch.Tensor:
        """float32 (N, num_classes) one-hot class vectors, the conditioning input of a
        class-conditional model. Unlabelled sets give (N, 0), matching the reference
        trainer's label_dim = 0 for unconditional data. Memory is N * num_classes * 4
        bytes, which for unique labels (num_classes = N) grows as N^2."""
        if self.labels is None:
            return torch.zeros(len(self), 0, dtype=torch.float32)
        return torch.nn.functional.one_hot(self.labels, self.num_classes).to(torch.float32)

    def select(self, indices, *, name: str | None = None) -> "ImageDataset":
        """The images (and labels) at ``indices``, in that order."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return dataclasses.replace(
            self,
            images=self.images[indices],
            labels=None if self.labels is None else self.labels[indices],
            name=self.name if name is None else name,
        )

    def replace(self, **changes) -> "ImageDataset":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
