"""`diffmem sample` end to end on the bundled digits, and the 2-D study's core functions."""
import json
import pathlib
import subprocess
import sys

import pytest
import torch

from diffmem.cli import sample
from diffmem.training.evaluate import unpack_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--data", "digits", "--size", "20", "--subset", "first", "--samples", "50", "--steps", "6", "--threads", "1"]


def run_sample(outdir, *extra):
    return sample.main([*TINY, "--outdir", str(outdir), *extra])


def results(outdir) -> dict:
    return json.loads((pathlib.Path(outdir) / "results.json").read_text())


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("optimal")
    assert run_sample(outdir) == 0
    return outdir


def test_writes_run_files_in_the_trained_format(plain_run):
    assert sorted(p.name for p in plain_run.iterdir()) == ["config.json", "nn-grid-optimal.png", "results.json"]
    r = results(plain_run)
    assert r["complete"] is True and r["model"] == "optimal"
    (entry,) = r["snapshots"]
    assert entry["snapshot"] == "optimal" and entry["n_samples"] == 50
    assert r["max"]["ratio"] == r["final"]["ratio"] == entry["ratio"]
    flags = unpack_flags(entry["memorized_bits"], 50)
    assert flags.sum() == entry["n_memorized"]
    assert r["regularization"] == dict(tikhonov=None, truncate=None, truncate_convention=None, topk=None)
    assert json.loads((plain_run / "config.json").read_text())["config"]["size"] == 20
    assert not list(plain_run.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_plain_optimum_memorizes_every_sample(plain_run):
    # 20 well-separated digits: every sample lands on a training image (d1 = 0).
    entry = results(plain_run)["snapshots"][0]
    assert entry["ratio"] >= 0.98
    assert entry["knn_distance"] < 0.5


def test_report_reads_the_run(plain_run):
    from diffmem.emm import report

    text = report.write_report(plain_run).read_text()
    assert "closed-form optimal denoiser" in text and "1.0000" in text
    assert "Training loss" not in text  # nothing was trained


def test_large_tikhonov_does_not_memorize(tmp_path, plain_run):
    assert run_sample(tmp_path, "--tikhonov", "1") == 0
    r = results(tmp_path)
    assert r["regularization"]["tikhonov"] == 1.0
    assert r["snapshots"][0]["ratio"] < 0.5 < results(plain_run)["snapshots"][0]["ratio"]
    assert r["verdict"] == "not memorized"


def test_conditional_optimum_memorizes(tmp_path):
    # Unique labels: each seed draws one training image and the optimum returns it.
    assert run_sample(tmp_path, "--labels", "unique", "--topk", "3") == 0
    assert results(tmp_path)["snapshots"][0]["ratio"] >= 0.98


@pytest.mark.parametrize("extra, message", [
    (["--tikhonov", "-1"], "--tikhonov"),
    (["--truncate", "0"], "--truncate"),
    (["--topk", "21"], "--topk"),
    (["--sigma-min", "-0.1"], "--sigma-min"),
    (["--size", "5000"], "larger than the dataset"),
    (["--labels", "random", "--num-classes", "50"], "no training image"),
])
def test_bad_input_is_one_line_and_exit_1(tmp_path, capsys, extra, message):
    assert run_sample(tmp_path / "out", *extra) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffmem sample: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_unknown_dataset_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffmem.cli.sample", "--data", "no-such-data", "--samples", "5",
                           "--outdir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("diffmem sample: error: cannot load dataset") and proc.stderr.count("\n") == 1


# ---- the 2-D study (bench/optimal_2d.py) --------------------------------------------------

@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(ROOT))
    import bench.optimal_2d as study

    return study


def test_2d_fraction_near_training_falls_with_tikhonov(study):
    torch.set_num_threads(1)
    points = study.gaussian_points()
    fractions = [study.fraction_near(study.sample_points(points, 200, tikhonov=c), points)
                 for c in (1e-5, 1e-4, 1e-3, 1e-2)]
    assert study.falls_from_one_to_zero(fractions)["holds"], fractions
    assert study.fraction_near(study.sample_points(points, 200), points) == 1.0


