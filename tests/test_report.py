"""`diffmem report`: Markdown reports with figures of a real tiny run and of synthetic sweeps
built from copies of it; bad input; atomic writes."""
import json
import pathlib
import re
import shutil
import subprocess
import sys
import urllib.parse

import pytest

pytest.importorskip("matplotlib")

from PIL import Image  # noqa: E402

from diffmem.emm.estimate import estimate  # noqa: E402
from diffmem.emm.report import FIGURES_DIR, write_report  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]

# A network small enough that training, sampling and scoring take a few seconds; 100 steps
# of batch 20 = 2 kimg, so the two snapshots get distinct names (they are named by kimg).
TINY_RUN_ARGS = ["--data", "digits", "--size", "20", "--subset", "first", "--num-channels", "8",
                 "--channel-mult", "1,2", "--num-blocks", "1", "--attn-resolutions", "none", "--dropout", "0",
                 "--batch", "20", "--lr", "1e-3", "--device", "cpu", "--threads", "1", "--progress", "0",
                 "--duration", "100steps", "--snapshots", "2", "--samples", "50", "--sample-batch", "50",
                 "--steps", "4", "--grid-rows", "4", "--nosubdir", "1"]
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real diffmem-train run directory (two evaluated snapshots, their grids, a log)."""
    run_dir = tmp_path_factory.mktemp("tiny-run") / "run"
    done = subprocess.run([sys.executable, "-m", "diffmem.cli.train", *TINY_RUN_ARGS, "--outdir", str(run_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (run_dir / "results.json").is_file()
    # Only what a report reads; the checkpoint and snapshots would slow every copy down.
    (run_dir / "checkpoint.pt").unlink()
    shutil.rmtree(run_dir / "snapshots")
    return run_dir


def _copy_run(run_dir, target):
    shutil.copytree(run_dir, target)
    return target


def _read_results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def _set_ratios(run_dir, ratios):
    """Rewrite a run's results.json with these per-snapshot ratios (one per snapshot kept,
    the others dropped), updating the max, the final and the verdict as the training would."""
    results = _read_results(run_dir)
    snapshots = results["snapshots"][-len(ratios):]
    for snapshot, ratio in zip(snapshots, ratios):
        snapshot["ratio"] = ratio
        snapshot["n_memorized"] = round(ratio * snapshot["n_samples"])
    best = max(snapshots, key=lambda s: (s["ratio"], s["nimg"]))
    final = snapshots[-1]
    results.update(snapshots=snapshots, memorization_ratio=best["ratio"],
                   max=dict(ratio=best["ratio"], snapshot=best["snapshot"], kimg=best["kimg"]),
                   final=dict(ratio=final["ratio"], snapshot=final["snapshot"], kimg=final["kimg"]),
                   verdict="memorized" if best["ratio"] >= 0.9 else "not memorized")
    (run_dir / "results.json").write_text(json.dumps(results))
    return results


def _linked_images(report):
    """The files report.md's image links point to, resolved from its folder."""
    text = report.read_text()
    return [report.parent / urllib.parse.unquote(target) for target in IMAGE_LINK.findall(text)]


def _assert_valid_pngs(paths):
    assert paths
    for path in paths:
        assert path.is_file(), f"missing {path}"
        with Image.open(path) as image:
            assert image.format == "PNG"
            image.verify()


