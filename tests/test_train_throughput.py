"""bench/train_throughput.py end to end at a tiny size on the CPU: a record with every
variant asked for, ratios against fp32 eager computed from the measured times, and with
--profile one profiled step per variant."""
import json

import pytest

from bench import train_throughput

TINY = ["--device", "cpu", "--threads", "1", "--channels", "8", "--blocks", "1", "--resolution", "8",
        "--batch", "2", "--warmup", "1", "--steps", "2"]


def test_record_ratios_and_profile(tmp_path):
    out = tmp_path / "train.json"
    train_throughput.main([*TINY, "--variants", "fp32_eager,bf16_autocast", "--profile", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["complete"] is True and record["reduced_size"] is True
    runs = record["variants"]
    assert set(runs) == {"fp32_eager", "bf16_autocast"}
    for name, r in runs.items():
        assert r["loss_finite"] and len(r["step_times_s"]) == 2
        assert r["images_per_s"] == pytest.approx(2 / r["median_step_s"])
        assert r["speedup_vs_fp32_eager"] == pytest.approx(r["images_per_s"] / runs["fp32_eager"]["images_per_s"])
        p = r["profile"]
        assert p["device"] == "cpu" and p["self_us_by_category"]["gemm"] > 0, p  # convolutions and matmuls
    assert record["target"]["pass"] is None  # the 2.5x target is judged on CUDA runs only
    train_throughput.main([*TINY, "--variants", "fp32_eager", "--out", str(out)])
    assert "profile" not in json.loads(out.read_text())["variants"]["fp32_eager"]
