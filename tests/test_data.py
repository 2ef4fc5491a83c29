"""diffmem.data: loaders, the reference subset rules, and build()."""
import hashlib
import io
import json
import pickle
import random
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from helpers import shared_data

from diffmem import data
from diffmem.data import ImageDataset

# A 12-image, 3-class set whose pixels name the image: every pixel of image i is 10 * i.
# Labels in file order:          index: 0  1  2  3  4  5  6  7  8  9 10 11
SYNTH_LABELS = [2, 0, 1, 0, 2, 1, 0, 1, 2, 0, 1, 2]
# class 0 -> 1, 3, 6, 9;  class 1 -> 2, 5, 7, 10;  class 2 -> 0, 4, 8, 11


def synthetic(n=12, offset=0, labels=SYNTH_LABELS, num_classes=3, name="synth"):
    images = ((torch.arange(n) * 10 + offset) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).clone()
    lab = None if labels is None else torch.tensor(labels[:n])
    return ImageDataset(images, lab, num_classes if labels is not None else 0, name)


def picked(ds, offset=0):
    """Which synthetic images a subset holds, in order."""
    return ((ds.images[:, 0, 0, 0].long() - offset) // 10).tolist()


# ----------------------------------------------------------------------------------------
# ImageDataset


def test_dataset_fields_float_view_and_one_hot():
    ds = synthetic()
    assert len(ds) == 12 and ds.channels == 3 and ds.resolution == (4, 4) and ds.labelled
    every = torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1)
    x = ImageDataset(every).to_float()
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert x.flatten().tolist() == pytest.approx([v / 127.5 - 1 for v in range(256)], abs=1e-6)
    # the reference's quantization clip(127.5 y + 128), truncated, gives the pixels back
    assert np.array_equal(np.clip(127.5 * x.numpy() + 128, 0, 255).astype(np.uint8), every.numpy())
    oh = ds.one_hot()
    assert oh.dtype == torch.float32 and oh.shape == (12, 3)
    assert oh.argmax(1).tolist() == SYNTH_LABELS and oh.sum(1).eq(1).all()
    assert data.no_labels(ds).one_hot().shape == (12, 0)  # unconditional: label_dim 0