def test_2d_fraction_falls_with_kernel_truncation(study):
    torch.set_num_threads(1)
    points = study.gaussian_points()
    fractions = [study.fraction_near(study.sample_points(points, 200, truncate=tau), points) for tau in (1e-2, 10.0)]
    assert fractions[0] >= 0.9 and fractions[1] <= 0.1, fractions


def test_falls_check_can_fail(study):
    assert not study.falls_from_one_to_zero([1.0, 0.5, 0.6, 0.0])["holds"]
    assert not study.falls_from_one_to_zero([0.8, 0.5, 0.0])["holds"]
    assert not study.falls_from_one_to_zero([1.0, 0.5, 0.2])["holds"]
    assert study.falls_from_one_to_zero([0.99, 0.4, 0.05, 0.0])["holds"]


# ---- compute precision (--precision) ------------------------------------------------------


def test_precision_defaults_to_float64_and_is_recorded(plain_run):
    r = results(plain_run)
    assert r["precision"] == "float64"
    assert r["snapshots"][0]["settings"]["precision"] == "float64"
    assert r["evaluation"]["precision"] == "float64"
    config = json.loads((plain_run / "config.json").read_text())
    assert config["precision"] == "float64" and config["config"]["precision"] == "float64"


def test_float32_precision_samples_the_same_copies(tmp_path, plain_run):
    # float32 (the native CPU op's float32 path) must not change a memorization verdict.
    assert run_sample(tmp_path, "--precision", "float32") == 0
    r, plain = results(tmp_path), results(plain_run)
    assert r["precision"] == "float32" and r["snapshots"][0]["settings"]["precision"] == "float32"
    assert json.loads((tmp_path / "config.json").read_text())["config"]["precision"] == "float32"
    entry, plain_entry = r["snapshots"][0], plain["snapshots"][0]
    assert entry["ratio"] == plain_entry["ratio"] and entry["memorized_bits"] == plain_entry["memorized_bits"]
    assert entry["knn_distance"] == pytest.approx(plain_entry["knn_distance"], rel=1e-3, abs=1e-4)


def test_precision_reaches_the_denoiser(monkeypatch):
    from diffmem.data import ImageDataset  # noqa: F401  (the dataset type optimal_denoiser reads)

    class Data:
        images = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8)
        labels, num_classes = None, 0

        def __len__(self):
            return 6

    options = dict(tikhonov=None, truncate=None, truncate_convention=None, topk=None)
    for precision, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        den = sample.optimal_denoiser(Data(), options, False, 0.002, 80.0, "cpu", precision=precision)
        assert den.dtype == dtype and den.to("cpu").dtype == dtype
    assert sample.optimal_denoiser(Data(), options, False, 0.002, 80.0, "cpu").dtype == torch.float64
    with pytest.raises(ValueError, match="--precision"):
        sample.optimal_denoiser(Data(), options, False, 0.002, 80.0, "cpu", precision="float16")


def test_bad_precision_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_sample(tmp_path / "out", "--precision", "float16")
    assert exc.value.code == 2 and "--precision" in capsys.readouterr().err


def test_tikhonov_experiment_script_runs(tmp_path):
    """bench/optimal_memorization.py drives this CLI's parser: a tiny run end to end."""
    sys.path.insert(0, str(ROOT))
    from bench import optimal_memorization

    out = tmp_path / "record.json"
    code = optimal_memorization.main(["--data", "digits", "--size", "20", "--samples", "20", "--steps", "4",
                                      "--tikhonov", "0,1", "--held-out", "", "--workdir", str(tmp_path / "runs"),
                                      "--precision", "float32", "--json", str(out)])
    assert code in (0, None)
    record = json.loads(out.read_text())
    assert record["precision"] == "float32"
    config = json.loads((tmp_path / "runs" / "tikhonov-0" / "config.json").read_text())
    assert config["precision"] == "float32"  # reached the sampling run
    assert record["plain_memorizes"]["holds"] and record["plain_memorizes"]["ratio"] >= 0.99
