"""load(spec): read a training set from any of the forms the experiments use.

Accepted specs (see ACCEPTED_FORMS):
  digits          the 1,797 8x8 handwritten digits shipped inside the package
  cifar10         CIFAR-10 train split; root= is a torchvision root or a .npz file
  cifar10:PATH    the same with the location in the spec
  PATH.npz        uint8 images (+ optional labels) in a numpy archive
  PATH.zip        an EDM / DiffMemorize dataset zip (PNGs + dataset.json)
  DIRECTORY       a folder of images; labels from dataset.json or class subfolders

Image order is always the order the reference tools use (file order for arrays, sorted
file names for folders and zips), because the subset rules take "the first k images".
Nothing is ever downloaded unless download=True is passed for torchvision's CIFAR-10.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import zipfile
from importlib import resources

import numpy as np
import torch

from .dataset import ImageDataset

ACCEPTED_FORMS = (
    "'digits' (the bundled 8x8 handwritten digits)",
    "'cifar10' with root= a torchvision CIFAR-10 root directory or a .npz file",
    "'cifar10:PATH' where PATH is a torchvision CIFAR-10 root directory or a .npz file",
    "'PATH.npz' holding uint8 images under 'images' or 'x_train' "
    "(labels optional, under 'labels' or 'y_train')",
    "'PATH.zip', an EDM/DiffMemorize dataset zip (images + dataset.json)",
    "'DIRECTORY' of PNG/JPEG images (labels from dataset.json or from class subfolders)",
)

CIFAR10_CLASSES = 10
DIGITS_CLASSES = 10
_CIFAR10_PREFIX = "cifar10:"


def _unknown(spec: str, why: str) -> ValueError:
    forms = "\n  ".join(ACCEPTED_FORMS)
    return ValueError(f"cannot load dataset {spec!r}: {why}. Accepted forms:\n  {forms}")


def load(spec: str | os.PathLike, *, root: str | os.PathLike | None = None, download: bool = False) -> ImageDataset:
    """Reads a training set in full. See the module docstring for the accepted specs.

    ``root`` is only meaningful for 'cifar10'; ``download=True`` lets torchvision fetch
    CIFAR-10 into a root directory (never done otherwise). A file literally named
    'digits' or 'cifar10' can be loaded as './digits'.
    """
    spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise ValueError(f"dataset spec must be a string or path, got {type(spec).__name__}")

    if spec == "cifar10" or spec.startswith(_CIFAR10_PREFIX):
        location = spec[len(_CIFAR10_PREFIX):] if spec != "cifar10" else None
        if location is not None and root is not None:
            raise ValueError(f"dataset {spec!r} names its location; do not also pass root={root!r}")
        location = location if location is not None else root
        if location is None or os.fspath(location) == "":
            raise _unknown(spec, "CIFAR-10 needs a location: root= or 'cifar10:PATH'")
        return _load_cifar10(pathlib.Path(location), download=download)

    if root is not None:
        raise ValueError(f"root= is only used by 'cifar10'; got root={os.fspath(root)!r} for {spec!r}")
    if download:
        raise ValueError(f"download=True is only supported for 'cifar10', not {spec!r}")
    if spec == "digits":
        return _load_digits()

    path = pathlib.Path(spec)
    if path.is_dir():
        return _load_image_folder(path)
    if not path.exists():
        raise _unknown(spec, "not a known dataset name and no such file or directory")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _load_npz(path, name=path.stem)
    if suffix == ".zip":
        return _load_edm_zip(path)
    raise _unknown(spec, f"unsupported file type {suffix or '(no extension)'!r}")


# ---------------------------------------------------------------------------------------
# Bundled digits


def _load_digits() -> ImageDataset:
    # importlib.resources works for wheels, editable installs and zipped packages alike.
    with resources.files(__package__).joinpath("digits.npz").open("rb") as file:
        with np.load(file) as archive:
            images, labels = archive["images"], archive["labels"]
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), DIGITS_CLASSES, "digits")


# ---------------------------------------------------------------------------------------
# CIFAR-10


def _load_cifar10(location: pathlib.Path, *, download: bool) -> ImageDataset:
    if location.suffix.lower() == ".npz":
        if download:
            raise ValueError(f"download=True needs a torchvision root directory, not the file {str(location)!r}")
        if not location.is_file():
            raise _unknown(f"cifar10:{location}", "no such .npz file")
        ds = _load_npz(location, name="cifar10")
        if ds.labels is None:
            raise ValueError(f"CIFAR-10 file {str(location)!r} has no labels")
        return ds.replace(num_classes=CIFAR10_CLASSES)

    try:
        import torchvision  # optional: only this source needs it
    except ImportError as err:
        raise ImportError("loading CIFAR-10 from a torchvision root needs torchvision") from err
    try:
        cifar = torchvision.datasets.CIFAR10(str(location), train=True, download=download)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        hint = "" if download else " (pass download=True to let torchvision fetch it)"
        raise ValueError(f"no CIFAR-10 training set under {str(location)!r}: {err}{hint}") from err
    images = torch.from_numpy(np.ascontiguousarray(cifar.data.transpose(0, 3, 1, 2)))  # HWC -> CHW
    labels = torch.as_tensor(cifar.targets, dtype=torch.int64)
    return ImageDataset(images, labels, CIFAR10_CLASSES, "cifar10")


# ---------------------------------------------------------------------------------------
# numpy archives

_IMAGE_KEYS = ("images", "x_train")
_LABEL_KEYS = ("labels", "y_train")
_CHANNEL_COUNTS = (1, 3, 4)


def _to_nchw(images: np.ndarray, where: str) -> np.ndarray:
    """(N,H,W) -> (N,1,H,W); (N,H,W,C) and (N,C,H,W) told apart by where a plausible
    channel count (1, 3, 4) sits. When both ends could be channels, the reading that
    leaves a square image wins; a full tie ((N,3,3,3)) reads as NHWC, the layout of
    numpy image archives (Keras, ../shared/data)."""
    if images.ndim == 3:
        return images[:, None]
    if images.ndim != 4:
        raise ValueError(f"{where}: images must be (N,H,W), (N,H,W,C) or (N,C,H,W), got shape {images.shape}")
    _, a, b, c = images.shape
    last_is_channel, first_is_channel = c in _CHANNEL_COUNTS, a in _CHANNEL_COUNTS
    if last_is_channel and first_is_channel:
        last_is_channel = a == b or b != c
    if last_is_channel:
        return images.transpose(0, 3, 1, 2)
    if first_is_channel:
        return images
    raise ValueError(
        f"{where}: cannot find the channel axis in shape {images.shape}; "
        f"expected 1, 3 or 4 channels first (N,C,H,W) or last (N,H,W,C)"
    )


def _as_uint8(images: np.ndarray, where: str) -> np.ndarray:
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.integer) and images.size and images.min() >= 0 and images.max() <= 255:
        return images.astype(np.uint8)
    raise ValueError(
        f"{where}: images must be uint8 pixels in 0..255, got dtype {images.dtype}"
        + (" (float data is ambiguous: convert it to uint8 yourself)" if np.issubdtype(images.dtype, np.floating) else "")
    )


def _class_labels(labels, count: int, where: str) -> tuple[torch.Tensor, int]:
    """Integer class labels -> (int64 tensor, num_classes = max + 1, the reference's label_dim)."""
    labels = np.asarray(labels)
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{where}: labels must be {count} integer class indices, got dtype {labels.dtype} shape {labels.shape}"
        )
    if count and labels.min() < 0:
        raise ValueError(f"{where}: labels must be non-negative class indices, got {labels.min()}")
    labels = torch.from_numpy(labels.astype(np.int64))
    return labels, (int(labels.max()) + 1 if count else 1)