def test_dataset_rejects_bad_fields():
    img = torch.zeros(2, 1, 3, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(img.float())
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ImageDataset(img[0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ImageDataset(img, torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="shape"):
        ImageDataset(img, torch.tensor([0, 1, 1]), 2)
    with pytest.raises(ValueError, match="num_classes=0"):
        ImageDataset(img, None, 3)
    with pytest.raises(ValueError, match="num_classes >= 1"):
        ImageDataset(img, torch.tensor([0, 0]), 0)


# ----------------------------------------------------------------------------------------
# Bundled digits


def test_digits_bundled():
    ds = data.load("digits")
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and ds.num_classes == 10 and ds.name == "digits"
    counts = torch.bincount(ds.labels, minlength=10)
    assert counts.sum() == 1797 and counts.min() >= 174 and counts.max() <= 183
    assert ds.labels[:20].tolist() == list(range(10)) * 2  # sklearn's row order
    levels = sorted(set(ds.images.unique().tolist()))
    assert levels == [round(v * 255 / 16) for v in range(17)]  # 0..16 scaled to 0..255
    # Pins the shipped pixels to the copy extracted from scikit-learn 1.9.1.
    assert hashlib.sha256(ds.images.numpy().tobytes()).hexdigest() == (
        "b41ca9fd335466eee997366c2e6f6bbe0a1b4582afe091fc4eba35f4a254182f"
    )


# ----------------------------------------------------------------------------------------
# Subset rules on the synthetic set


def test_first():
    ds = data.first(synthetic(), 5)
    assert picked(ds) == [0, 1, 2, 3, 4] and ds.labels.tolist() == SYNTH_LABELS[:5] and ds.num_classes == 3


def test_class_balanced_exact_indices():
    ds = data.class_balanced(synthetic(), 6)
    assert picked(ds) == [1, 3, 2, 5, 0, 4]  # first 2 of class 0, of class 1, of class 2
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2] and ds.num_classes == 3
    full = data.class_balanced(synthetic(), 12)
    assert picked(full) == [1, 3, 6, 9, 2, 5, 7, 10, 0, 4, 8, 11]


def test_class_balanced_rejects_bad_sizes():
    with pytest.raises(ValueError, match="not a multiple of the number of classes"):
        data.class_balanced(synthetic(), 7)
    with pytest.raises(ValueError, match="at most 12 images are available"):
        data.class_balanced(synthetic(), 15)
    with pytest.raises(ValueError, match="no labels"):
        data.class_balanced(synthetic(labels=None), 3)


def test_first_classes_exact_indices():
    two = data.first_classes(synthetic(), 5, 2)
    assert picked(two) == [1, 3, 2, 5, 7]  # floor(5/2) = 2 of class 0, the rest (3) of class 1
    assert two.labels.tolist() == [0, 0, 1, 1, 1] and two.num_classes == 2
    three = data.first_classes(synthetic(), 7, 3)
    assert picked(three) == [1, 3, 2, 5, 0, 4, 8]
    one = data.first_classes(synthetic(), 4, 1)
    assert picked(one) == [1, 3, 6, 9] and one.num_classes == 1
    with pytest.raises(ValueError, match="needs 5 images of class 0, but only 4"):
        data.first_classes(synthetic(), 5, 1)
    with pytest.raises(ValueError, match="exceeds"):
        data.first_classes(synthetic(), 4, 4)


def test_random_labels_follow_python_random():
    ds = synthetic()
    got = data.random_labels(ds, 10)
    random.seed(1024)  # the reference: random.seed(1024), then random.randint(0, C - 1) per image
    want = [random.randint(0, 9) for _ in range(12)]
    assert got.labels.tolist() == want == [0, 7, 6, 5, 8, 1, 7, 8, 5, 5, 6, 1]
    assert got.num_classes == 10 and torch.equal(got.images, ds.images)
    assert torch.equal(data.random_labels(ds, 10).labels, got.labels)  # reproducible
    assert data.random_labels(ds, 3, seed=7).labels.tolist() == _stream(7, 3, 12)
    assert data.random_labels(synthetic(labels=None), 3).labelled  # unlabelled input is fine
    assert ds.labels.tolist() == SYNTH_LABELS  # the input is untouched


def _stream(seed, classes, n):
    draw = random.Random(seed)
    return [draw.randint(0, classes - 1) for _ in range(n)]


def test_unique_and_no_labels():
    ds = data.unique_labels(data.first(synthetic(), 5))
    assert ds.labels.tolist() == [0, 1, 2, 3, 4] and ds.num_classes == 5
    assert torch.equal(ds.one_hot(), torch.eye(5))
    bare = data.no_labels(synthetic())
    assert bare.labels is None and bare.num_classes == 0 and not bare.labelled


def test_mix_counts_and_labels():
    a = synthetic()
    b = synthetic(offset=5, labels=[1] * 12, num_classes=2)
    m = data.mix(a, b, 0.25, 8)  # round(8 * 0.75) = 6 from a, then 2 from b
    assert m.images[:, 0, 0, 0].tolist() == [0, 10, 20, 30, 40, 50, 5, 15]
    assert m.labels.tolist() == SYNTH_LABELS[:6] + [1, 1] and m.num_classes == 3
    assert picked(data.mix(a, b, 0.0, 4)) == [0, 1, 2, 3]
    assert len(data.mix(a, b, 1.0, 12)) == 12 and (data.mix(a, b, 1.0, 12).images[:, 0, 0, 0] % 10 == 5).all()
    assert data.mix(a, synthetic(labels=None), 0.5, 4).labels is None
    # the paper's intra-diversity grid: exact counts despite 1 - 0.8 < 0.2 in floats
    big_a = ImageDataset(torch.zeros(2000, 1, 1, 1, dtype=torch.uint8))
    big_b = ImageDataset(torch.ones(2000, 1, 1, 1, dtype=torch.uint8))
    for alpha, from_a in [(0.0, 2000), (0.2, 1600), (0.5, 1000), (0.8, 400), (1.0, 0)]:
        assert int((data.mix(big_a, big_b, alpha, 2000).images == 0).sum()) == from_a
    with pytest.raises(ValueError, match="only 12 are available"):
        data.mix(a, b, 0.0, 13)
    with pytest.raises(ValueError, match="alpha"):
        data.mix(a, b, 1.5, 4)


def test_resize_shape_dtype_constant_and_reference():
    ds = synthetic()
    small = data.resize(ds, 2)
    assert small.images.shape == (12, 3, 2, 2) and small.images.dtype == torch.uint8
    assert small.labels.tolist() == SYNTH_LABELS
    assert data.resize(ds, (8, 6)).images.shape == (12, 3, 8, 6)  # (height, width), upsampling
    # every constant image stays exactly constant, for 1, 2 (per channel) and 3 channels
    for channels in (1, 2, 3):
        const = ImageDataset(torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1).expand(256, channels, 8, 8).clone())
        for size in (4, 3, 16):
            out = data.resize(const, size).images
            assert torch.equal(out, torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1).expand_as(out))
    # antialiased: a 1-pixel checkerboard shrinks to mid-grey, not to 0 or 255
    board = ((torch.arange(8)[:, None] + torch.arange(8)[None]) % 2 * 255).to(torch.uint8)
    grey = data.resize(ImageDataset(board.view(1, 1, 8, 8)), 4).images[0, 0, 1:3, 1:3]
    assert (grey - 127.5).abs().max() < 20
    # identical to the reference dataset_tool: PIL LANCZOS on the HWC RGB image
    gen = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=gen)
    got = data.resize(ImageDataset(rgb), 8).images
    for i in range(3):
        ref = PIL.Image.fromarray(rgb[i].permute(1, 2, 0).numpy()).resize((8, 8), PIL.Image.Resampling.LANCZOS)
        assert np.array_equal(got[i].permute(1, 2, 0).numpy(), np.asarray(ref))
    with pytest.raises(ValueError, match="resolution"):
        data.resize(ds, 0)


