"""bench/carry_data.py: a dataset cut into parts comes back identical, and only when whole."""
import shutil

import numpy as np
import pytest

import bench.carry_data as carry


def _archive(tmp_path, rows=11):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (rows, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, rows).astype(np.int64)
    path = tmp_path / "data.npz"
    np.savez(path, images=images, labels=labels)
    return path, images, labels


def _deliver(parts, carried, cache, which):
    """One device call: only part `which` is in the carried folder."""
    shutil.rmtree(carried, ignore_errors=True)
    carried.mkdir()
    shutil.copy2(parts[which], carried / parts[which].name)
    return carry.gather(carried, cache)


def test_split_then_gather_part_by_part_restores_the_arrays(tmp_path):
    source, images, labels = _archive(tmp_path)
    parts = carry.split(source, 3, tmp_path / "parts")
    assert [p.name for p in parts] == [f"data.part{i}of3.npz" for i in (1, 2, 3)]
    carried, cache = tmp_path / "carried", tmp_path / "cache"
    assert _deliver(parts, carried, cache, 2) == []
    assert _deliver(parts, carried, cache, 0) == []
    assert not (cache / "data.npz").exists()
    joined = _deliver(parts, carried, cache, 1)
    assert joined == [cache / "data.npz"]
    with np.load(joined[0]) as out:
        assert sorted(out.files) == ["images", "labels"]
        np.testing.assert_array_equal(out["images"], images)
        np.testing.assert_array_equal(out["labels"], labels)
    assert _deliver(parts, carried, cache, 1) == [cache / "data.npz"]  # already joined: kept


def test_a_corrupt_part_is_refused_and_nothing_is_written(tmp_path):
    source, _, _ = _archive(tmp_path)
    parts = carry.split(source, 2, tmp_path / "parts")
    with np.load(parts[1]) as archive:
        payload = {k: archive[k] for k in archive.files}
    payload["images"][0, 0, 0, 0] ^= 1
    np.savez(parts[1], **payload)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="does not match the digest"):
        carry.gather(tmp_path / "parts", cache)
    assert sorted(p.name for p in cache.iterdir()) == ["data.part1of2.npz", "data.part2of2.npz"]


def test_bad_arguments_exit_with_a_message(tmp_path, capsys):
    source, _, _ = _archive(tmp_path, rows=3)
    assert carry.main(["split", str(source), "--parts", "4", "--out", str(tmp_path)]) == 2
    assert "--parts must be between 1 and the number of rows (3)" in capsys.readouterr().err
    assert carry.main(["split", str(tmp_path / "missing.npz"), "--parts", "2"]) == 2
    assert "no such file" in capsys.readouterr().err
    np.savez(tmp_path / "ragged.npz", a=np.zeros(3), b=np.zeros(4))
    assert carry.main(["split", str(tmp_path / "ragged.npz"), "--parts", "2", "--out", str(tmp_path)]) == 2
    assert "same number of rows" in capsys.readouterr().err


def test_head_keeps_the_first_rows_of_every_array(tmp_path, capsys):
    source, images, labels = _archive(tmp_path)
    out = tmp_path / "carry" / "head.npz"
    assert carry.main(["head", str(source), "--rows", "4", "--out", str(out)]) == 0
    with np.load(out) as archive:
        np.testing.assert_array_equal(archive["images"], images[:4])
        np.testing.assert_array_equal(archive["labels"], labels[:4])
    assert carry.main(["head", str(source), "--rows", "12", "--out", str(out)]) == 2
    assert "--rows must be between 1 and the number of rows (11)" in capsys.readouterr().err
