"""Sweeps: spec expansion and validation, execution in processes, resume after a kill,
Slurm-style entries with aggregation, and the `diffmem` command's errors."""
import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from diffmem.emm import parse_spec
from diffmem.emm.execute import parse_slots

REPO = pathlib.Path(__file__).resolve().parents[1]

# A network small enough that a run (import, training, sampling, scoring) takes seconds.
TINY_BASE = dict(data="digits", subset="first", num_channels=8, channel_mult=[1, 2], num_blocks=1,
                 attn_resolutions=[], dropout=0.0, batch=16, lr=1e-3, duration="30steps", snapshots="1",
                 samples=24, sample_batch=24, steps=3, grid_rows=2, device="cpu", threads=1, progress=False)


def _diffmem(args, timeout=300, **kwargs):
    return subprocess.run([sys.executable, "-m", "diffmem.cli.main", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def _write_spec(path, **values):
    path.write_text(json.dumps(dict(base=TINY_BASE, **values)))
    return path


# ----------------------------------------------------------------------------------------
# Spec expansion and validation (no training)

def test_grid_expands_to_the_product_in_written_order():
    spec = parse_spec(dict(base=TINY_BASE, sizes=[8, 4], grid=dict(
        num_channels=[8, 16], batch=[{"batch": 16, "lr": 1e-3}, {"batch": 32, "lr": 2e-3}],
        labels=["none", "unique"])))
    assert spec.sizes == (4, 8)
    assert len(spec.entries) == 8
    assert [e.index for e in spec.entries] == list(range(8))
    first, last = spec.entries[0], spec.entries[-1]
    assert first.factors == {"num_channels": 8, "batch": {"batch": 16, "lr": 1e-3}, "labels": "none"}
    assert last.options == {"num_channels": 16, "batch": 32, "lr": 2e-3, "labels": "unique"}
    assert last.label == "num_channels=16, batch=batch=32,lr=0.002, labels=unique"
    # The last factor varies fastest.
    assert [e.factors["labels"] for e in spec.entries[:2]] == ["none", "unique"]
    config = spec.config(last, 8, "out")
    assert (config.size, config.batch, config.lr, config.label_mode, config.num_channels) == (8, 32, 2e-3, "unique", 16)


def test_run_directories_are_deterministic_and_distinct():
    spec = parse_spec(dict(base=TINY_BASE, sizes=[4, 8], grid=dict(num_channels=[8, 16])))
    again = parse_spec(dict(base=TINY_BASE, sizes=[4, 8], grid=dict(num_channels=[8, 16])))
    names = {spec.config(e, s, "out").run_name() for e in spec.entries for s in spec.sizes}
    assert len(names) == 4
    assert names == {again.config(e, s, "out").run_name() for e in again.entries for s in again.sizes}


def test_no_grid_is_one_entry_and_presets_expand():
    spec = parse_spec(dict(base=dict(preset="emm-digits"), search=dict(min=8, max=64)))
    assert len(spec.entries) == 1 and spec.entries[0].label == "base"
    config = spec.config(spec.entries[0], 16, "out")
    assert (config.size, config.num_channels, config.duration) == (16, 16, "1500steps")


@pytest.mark.parametrize("values, message", [
    (dict(sizes=[4], search=dict(min=2, max=8)), "exactly one"),
    (dict(), "exactly one"),
    (dict(sizes=[4], colour="red"), "unknown key"),
    (dict(sizes=[4], grid=dict(size=[4, 8])), "cannot be swept"),
    (dict(sizes=[4], grid=dict(lr=[])), "non-empty list"),
    (dict(sizes=[4], grid=dict(lr=[1e-3, 1e-3])), "twice"),
    (dict(sizes=[4], grid=dict(num_channels=[2])), "entry 0"),
    (dict(sizes=[4], grid=dict(learning_rate=[1e-3])), "learning_rate"),
    (dict(sizes=[4], grid=dict(status=["a"])), "cannot be named"),
    (dict(sizes=[1, 4]), "at least 2"),
    (dict(sizes=[4.5]), "whole numbers"),
    (dict(search=dict(min=8, max=4)), "above"),
    (dict(search=dict(min=8)), "min, max"),
    (dict(sizes=[4], eps=1.5), "eps"),
    (dict(sizes=[4], metric="mean"), "metric"),
    (dict(sizes=[4], bootstrap=-1), "bootstrap"),
    (dict(sizes=[4], base_extra=1), "unknown key"),
])
def test_bad_specs(values, message):
    values = dict(values)
    base = dict(TINY_BASE)
    if values.pop("base_extra", None):
        values["extra"] = 1
    with pytest.raises(ValueError, match=message):
        parse_spec(dict(base=base, **values))


def test_bad_base_options():
    with pytest.raises(ValueError, match="set by the sweep"):
        parse_spec(dict(base=dict(TINY_BASE, size=8), sizes=[4]))
    with pytest.raises(ValueError, match="unknown preset"):
        parse_spec(dict(base=dict(preset="nope"), sizes=[4]))
    with pytest.raises(ValueError, match="samples"):
        parse_spec(dict(base=dict(TINY_BASE, samples=0), sizes=[4]))


def test_slots(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [s.name for s in parse_slots("cpu", jobs=3)] == ["cpu#0", "cpu#1", "cpu#2"]
    gpus = parse_slots("0,2")
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in gpus] == ["0", "2"] and gpus[0].device == "cuda"
    shared = parse_slots("0,1", jobs=2)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in shared] == ["0", "1", "0", "1"] and len({s.name for s in shared}) == 4
    ddp = parse_slots("0,1,2,3", torchrun=True)
    assert len(ddp) == 1 and ddp[0].nproc == 4 and ddp[0].env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    for devices, jobs, torchrun, message in [("gpu0", 1, False, "distinct GPU numbers"), ("0,0", 1, False, "distinct"),
                                             ("cpu", 0, False, "--jobs"), ("cpu", 1, True, "--torchrun"),
                                             ("0,1", 2, True, "--jobs must be 1")]:
        with pytest.raises(ValueError, match=message):
            parse_slots(devices, jobs, torchrun)
    # Under Slurm the GPU numbers are those this process sees.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in parse_slots("1,0")] == ["5", "3"]
    assert parse_slots("0,1", torchrun=True)[0].env["CUDA_VISIBLE_DEVICES"] == "3,5"
    with pytest.raises(ValueError, match="only 2 GPU"):
        parse_slots("2")


# ----------------------------------------------------------------------------------------
# Execution

def _mtimes(run_dir: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}


def test_sweep_runs_resumes_after_a_kill_and_redoes_nothing(tmp_path):
    spec_file = _write_spec(tmp_path / "spec.json", name="kill", sizes=[4, 6, 8], grid=dict(num_channels=[8]))
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "diffmem.cli.main", "sweep", spec_file, "--outdir", out, "--jobs", "1"]
    process = subprocess.Popen(list(map(str, args)), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    # Wait for the first run to finish, then kill the sweep while the second trains.
    for line in process.stdout:
        lines.append(line)
        if "ratio" in line and "|D|=4" in line:
            break
    else:
        pytest.fail("the sweep ended before its first run finished:\n" + "".join(lines))
    while not list((out / "runs").glob("digits-6-*")):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=120)
    first_output = "".join(lines) + rest
    assert process.returncode == 130, first_output
    assert "rerun the same command to resume" in first_output

    summary = json.loads((out / "summary.json").read_text())
    done = [r for r in summary["entries"][0]["runs"] if r["status"] == "done"]
    assert [r["size"] for r in done][:1] == [4]
    finished_dirs = {r["size"]: out / r["run_dir"] for r in done}
    before = {size: _mtimes(d) for size, d in finished_dirs.items()}

    second = _diffmem(["sweep", spec_file, "--outdir", out, "--jobs", "1"])
    assert second.returncode == 0, second.stdout + second.stderr
    for size in finished_dirs:
        assert f"|D|={size}: finished earlier" in second.stdout
        assert _mtimes(finished_dirs[size]) == before[size], f"run |D|={size} was touched on resume"
    trained_again = 3 - len(finished_dirs)
    assert f"trained {trained_again} run(s) this time, reused {len(finished_dirs)}" in second.stdout

    summary = json.loads((out / "summary.json").read_text())
    entry = summary["entries"][0]
    assert entry["status"] == "done"
    assert [r["size"] for r in entry["runs"]] == [4, 6, 8]
    for run in entry["runs"]:
        results = json.loads((out / run["run_dir"] / "results.json").read_text())
        assert results["complete"] and run["ratio"] == results["memorization_ratio"]
    assert entry["emm"]["sizes"] == [4, 6, 8]
    with open(out / "curves.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(r["size"]) for r in rows] == [4, 6, 8]
    assert "| 0 | 8 |" in (out / "emm.md").read_text()

    # Nothing left to do: a third invocation trains nothing.
    third = _diffmem(["sweep", spec_file, "--outdir", out])
    assert third.returncode == 0 and "trained 0 run(s) this time, reused 3" in third.stdout


def test_emm_search_and_slurm_style_entries(tmp_path):
    # The adaptive search on a real (tiny) model: whatever the ratios, it must end with a
    # consistent summary whose runs are exactly the sizes it trained.
    out = tmp_path / "emm"
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_BASE))
    # Flags override the file, as in diffmem-train.
    result = _diffmem(["emm", "--config", config, "--lr", "2e-3", "--min", "2", "--max", "16", "--tolerance", "0.5",
                       "--jobs", "2", "--outdir", out])
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    entry = summary["entries"][0]
    sizes = [r["size"] for r in entry["runs"]]
    assert sizes[0] == 2 and sizes[-1] == 16 and entry["status"] == "done"
    assert len(list((out / "runs").iterdir())) == len(sizes)
    saved = json.loads((out / "runs" / pathlib.Path(entry["runs"][0]["run_dir"]).name / "config.json").read_text())
    assert saved["config"]["lr"] == 2e-3 and saved["config"]["num_channels"] == 8
    emm = entry["emm"]
    if emm["bracketed"]:
        assert emm["upper"] - emm["lower"] <= 1 or emm["upper"] / emm["lower"] <= 1.5
        assert emm["lower"] <= emm["value"] <= emm["upper"]

    # One entry per process (as Slurm array tasks would), then aggregation.
    spec_file = _write_spec(tmp_path / "spec.json", name="array", sizes=[3, 5], grid=dict(lr=[1e-3, 2e-3]))
    sweep_dir = tmp_path / "array"
    listing = _diffmem(["sweep", spec_file, "--outdir", sweep_dir, "--list"])
    assert listing.returncode == 0 and "2 entries (Slurm: --array=0-1)" in listing.stdout
    for index in (1, 0):
        task = _diffmem(["sweep", spec_file, "--outdir", sweep_dir, "--entry", index])
        assert task.returncode == 0, task.stdout + task.stderr
    aggregate = _diffmem(["sweep", spec_file, "--outdir", sweep_dir, "--aggregate"])
    assert aggregate.returncode == 0, aggregate.stderr
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert [e["status"] for e in summary["entries"]] == ["done", "done"]
    assert [[r["size"] for r in e["runs"]] for e in summary["entries"]] == [[3, 5], [3, 5]]
    assert len(list((sweep_dir / "runs").iterdir())) == 4