# ----------------------------------------------------------------------------------------
# Loaders: round trips through files written here


def test_npz_layouts_round_trip(tmp_path):
    gen = np.random.default_rng(0)
    nchw = gen.integers(0, 256, (5, 3, 6, 6), dtype=np.uint8)
    labels = np.array([3, 0, 1, 3, 2])
    np.savez(tmp_path / "hwc.npz", images=nchw.transpose(0, 2, 3, 1), labels=labels)
    np.savez(tmp_path / "chw.npz", images=nchw)
    np.savez(tmp_path / "gray.npz", x_train=nchw[:, 0], y_train=labels.astype(np.uint8))
    hwc = data.load(tmp_path / "hwc.npz")
    assert torch.equal(hwc.images, torch.from_numpy(nchw)) and hwc.labels.tolist() == labels.tolist()
    assert hwc.num_classes == 4 and hwc.name == "hwc"
    chw = data.load(str(tmp_path / "chw.npz"))
    assert torch.equal(chw.images, torch.from_numpy(nchw)) and chw.labels is None
    gray = data.load(tmp_path / "gray.npz")
    assert gray.images.shape == (5, 1, 6, 6) and torch.equal(gray.images[:, 0], torch.from_numpy(nchw[:, 0]))
    assert gray.labels.dtype == torch.int64
    np.savez(tmp_path / "float.npz", images=nchw.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        data.load(tmp_path / "float.npz")
    np.savez(tmp_path / "nokey.npz", a=nchw, b=labels)
    with pytest.raises(ValueError, match="no image array"):
        data.load(tmp_path / "nokey.npz")


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(array).save(buf, format="png")
    return buf.getvalue()


def test_image_folder_round_trip(tmp_path):
    gen = np.random.default_rng(1)
    pics = gen.integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
    # class folders sort to cat=0, dog=1; files sort by relative path
    layout = {"dog/a.png": pics[0], "cat/b.png": pics[1], "cat/a.png": pics[2], "dog/c.PNG": pics[3]}
    for rel, pic in layout.items():
        (tmp_path / "classes" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "classes" / rel).write_bytes(_png(pic))
    ds = data.load(tmp_path / "classes")
    order = ["cat/a.png", "cat/b.png", "dog/a.png", "dog/c.PNG"]
    assert torch.equal(ds.images, torch.from_numpy(np.stack([layout[r] for r in order])).permute(0, 3, 1, 2))
    assert ds.labels.tolist() == [0, 0, 1, 1] and ds.num_classes == 2

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in (2, 0, 1):
        (flat / f"img{i}.png").write_bytes(_png(pics[i, :, :, 0]))  # grayscale
    ds = data.load(flat)
    assert ds.labels is None and ds.images.shape == (3, 1, 5, 5)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(pics[:3, :, :, 0]))

    (flat / "odd.png").write_bytes(_png(pics[0, :4, :, 0]))
    with pytest.raises(ValueError, match="share one shape"):
        data.load(flat)


