"""Tests of the diffmem-train command line, run as a user would: `python -m
diffmem.cli.train` in a subprocess from the repository root (so the in-tree package is
used). Bad input must end with one `diffmem-train: error: ...` line and no traceback."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# A network small enough that a training step takes milliseconds on one CPU thread.
TINY = ["--data", "digits", "--size", "20", "--subset", "first", "--num-channels", "8", "--channel-mult", "1,2",
        "--num-blocks", "1", "--attn-resolutions", "none", "--dropout", "0", "--batch", "20", "--lr", "1e-3",
        "--device", "cpu", "--threads", "1", "--progress", "0"]


def _command(args):
    return [sys.executable, "-m", "diffmem.cli.train", *map(str, args)]


def _run(args, timeout=120):
    return subprocess.run(_command(args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _bad_inputs(tmp):
    """name -> (arguments, text the error line must contain)."""
    not_a_dir = tmp / "a_file"
    not_a_dir.write_text("x")
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("data: [digits\nlr: 1e-3\n")
    unknown_key = tmp / "unknown.json"
    unknown_key.write_text(json.dumps({"data": "digits", "learning_rate": 1e-3}))
    not_mapping = tmp / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    out = ["--outdir", tmp / "runs"]
    return {
        # The inputs the command must refuse, each in its own process as a user meets them.
        "unknown dataset": (["--data", "no_such_dataset", *out], "cannot load dataset"),
        "|D| too large": ([*TINY, "--size", "5000", *out], "5000"),
        "skip mask length": ([*TINY, "--skip-connections", "1,0,1", *out], "expected"),
        "unwritable outdir": ([*TINY, "--outdir", not_a_dir / "sub"], "a_file"),
        "bad YAML": (["--config", bad_yaml, *out], "not valid YAML"),
        "negative lr": ([*TINY, "--lr", "-1", *out], "--lr"),
        "bad duration unit": ([*TINY, "--duration", "10parsecs", *out], "--duration"),
        # More invalid values, checked in this process through main(argv): the same code
        # path without paying for a torch import per case.
        "|D| not class-balanced": ([*TINY, "--subset", "balanced", "--size", "64", *out],
                                   "multiple of the number of classes"),
        "skip mask values": ([*TINY, "--skip-connections", "1,2,1,1", *out], "0 or 1"),
        "missing config file": (["--config", tmp / "nope.yaml", *out], "cannot read config file"),
        "unknown config key": (["--config", unknown_key, *out], "learning_rate"),
        "config not a mapping": (["--config", not_mapping, *out], "mapping"),
        "lr not a number": ([*TINY, "--lr", "fast", *out], "--lr"),
        "zero batch": ([*TINY, "--batch", "0", *out], "--batch"),
        "batch-gpu does not divide": ([*TINY, "--batch-gpu", "3", *out], "--batch-gpu"),
        "bad labels": ([*TINY, "--labels", "sometimes", *out], "--labels"),
        "cond contradicts labels": ([*TINY, "--cond", "1", "--labels", "none", *out], "--cond"),
        "ema beta out of range": ([*TINY, "--ema", "beta:2", *out], "--ema"),
        "zero snapshots": ([*TINY, "--snapshots", "0", *out], "--snapshots"),
        "resolution vs levels": ([*TINY, "--channel-mult", "1,1,1,1,1", *out], "divisible"),
        "group norm width": ([*TINY, "--num-channels", "6", *out], "GroupNorm"),
        "no data": ([*out], "--data is required"),
        "resume without checkpoint": ([*TINY, "--resume", *out], "nothing to resume"),
        "resume unknown dir": (["--resume", tmp / "nowhere"], "config.json"),
    }


SUBPROCESS_CASES = ["unknown dataset", "|D| too large", "skip mask length", "unwritable outdir", "bad YAML",
                    "negative lr", "bad duration unit"]
IN_PROCESS_CASES = ["|D| not class-balanced", "skip mask values", "missing config file", "unknown config key",
                    "config not a mapping", "lr not a number", "zero batch", "batch-gpu does not divide",
                    "bad labels", "cond contradicts labels", "ema beta out of range", "zero snapshots",
                    "resolution vs levels", "group norm width", "no data", "resume without checkpoint",
                    "resume unknown dir"]


def _check_error(returncode, stdout, stderr, expected):
    lines = stderr.strip().splitlines()
    assert returncode not in (0, None), stdout + stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("diffmem-train: error: "), stderr
    assert expected in lines[0], lines[0]


@pytest.fixture(scope="module")
def subprocess_results(tmp_path_factory):
    """The subprocess cases, two processes at a time (each pays for importing torch)."""
    tmp = tmp_path_factory.mktemp("bad")
    cases = _bad_inputs(tmp)
    assert sorted(cases) == sorted(SUBPROCESS_CASES + IN_PROCESS_CASES)
    results, pending, running = {}, list(SUBPROCESS_CASES), []
    while pending or running:
        while pending and len(running) < 2:
            name = pending.pop(0)
            running.append((name, subprocess.Popen(_command(cases[name][0]), cwd=REPO, stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE, text=True)))
        name, proc = running.pop(0)
        stdout, stderr = proc.communicate(timeout=120)
        results[name] = (proc.returncode, stdout, stderr, cases[name][1])
    return results


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_exits_with_one_line(subprocess_results, case):
    _check_error(*subprocess_results[case])


@pytest.mark.parametrize("case", IN_PROCESS_CASES)
def test_bad_value_exits_with_one_line_in_process(tmp_path, capsys, case):
    import torch

    from diffmem.cli.train import main

    threads = torch.get_num_threads()
    args, expected = _bad_inputs(tmp_path)[case]
    try:
        returncode = main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    _check_error(returncode, captured.out, captured.err, expected)


def test_argparse_errors_are_short():
    result = _run(["--no-such-flag"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unrecognized arguments" in result.stderr


def test_config_file_and_flags_layer(tmp_path):
    from diffmem.training.config import PRESETS

    preset = PRESETS["quickstart"]
    config = tmp_path / "run.yaml"
    config.write_text("preset: quickstart\nlr: 0.0005\nbatch: 32\nnum-blocks: 1\nchannel_mult: 1,2\n"
                      "skip-connections: [1, 1, 0, 1]\n")
    result = _run(["--config", config, "--batch", "16", "--outdir", tmp_path, "--dry-run"])
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["config"]["lr"] == 0.0005  # file over preset
    assert info["config"]["batch"] == 16  # flag over file
    assert info["config"]["num_channels"] == preset["num_channels"]  # preset over defaults
    assert info["config"]["skip_connections"] == [1, 1, 0, 1]
    prefix = f"digits-{preset['size']}-uncond-ddpmpp-{preset['precond']}-c{preset['num_channels']}-b16-"
    assert info["run_dir"].startswith(str(tmp_path / prefix))
    assert info["dataset"]["size"] == preset["size"] and not (tmp_path / info["run_dir"]).exists()


def test_attention_resolutions_no_level_has_are_noted(tmp_path):
    """8x8 digits with channel_mult 1,2: levels 8 and 4. Attention at 16 (EDM's CIFAR-10
    default) would silently add nothing; the command says so on stderr (stdout stays the
    dry run's JSON), and says nothing where every resolution is a level."""
    for attn, note in (("16,4", "--attn-resolutions 16 matches no level of this U-Net at 8x8 (levels 8,4)"),
                       ("4", None)):
        result = _run([*TINY, "--attn-resolutions", attn, "--outdir", tmp_path, "--dry-run"])
        assert result.returncode == 0, result.stderr
        json.loads(result.stdout)
        if note:
            assert note in result.stderr, result.stderr
        else:
            assert "attn-resolutions" not in result.stderr, result.stderr


def test_end_to_end_run_writes_every_file(tmp_path):
    args = [*TINY, "--duration", "110steps", "--snapshots", "2", "--samples", "16", "--sample-batch", "16",
            "--steps", "4", "--outdir", tmp_path / "runs"]
    result = _run(args)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("digits-20-uncond-ddpmpp-vp-c8-b20-")
    names = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")}
    assert {"config.json", "log.jsonl", "checkpoint.pt", "results.json", "snapshots/snapshot-000001.pt",
            "snapshots/snapshot-000002.pt", "nn-grid-000001.png", "nn-grid-000002.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]

    results = json.loads((run_dir / "results.json").read_text())
    assert [s["snapshot"] for s in results["snapshots"]] == ["snapshot-000001.pt", "snapshot-000002.pt"]
    assert results["memorization_ratio"] == max(s["ratio"] for s in results["snapshots"])
    assert results["final"]["snapshot"] == "snapshot-000002.pt"
    assert results["evaluation"]["num_samples"] == 16 and results["evaluation"]["seeds"] == "0-15"
    assert results["verdict"] in ("memorized", "not memorized")
    assert results["complete"] is True
    from diffmem.training.evaluate import unpack_flags

    for entry in results["snapshots"]:  # per-sample flags, for bootstrapped EMM intervals
        flags = unpack_flags(entry["memorized_bits"], entry["n_samples"])
        assert flags.shape == (16,) and int(flags.sum()) == entry["n_memorized"]
    assert "memorization ratio" in result.stdout and "max over 2 snapshots" in result.stdout
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert log[-1]["nimg"] == 2200 and all({"kimg", "loss", "lr", "img_per_s", "time"} <= set(r) for r in log)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["size"] == 20 and config["parameters"] > 0

    from PIL import Image

    with Image.open(run_dir / "nn-grid-000002.png") as grid:
        assert grid.width > 3 * 64 and grid.height > 16 * 64

    again = _run(args)  # the directory holds a run: refused without --resume
    assert again.returncode == 1 and "--resume" in again.stderr and "Traceback" not in again.stderr
    resumed = _run([*args, "--resume"])  # finished: evaluation only, reusing results
    assert resumed.returncode == 0, resumed.stderr
    assert "training already complete" in resumed.stdout
    assert json.loads((run_dir / "results.json").read_text())["snapshots"] == results["snapshots"]


def test_sigint_saves_checkpoint_and_resume_finishes(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "--duration", "400steps", "--tick", "10steps", "--eval", "none", "--outdir", run_dir, "--nosubdir"]
    proc = subprocess.Popen(_command(args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run_dir / "log.jsonl"
    deadline = time.time() + 60
    while not (log.exists() and log.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, stdout + stderr
    assert "Traceback" not in stderr and "interrupted by SIGINT" in stderr and "--resume" in stderr

    import torch

    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert not state["done"] and 0 < state["step"] < 400

    resumed = _run(["--resume", run_dir])  # the run's saved config is reused
    assert resumed.returncode == 0, resumed.stderr
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["done"] and state["step"] == 400
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 400