def _no_temporary_files(*folders):
    leftovers = [p for folder in folders for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def _table_row(text, first_cell):
    """The cells of the Markdown table row whose first cell is `first_cell`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r}")


# ----------------------------------------------------------------------------------------
# Run reports


def test_run_report_from_a_real_run(tiny_run, tmp_path):
    import matplotlib.pyplot as plt

    run_dir = _copy_run(tiny_run, tmp_path / "run")
    results = _read_results(run_dir)
    report = write_report(run_dir)

    assert report == run_dir / "report.md"
    text = report.read_text()
    assert f"{results['memorization_ratio']:.4f}" in text
    assert results["verdict"] in text
    assert results["dataset"]["name"] in text
    for snapshot in results["snapshots"]:
        cells = _table_row(text, snapshot["snapshot"])
        assert cells[3] == f"{snapshot['ratio']:.4f}"
        assert cells[4] == f"{snapshot['n_memorized']}/{snapshot['n_samples']}"
    links = _linked_images(report)
    _assert_valid_pngs(links)
    figures = sorted((run_dir / FIGURES_DIR).glob("*.png"))
    assert len(figures) == 2 and set(figures) <= set(links)
    best_grid = next(s["grid"] for s in results["snapshots"] if s["snapshot"] == results["max"]["snapshot"])
    assert run_dir / best_grid in links
    assert plt.get_fignums() == []  # every figure closed
    _no_temporary_files(run_dir, run_dir / FIGURES_DIR)


def test_run_report_shows_the_best_and_the_final_grid_and_the_verdict_at_eps(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path / "run")
    results = _set_ratios(run_dir, [0.96, 0.82])
    text = write_report(run_dir).read_text()
    assert "**0.9600**" in text and "final 0.8200" in text
    assert "**memorized**" in text
    grids = [run_dir / s["grid"] for s in results["snapshots"]]
    assert set(grids) <= set(_linked_images(run_dir / "report.md"))

    text = write_report(run_dir, eps=0.01).read_text()
    assert "**not memorized**" in text and ">= 0.99" in text


def test_run_report_elsewhere_links_relative_to_it(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path / "run")
    out = tmp_path / "notes" / "deep" / "run.md"
    out.parent.mkdir(parents=True)
    report = write_report(run_dir, out)
    assert report == out and not (run_dir / "report.md").exists()
    links = IMAGE_LINK.findall(out.read_text())
    assert any(link.startswith("../../run/nn-grid-") for link in links)
    _assert_valid_pngs(_linked_images(out))
    assert (out.parent / FIGURES_DIR / "loss.png").is_file()


def test_run_without_results_and_with_a_cut_log(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path / "run")
    (run_dir / "results.json").unlink()
    with open(run_dir / "log.jsonl", "a") as log:
        log.write('{"step": 99, "nimg": 1')  # a crash mid-line
    text = write_report(run_dir).read_text()
    assert "results.json is missing" in text
    assert "## Snapshots" not in text
    _assert_valid_pngs(_linked_images(run_dir / "report.md"))
    assert [p.name for p in (run_dir / FIGURES_DIR).iterdir()] == ["loss.png"]


# ----------------------------------------------------------------------------------------
# Sweep reports


def _run_record(sweep_dir, tiny_run, name, size, ratios):
    """A finished run of a sweep: a copy of the tiny run with these snapshot ratios."""
    run_dir = _copy_run(tiny_run, sweep_dir / "runs" / name)
    results = _set_ratios(run_dir, ratios)
    ratio = results["max"]["ratio"]
    return dict(size=size, ratio=ratio, max_ratio=ratio, final_ratio=results["final"]["ratio"],
                n_samples=results["snapshots"][-1]["n_samples"], run_dir=f"runs/{name}", status="done")


def _entry(index, factors, runs, status="done", ci=None):
    done = [r for r in runs if r["status"] == "done"]
    emm = None
    if done:
        emm = estimate([r["size"] for r in done], [r["ratio"] for r in done]).to_dict()
        if ci is not None:
            emm.update(ci=ci, ci_level=0.95, ci_bracketed_fraction=1.0)
    return dict(index=index, label=", ".join(f"{k}={v}" for k, v in factors.items()),
                factors={k: str(v) for k, v in factors.items()}, factor_values=factors, status=status,
                emm=emm, runs=runs)


def _write_summary(sweep_dir, entries, factors, eps=0.1):
    summary = dict(format="diffmem-sweep-summary", version=1, name="width-and-labels", eps=eps, threshold=1 - eps,
                   metric="max", interpolation="linear", factors=factors, entries=entries)
    (sweep_dir / "summary.json").write_text(json.dumps(summary))
    return summary


@pytest.fixture
def sweep(tiny_run, tmp_path):
    """Four entries over two factors: bracketed (with a CI), unbracketed above, unbracketed
    below with a one-snapshot run, and one whose only run failed (no results.json, emm null)."""
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "runs").mkdir(parents=True)

    def record(name, size, ratios):
        return _run_record(sweep_dir, tiny_run, name, size, ratios)

    bracketed = [record("c8-16", 16, [0.9, 1.0]), record("c8-32", 32, [0.8, 0.95]), record("c8-64", 64, [0.2, 0.5])]
    above = [record("c16-16", 16, [1.0, 1.0]), record("c16-32", 32, [0.9, 0.97])]
    below = [record("c16-cond-16", 16, [0.4])]
    failed = [dict(size=16, ratio=None, max_ratio=None, final_ratio=None, n_samples=None, run_dir="runs/c8-cond-16",
                   status="failed", error="ValueError: boom")]
    entries = [_entry(0, dict(num_channels=8, labels="none"), bracketed, ci=[30.0, 45.0]),
               _entry(1, dict(num_channels=16, labels="none"), above),
               _entry(2, dict(num_channels=8, labels="cond"), failed, status="failed"),
               _entry(3, dict(num_channels=16, labels="cond"), below)]
    _write_summary(sweep_dir, entries, ["num_channels", "labels"])
    return sweep_dir, entries


def test_sweep_report_table_figures_and_grids(sweep):
    import matplotlib.pyplot as plt

    sweep_dir, entries = sweep
    report = write_report(sweep_dir)
    text = report.read_text()

    emm = entries[0]["emm"]
    assert emm["bracketed"] and emm["lower"] == 32 and emm["upper"] == 64
    assert _table_row(text, "0")[1:6] == ["8", "none", f"{emm['value']:.1f}", "32..64", "30.0..45.0 (95%)"]
    assert _table_row(text, "1")[3:5] == [">= 32", "32.."]
    assert _table_row(text, "2")[3] == "n/a" and _table_row(text, "2")[-1] == "failed"
    assert _table_row(text, "3")[3:5] == ["< 16", "..16"]
    assert _table_row(text, "0")[-2:] == ["3", "done"]

    figures = {p.name for p in (sweep_dir / FIGURES_DIR).iterdir()}
    assert figures == {"ratio-vs-size.png", "emm-vs-num_channels.png", "emm-vs-labels.png", "training.png"}
    links = _linked_images(report)
    _assert_valid_pngs(links)
    assert {sweep_dir / FIGURES_DIR / name for name in figures} <= set(links)
    # The grids: entry 0's largest memorizing |D| (32) and smallest non-memorizing (64).
    assert any(link.parent == sweep_dir / "runs" / "c8-32" for link in links)
    assert any(link.parent == sweep_dir / "runs" / "c8-64" for link in links)
    assert not any(link.parent == sweep_dir / "runs" / "c8-16" for link in links)
    # The failed run is listed, not drawn.
    assert "runs/c8-cond-16" in text and "no results.json" in text
    assert "Without EMM, not drawn: num_channels=8, labels=cond" in text
    assert plt.get_fignums() == []
    _no_temporary_files(sweep_dir, sweep_dir / FIGURES_DIR)


def test_sweep_report_recomputes_emm_at_another_eps(sweep):
    sweep_dir, entries = sweep
    runs = [r for r in entries[0]["runs"]]
    expected = estimate([r["size"] for r in runs], [r["ratio"] for r in runs], eps=0.4)
    assert expected.bracketed and f"{expected.value:.1f}" != f"{entries[0]['emm']['value']:.1f}"
    text = write_report(sweep_dir, eps=0.4).read_text()
    assert _table_row(text, "0")[3] == f"{expected.value:.1f}"
    assert "recomputed at eps = 0.4" in text


def test_sweep_report_with_a_single_entry_and_no_factors(tiny_run, tmp_path):
    sweep_dir = tmp_path / "one"
    (sweep_dir / "runs").mkdir(parents=True)
    runs = [_run_record(sweep_dir, tiny_run, "only", 20, [0.3]),
            dict(size=40, ratio=None, max_ratio=None, final_ratio=None, n_samples=None, run_dir="runs/never",
                 status="running")]
    entry = _entry(0, {}, runs, status="incomplete")
    entry["label"] = "base"
    _write_summary(sweep_dir, [entry], [])
    text = write_report(sweep_dir).read_text()
    assert _table_row(text, "0")[1:3] == ["< 20", "..20"]
    assert {p.name for p in (sweep_dir / FIGURES_DIR).iterdir()} == {"ratio-vs-size.png", "training.png"}
    _assert_valid_pngs(_linked_images(sweep_dir / "report.md"))
    assert "runs/never" in text


def test_sweep_report_when_every_run_failed_lists_them_without_figures(tmp_path):
    sweep_dir = tmp_path / "all-failed"
    sweep_dir.mkdir()
    runs = [dict(size=size, ratio=None, max_ratio=None, final_ratio=None, n_samples=None, run_dir=f"runs/r{size}",
                 status="failed", error="diffmem-train: error: no CUDA device") for size in (20, 50)]
    _write_summary(sweep_dir, [_entry(0, dict(labels="none"), runs, status="failed")], ["labels"])
    text = write_report(sweep_dir).read_text()
    assert _table_row(text, "0")[2] == "n/a" and "No run has finished: no figures." in text
    assert "runs/r20" in text and "runs/r50" in text
    assert not (sweep_dir / FIGURES_DIR).exists()


def test_sweep_report_survives_a_damaged_run(sweep):
    sweep_dir, _ = sweep
    (sweep_dir / "runs" / "c8-64" / "results.json").write_text("{cut")
    text = write_report(sweep_dir).read_text()
    assert "c8-64" in text and "invalid JSON" in text
    _assert_valid_pngs(_linked_images(sweep_dir / "report.md"))


# ----------------------------------------------------------------------------------------
# Bad input and the command line


def test_a_directory_with_neither_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))) as error:
        write_report(tmp_path)
    assert "summary.json" in str(error.value) and "config.json" in str(error.value)
    with pytest.raises(ValueError, match="not a directory"):
        write_report(tmp_path / "absent")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, problem", [("{not json", "invalid JSON"), ("[1, 2]", "expected an object"),
                                               ('{"format": "other", "entries": []}', "format 'other'"),
                                               ('{"format": "diffmem-sweep-summary", "entries": [{"runs": 3}]}',
                                                "entry 0 has no list of runs")])
def test_an_invalid_summary_is_refused_with_its_name(tmp_path, content, problem):
    (tmp_path / "summary.json").write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "summary.json"))) as error:
        write_report(tmp_path)
    assert problem in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no report, no figures folder


def test_an_invalid_results_file_is_refused_with_its_name(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path / "run")
    (run_dir / "results.json").write_text('{"snapshots": [{"kimg": 1}]}')
    with pytest.raises(ValueError, match=re.escape(str(run_dir / "results.json"))):
        write_report(run_dir)


def _report_command(*args, module="diffmem.cli.report"):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_the_command_prints_one_error_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "summary.json").write_text("{not json")
    for directory, name in ((empty, str(empty)), (bad, str(bad / "summary.json"))):
        done = _report_command(directory)
        assert done.returncode == 1
        assert "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("diffmem report: error: ") and name in lines[0]


def test_the_diffmem_command_writes_the_report(sweep, tmp_path):
    sweep_dir, _ = sweep
    out = tmp_path / "elsewhere" / "sweep.md"
    out.parent.mkdir()
    done = _report_command("report", sweep_dir, "--out", out, module="diffmem.cli.main")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"report: {out}"
    _assert_valid_pngs(_linked_images(out))
    _no_temporary_files(out.parent, out.parent / FIGURES_DIR)