def _edm_zip(path, images, labels, shuffle=True):
    """An archive as the reference dataset_tool writes it: 00000/img00000000.png ...,
    uncompressed PNGs, dataset.json with [name, label] pairs (or null)."""
    names = [f"{i // 1000:05d}/img{i:08d}.png" for i in range(len(images))]
    order = list(range(len(images)))
    if shuffle:
        random.Random(0).shuffle(order)  # storage order must not matter
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for i in order:
            z.writestr(names[i], _png(images[i]))
        meta = None if labels is None else [[n, int(l)] for n, l in zip(names, labels)]
        z.writestr("dataset.json", json.dumps({"labels": meta}))


def test_edm_zip_round_trip(tmp_path):
    gen = np.random.default_rng(2)
    pics = gen.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    labels = [5, 0, 9, 9, 1, 0, 3]
    _edm_zip(tmp_path / "set.zip", pics, labels)
    ds = data.load(tmp_path / "set.zip")
    assert torch.equal(ds.images, torch.from_numpy(pics).permute(0, 3, 1, 2))
    assert ds.labels.tolist() == labels and ds.num_classes == 10 and ds.name == "set"

    _edm_zip(tmp_path / "gray.zip", pics[:, :, :, 1], None)
    gray = data.load(tmp_path / "gray.zip")
    assert gray.labels is None and torch.equal(gray.images[:, 0], torch.from_numpy(pics[:, :, :, 1]))

    # build() on the zip: class_balanced over 10 classes needs classes it lacks
    with pytest.raises(ValueError, match="class 2 has only 0"):
        data.build(tmp_path / "set.zip", size=10)
    assert data.build(tmp_path / "gray.zip", size=3, labels="unique").labels.tolist() == [0, 1, 2]


def test_cifar10_torchvision_root(tmp_path, monkeypatch):
    tv_cifar = pytest.importorskip("torchvision.datasets.cifar")
    with pytest.raises(ValueError, match="download=True"):
        data.load("cifar10", root=tmp_path)  # nothing there, and no download attempted
    # A miniature root in torchvision's own format (checksums bypassed: the files are fake)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    gen = np.random.default_rng(3)
    rows = gen.integers(0, 256, (10, 3 * 32 * 32), dtype=np.uint8)
    for b in range(5):
        batch = {"data": rows[2 * b : 2 * b + 2], "labels": [b, 9 - b]}
        (folder / f"data_batch_{b + 1}").write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    for ds in (data.load("cifar10", root=tmp_path), data.load(f"cifar10:{tmp_path}")):
        assert torch.equal(ds.images, torch.from_numpy(rows.reshape(10, 3, 32, 32)))
        assert ds.labels.tolist() == [0, 9, 1, 8, 2, 7, 3, 6, 4, 5] and ds.num_classes == 10


# ----------------------------------------------------------------------------------------
# build()