def _load_npz(path: pathlib.Path, *, name: str) -> ImageDataset:
    where = str(path)
    with np.load(path, allow_pickle=False) as archive:
        keys = list(archive.keys())
        image_key = next((k for k in _IMAGE_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
        if image_key is None:
            raise ValueError(f"{where}: no image array; expected a key in {_IMAGE_KEYS}, found {keys}")
        images = archive[image_key]
        label_key = next((k for k in _LABEL_KEYS if k in keys), None)
        labels = archive[label_key] if label_key is not None else None
    images = np.ascontiguousarray(_to_nchw(_as_uint8(images, where), where))
    if labels is None:
        return ImageDataset(torch.from_numpy(images), None, 0, name)
    labels, num_classes = _class_labels(labels, images.shape[0], where)
    return ImageDataset(torch.from_numpy(images), labels, num_classes, name)


# ---------------------------------------------------------------------------------------
# Image files: folders and EDM zips


def _image_suffixes() -> set[str]:
    import PIL.Image

    PIL.Image.init()  # registers every plugin, as the reference tools do
    return {ext.lower() for ext in PIL.Image.registered_extensions()}


def _decode(data: bytes, where: str) -> np.ndarray:
    """One image file -> uint8 (C, H, W). Grayscale stays one channel; palette and alpha
    images become RGB (alpha is dropped: the models see colour only)."""
    import PIL.Image

    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError) as err:
        raise ValueError(f"{where}: not a readable image ({err})") from err
    if image.mode in ("1", "LA"):
        image = image.convert("L")
    elif image.mode in ("P", "PA", "RGBA", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    if image.mode not in ("L", "RGB"):
        raise ValueError(f"{where}: image mode {image.mode!r} is not 8-bit grayscale or RGB")
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _stack(pixels: list[np.ndarray], names: list[str], where: str) -> torch.Tensor:
    first = pixels[0].shape
    for array, fname in zip(pixels, names):
        if array.shape != first:
            raise ValueError(
                f"{where}: all images must share one shape (C, H, W); {names[0]} is {first} "
                f"but {fname} is {array.shape}"
            )
    return torch.from_numpy(np.stack(pixels))


def _labels_from_json(metadata: bytes, names: list[str], where: str):
    """The reference dataset.json: {"labels": [[fname, label], ...]} or {"labels": null}."""
    try:
        entries = json.loads(metadata).get("labels")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{where}: dataset.json is not a JSON object with a 'labels' entry") from err
    if entries is None:
        return None
    try:
        table = {str(fname).replace("\\", "/"): label for fname, label in entries}
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: dataset.json 'labels' must be a list of [file name, label] pairs") from err
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"{where}: dataset.json has no label for {missing[0]} ({len(missing)} images unlabelled)")
    return [table[n] for n in names]


def _build(pixels, names, labels, where: str, name: str) -> ImageDataset:
    images = _stack(pixels, names, where)
    if labels is None:
        return ImageDataset(images, None, 0, name)
    labels, num_classes = _class_labels(labels, len(names), where)
    return ImageDataset(images, labels, num_classes, name)


def _load_edm_zip(path: pathlib.Path) -> ImageDataset:
    where = str(path)
    suffixes = _image_suffixes()
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{where}: not a zip file") from err
    with archive:
        all_names = archive.namelist()
        # Sorted names: the reference's order, and dataset_tool's img00000000.png... index order.
        names = sorted(n for n in all_names if pathlib.PurePosixPath(n).suffix.lower() in suffixes)
        if not names:
            raise ValueError(f"{where}: the zip holds no images")
        labels = None
        if "dataset.json" in all_names:
            labels = _labels_from_json(archive.read("dataset.json"), names, where)
        pixels = [_decode(archive.read(n), f"{where}:{n}") for n in names]
    return _build(pixels, names, labels, where, path.stem)


def _load_image_folder(path: pathlib.Path) -> ImageDataset:
    """Every image under ``path`` (recursively), sorted by relative path. Labels, as in the
    reference dataset_tool: dataset.json when it lists labels; otherwise the sorted top-level
    folder names give class indices when there is more than one of them (images directly
    in ``path`` then form the class '' which sorts first); otherwise unlabelled."""
    where = str(path)
    suffixes = _image_suffixes()
    files = [f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in suffixes]
    names = sorted(f.relative_to(path).as_posix() for f in files)
    if not names:
        raise ValueError(f"{where}: the folder holds no images")
    metadata = path / "dataset.json"
    labels = _labels_from_json(metadata.read_bytes(), names, where) if metadata.is_file() else None
    if labels is None:
        top = [n.split("/")[0] if "/" in n else "" for n in names]
        classes = {folder: index for index, folder in enumerate(sorted(set(top)))}
        labels = [classes[t] for t in top] if len(classes) > 1 else None
    pixels = [_decode((path / n).read_bytes(), f"{where}/{n}") for n in names]
    return _build(pixels, names, labels, where, path.name)