def test_failed_run_is_reported_and_the_exit_status_says_so(tmp_path):
    # |D| = 5000 is more than the 1,797 digits: that run fails with diffmem-train's message.
    spec_file = _write_spec(tmp_path / "spec.json", sizes=[3, 5000])
    result = _diffmem(["sweep", spec_file, "--outdir", tmp_path / "out"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED" in result.stdout and "5000" in result.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    runs = {r["size"]: r for r in summary["entries"][0]["runs"]}
    assert runs[3]["status"] == "done" and runs[5000]["status"] == "failed" and "5000" in runs[5000]["error"]
    assert summary["entries"][0]["status"] == "failed"


@pytest.mark.parametrize("args, message", [
    (["sweep", "{missing}", "--outdir", "{tmp}/o"], "cannot read"),
    (["sweep", "{spec}", "--outdir", "{tmp}/o", "--entry", "7"], "--entry 7"),
    (["sweep", "{spec}", "--outdir", "{tmp}/o", "--devices", "gpu"], "--devices"),
    (["sweep", "{spec}", "--outdir", "{tmp}/file"], "not a directory"),
    (["emm", "--data", "digits", "--min", "8", "--max", "4", "--outdir", "{tmp}/o"], "above"),
    (["emm", "--data", "digits", "--min", "8", "--max", "16", "--lr", "-1", "--outdir", "{tmp}/o"], "--lr"),
    (["report", "{tmp}"], "{tmp}"),
])
def test_command_errors_are_one_line(tmp_path, args, message):
    spec = _write_spec(tmp_path / "spec.json", sizes=[4])
    (tmp_path / "file").write_text("x")
    subs = dict(tmp=str(tmp_path), spec=str(spec), missing=str(tmp_path / "nope.yaml"))
    result = _diffmem([a.format(**subs) for a in args], timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffmem: error: ") and message.format(**subs) in lines[0], lines


def test_train_subcommand_is_diffmem_train():
    result = _diffmem(["train", "--help"], timeout=60)
    assert result.returncode == 0 and "--num-channels" in result.stdout