def test_build_order_and_rules(tmp_path):
    pics = np.repeat((np.arange(12) * 10).astype(np.uint8)[:, None, None, None], 3, axis=1).repeat(4, 2).repeat(4, 3)
    np.savez(tmp_path / "s.npz", images=pics, labels=np.array(SYNTH_LABELS))
    spec = tmp_path / "s.npz"
    ds = data.build(spec, 6)
    assert picked(ds) == [1, 3, 2, 5, 0, 4] and ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    div = data.build(spec, 5, labels="true", num_classes=2)
    assert picked(div) == [1, 3, 2, 5, 7] and div.num_classes == 2
    assert picked(data.build(spec, 5, labels="none", num_classes=2)) == [1, 3, 2, 5, 7]
    rnd = data.build(spec, 6, labels="random", num_classes=10)
    assert picked(rnd) == [1, 3, 2, 5, 0, 4] and rnd.labels.tolist() == _stream(1024, 10, 6)
    assert data.build(spec, 6, labels="random", num_classes=10, seed=5).labels.tolist() == _stream(5, 10, 6)
    uniq = data.build(spec, 3, labels="unique")
    assert picked(uniq) == [1, 2, 0] and uniq.num_classes == 3
    small = data.build(spec, 6, labels="none", resolution=2)
    assert small.images.shape == (6, 3, 2, 2) and small.labels is None
    assert picked(small) == [1, 3, 2, 5, 0, 4]  # constant images survive the resize
    assert len(data.build(spec)) == 12 and data.build("digits", 20, resolution=4).images.shape == (20, 1, 4, 4)


def test_build_rejects_bad_requests(tmp_path):
    np.savez(tmp_path / "bare.npz", images=np.zeros((4, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="needs 2000 images of class 0, but only 178"):
        data.build("digits", 2000, num_classes=1)
    with pytest.raises(ValueError, match="at most 1740 images are available"):
        data.build("digits", 1750)  # class 8 has 174 images
    with pytest.raises(ValueError, match="not a multiple"):
        data.build("digits", 105)
    with pytest.raises(ValueError, match="has no labels"):
        data.build(tmp_path / "bare.npz", 2, labels="true")
    with pytest.raises(ValueError, match="only 4 images"):
        data.build(tmp_path / "bare.npz", 5, labels="none")
    with pytest.raises(ValueError, match="labels must be one of"):
        data.build("digits", 10, labels="yes")
    with pytest.raises(ValueError, match="exceeds"):
        data.build("digits", 10, num_classes=11)


# ----------------------------------------------------------------------------------------
# Bad specs


def test_bad_specs(tmp_path):
    with pytest.raises(ValueError, match=r"'imagenet'.*Accepted forms") as err:
        data.load("imagenet")
    assert "digits" in str(err.value) and ".zip" in str(err.value)
    with pytest.raises(ValueError, match="no such file"):
        data.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="no such .npz"):
        data.load(f"cifar10:{tmp_path / 'missing.npz'}")
    with pytest.raises(ValueError, match="needs a location"):
        data.load("cifar10")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        data.load(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="root= is only used"):
        data.load("digits", root=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        data.load(tmp_path / "empty")


# ----------------------------------------------------------------------------------------
# Real data in ../shared/data (skipped in a fresh checkout)


@pytest.fixture(scope="module")
def cifar_train():
    path = shared_data("cifar10-train.npz")
    with np.load(path) as raw:
        return path, raw["images"], raw["labels"]


def test_cifar10_npz(cifar_train):
    path, raw_images, raw_labels = cifar_train
    ds = data.load(f"cifar10:{path}")
    assert ds.images.shape == (50000, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.num_classes == 10 and ds.name == "cifar10"
    assert ds.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # data_batch_1 starts so
    assert torch.equal(ds.images[123].permute(1, 2, 0), torch.from_numpy(raw_images[123]))

    sub = data.class_balanced(ds, 1000)
    assert torch.bincount(sub.labels).tolist() == [100] * 10
    want = np.concatenate([np.flatnonzero(raw_labels == c)[:100] for c in range(10)])
    assert torch.equal(sub.images, torch.from_numpy(raw_images[want]).permute(0, 3, 1, 2))
    assert sub.labels.tolist() == raw_labels[want].tolist() == sorted(raw_labels[want].tolist())


def test_mnist_npz():
    ds = data.load(shared_data("mnist.npz"))
    assert ds.images.shape == (60000, 1, 28, 28) and ds.num_classes == 10
    assert data.class_balanced(ds, 100).images.shape == (100, 1, 28, 28)
