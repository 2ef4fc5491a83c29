"""diffmem.memorization.evaluate: the ratio criterion on exact distances."""
import numpy as np
import pytest
import torch
from helpers import brute_force_topk, shared_data

from diffmem import memorization


def test_quantize_matches_saved_pngs():
    img = torch.arange(256, dtype=torch.uint8)
    x = img.float() / 127.5 - 1  # how the data pipeline reads training images
    assert torch.equal(memorization.quantize(x), img)  # round trip is exact
    edge = torch.tensor([-2.0, -1.0, -0.9999, 0.0, 0.00393, 0.999, 1.0, 3.0])
    want = np.clip(127.5 * edge.double().numpy() + 128, 0, 255).astype(np.uint8)  # truncation
    assert memorization.quantize(edge).numpy().tolist() == want.tolist()
    assert memorization.quantize(img) is img


def test_ratio_and_fields_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (200, 3, 6, 6), dtype=torch.uint8, generator=gen)
    copies = train[:30].clone()
    copies[:, 0, 0, 0] ^= 1  # near-copies: memorized
    fresh = torch.randint(0, 256, (70, 3, 6, 6), dtype=torch.uint8, generator=gen)
    samples = torch.cat([copies, fresh])
    rep = memorization.evaluate(samples, train)
    ref_d, ref_i = brute_force_topk(samples, train, 2)
    ref_mem = (ref_d[:, 0].sqrt() / ref_d[:, 1].sqrt() < 1 / 3).numpy()
    assert np.array_equal(rep.memorized, ref_mem)
    assert rep.memorized[:30].all() and not rep.memorized[30:].any()
    assert rep.ratio == pytest.approx(30 / 100)
    assert np.array_equal(rep.nn_index, ref_i.numpy())
    np.testing.assert_allclose(rep.nn_dist, ref_d.sqrt().numpy(), rtol=1e-12)
    assert rep.knn_distance == pytest.approx(ref_d[:, 0].sqrt().mean().item() / np.sqrt(108))
    assert rep.n_samples == 100 and rep.n_train == 200 and rep.duplicate_groups == []
    assert rep.to_dict()["n_memorized"] == 30


def test_float_samples_are_quantized():
    gen = torch.Generator().manual_seed(1)
    train = torch.randint(0, 256, (50, 1, 4, 4), dtype=torch.uint8, generator=gen)
    samples = train[:5].float() / 127.5 - 1 + 1e-4  # generated exactly onto training images
    rep = memorization.evaluate(samples, train)
    assert rep.ratio == 1.0 and (rep.nn_dist[:, 0] == 0).all()
    assert rep.nn_index[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_threshold_is_strict_and_exact():
    """d1 / d2 exactly 1/3 is not memorized; a hair below is."""
    train = torch.zeros(2, 10, dtype=torch.uint8)
    train[1, 0] = 4  # sample 0 at distance 1 and 3
    samples = torch.zeros(2, 10, dtype=torch.uint8)
    samples[0, 0] = 1
    train = torch.cat([train, torch.full((1, 10), 200, dtype=torch.uint8)])
    rep = memorization.evaluate(samples, train)
    assert rep.nn_dist[0].tolist() == [1.0, 3.0]
    assert not rep.memorized[0]  # exactly 1/3
    assert rep.memorized[1]  # distance 0 to train[0]
    rep2 = memorization.evaluate(samples, train, threshold=0.34)
    assert rep2.memorized.all()


def test_duplicates_hide_copies_until_removed():
    gen = torch.Generator().manual_seed(2)
    train = torch.randint(0, 256, (40, 12), dtype=torch.uint8, generator=gen)
    train[17] = train[3]
    train[33] = train[3]
    train[25] = train[8]
    samples = train[[3, 8, 5]].clone()
    rep = memorization.evaluate(samples, train)
    assert [g.tolist() for g in rep.duplicate_groups] == [[3, 17, 33], [8, 25]]
    assert rep.memorized.tolist() == [False, False, True]  # d1 == d2 == 0 hides the copy
    assert rep.hidden_copies == 2 and not rep.duplicates_removed
    assert "hiding 2 copies" in rep.summary()
    dedup = memorization.evaluate(samples, train, remove_duplicates=True)
    assert dedup.memorized.all() and dedup.duplicates_removed and dedup.hidden_copies == 0
    assert dedup.n_train == 37
    assert dedup.nn_index[:, 0].tolist() == [3, 8, 5]  # indices into the training set as given


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(samples=np.zeros((3, 4), np.uint8), train=np.zeros((5, 5), np.uint8)), "image shapes differ"),
        (dict(samples=np.zeros((3, 4), np.uint8), train=np.zeros((1, 4), np.uint8)), "at least 2"),
        (dict(samples=np.zeros((0, 4), np.uint8), train=np.zeros((3, 4), np.uint8)), "samples is empty"),
        (dict(samples=np.zeros((3, 4), np.int32), train=np.zeros((3, 4), np.uint8)), "uint8 pixels or floats"),
        (dict(samples=np.full((3, 4), np.nan), train=np.zeros((3, 4), np.uint8)), "NaN"),
        (dict(samples=np.zeros((3, 4), np.uint8), train=np.zeros((3, 4), np.uint8), threshold=0), "threshold"),
        (dict(samples=np.zeros((3, 4), np.uint8), train=np.zeros((3, 4), np.uint8), remove_duplicates=True), "distinct"),
        (dict(samples=[1, 2], train=np.zeros((3, 4), np.uint8)), "tensor or numpy"),
    ],
)
def test_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        memorization.evaluate(**kwargs)


def test_cifar10_copies_are_found():
    """Real CIFAR-10: exact copies and lightly perturbed copies of training images are
    memorized; held-out test images are not."""
    train = np.load(shared_data("cifar10-train.npz"))["images"][:5000]
    test = np.load(shared_data("cifar10-test.npz"))["images"][:200]
    rng = np.random.default_rng(0)
    picks = rng.choice(len(train), 100, replace=False)
    noisy = np.clip(train[picks].astype(np.int16) + rng.integers(-2, 3, train[picks].shape), 0, 255).astype(np.uint8)
    samples = np.concatenate([train[picks], noisy, test])
    rep = memorization.evaluate(samples, train)
    assert rep.memorized[:200].all()
    assert rep.nn_index[:100, 0].tolist() == picks.tolist()
    assert rep.memorized[200:].mean() < 0.05
    ref_d, ref_i = brute_force_topk(torch.from_numpy(samples[::10]), torch.from_numpy(train), 2)
    assert np.array_equal(rep.nn_index[::10], ref_i.numpy())
