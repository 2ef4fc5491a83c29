"""The results of a sweep, collected from its run directories: summary.json (read by
`diffmem report`), emm.csv / emm.md (EMM per entry) and curves.csv (ratio vs |D|).

Everything is recomputed from disk, so any process (the sweep itself, a Slurm array task,
`diffmem sweep --aggregate`) writes the same files for the same runs.
"""
from __future__ import annotations

import csv
import io
import json
import pathlib
from typing import Any

from ..training.checkpoint import write_atomic, write_json_atomic
from ..training.config import TrainingConfig
from .estimate import estimate
from .execute import EntryProgress, next_size
from .runs import RUNS_DIR, RunRecord, finished_record
from .sweep import SweepEntry, SweepSpec

SUMMARY_FILE = "summary.json"
SPEC_FILE = "sweep.json"
SUMMARY_FORMAT = "diffmem-sweep-summary"


def _scan_sizes(spec: SweepSpec, sweep_dir: pathlib.Path) -> dict[int, list[int]]:
    """entry index -> sizes with a run directory on disk for that entry."""
    outdir = str(sweep_dir / RUNS_DIR)
    on_disk: dict[str, int] = {}
    for config_file in sorted((sweep_dir / RUNS_DIR).glob("*/config.json")):
        try:
            saved = TrainingConfig.from_dict(json.loads(config_file.read_text())["config"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if saved.size is not None:
            on_disk[config_file.parent.name] = saved.size
    found: dict[int, list[int]] = {}
    for entry in spec.entries:
        sizes = []
        for name, size in on_disk.items():
            try:
                if spec.config(entry, size, outdir).run_name() == name:
                    sizes.append(size)
            except ValueError:
                continue
        found[entry.index] = sorted(sizes)
    return found


def collect_progress(spec: SweepSpec, sweep_dir: str | pathlib.Path) -> list[EntryProgress]:
    """Every entry's finished runs, read from the run directories."""
    sweep_dir = pathlib.Path(sweep_dir)
    outdir = str(sweep_dir / RUNS_DIR)
    sizes = _scan_sizes(spec, sweep_dir)
    progress = []
    for entry in spec.entries:
        state = EntryProgress(entry)
        # A fixed grid reports its own sizes; a search, every size it (or an earlier one) trained.
        wanted = sizes[entry.index] if spec.sizes is None else [s for s in sizes[entry.index] if s in spec.sizes]
        for size in wanted:
            record = finished_record(spec.config(entry, size, outdir), spec.metric)
            if record is not None:
                state.finished[size] = record
        state.done = next_size(spec, state)[0]
        progress.append(state)
    return progress


def _entry_summary(spec: SweepSpec, state: EntryProgress, sweep_dir: pathlib.Path) -> dict[str, Any]:
    entry: SweepEntry = state.entry
    records: list[RunRecord] = [state.finished[s] for s in sorted(state.finished)]
    outdir = str(sweep_dir / RUNS_DIR)
    runs = [dict(size=r.size, ratio=r.ratio, max_ratio=r.max_ratio, final_ratio=r.final_ratio, n_samples=r.n_samples,
                 run_dir=str(r.run_dir.relative_to(sweep_dir)), status="done") for r in records]
    failed_here = {}
    for size in sorted(set(state.failed) | set(state.pending)):
        if size in state.finished:
            continue
        key = sweep_dir / RUNS_DIR / spec.config(entry, size, outdir).run_name()
        status = "failed" if size in state.failed else "running"
        run = dict(size=size, ratio=None, max_ratio=None, final_ratio=None, n_samples=None,
                   run_dir=str(key.relative_to(sweep_dir)), status=status)
        if status == "failed":
            run["error"] = failed_here[size] = state.failed[size]
        runs.append(run)
    runs.sort(key=lambda r: r["size"])

    emm = None
    if records:
        flags = [r.flags for r in records]
        can_bootstrap = spec.bootstrap > 0 and all(f is not None for f in flags)
        emm = estimate([r.size for r in records], [r.ratio for r in records], eps=spec.eps,
                       log=spec.interpolation == "log", flags=flags if can_bootstrap else None,
                       bootstrap=spec.bootstrap if can_bootstrap else 0).to_dict()
    status = "failed" if failed_here else ("done" if state.done else "incomplete")
    return dict(index=entry.index, label=entry.label, factors=entry.display_factors(),
                factor_values=entry.factors, status=status, emm=emm, runs=runs)


def build_summary(spec: SweepSpec, progress: list[EntryProgress], sweep_dir: str | pathlib.Path) -> dict[str, Any]:
    """The sweep's results for the entries in `progress` (all of them, or one array task's)."""
    sweep_dir = pathlib.Path(sweep_dir)
    by_index = {state.entry.index: state for state in progress}
    entries = [_entry_summary(spec, by_index[e.index], sweep_dir)
               for e in spec.entries if e.index in by_index]
    search = None
    if spec.search is not None:
        search = dict(min=spec.search.min_size, max=spec.search.max_size, tolerance=spec.search.tolerance)
    return dict(format=SUMMARY_FORMAT, version=1, name=spec.name, eps=spec.eps, threshold=1 - spec.eps,
                metric=spec.metric, interpolation=spec.interpolation, search=search,
                sizes=list(spec.sizes) if spec.sizes is not None else None, factors=list(spec.factors),
                entries=entries)


def format_number(value: Any, digits: int = 1) -> str:
    """A table cell: '' for None, floats with `digits` decimals."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def emm_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per entry: its factors, EMM and bracket."""
    rows = []
    for entry in summary["entries"]:
        emm = entry["emm"] or {}
        ci = emm.get("ci") or [None, None]
        rows.append(dict(index=entry["index"], label=entry["label"], **entry["factors"],
                         emm=emm.get("value"), lower=emm.get("lower"), upper=emm.get("upper"),
                         bracketed=emm.get("bracketed"), monotone=emm.get("monotone"), ci_low=ci[0], ci_high=ci[1],
                         runs=sum(1 for r in entry["runs"] if r["status"] == "done"), status=entry["status"]))
    return rows


def curve_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per finished run: ratio vs |D| for every entry."""
    return [dict(index=entry["index"], label=entry["label"], **entry["factors"], size=run["size"], ratio=run["ratio"],
                 max_ratio=run["max_ratio"], final_ratio=run["final_ratio"], n_samples=run["n_samples"],
                 run_dir=run["run_dir"])
            for entry in summary["entries"] for run in entry["runs"] if run["status"] == "done"]


def _csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buffer.getvalue()


def emm_markdown(summary: dict[str, Any]) -> str:
    factors = summary["factors"]
    header = ["#", *factors, "EMM", "bracket", "CI", "monotone", "runs", "status"]
    lines = [f"EMM per entry of sweep `{summary['name']}` (memorized when ratio >= {summary['threshold']:g}, "
             f"ratio = {summary['metric']} over snapshots)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, entry in zip(emm_rows(summary), summary["entries"]):
        emm = entry["emm"]
        if emm is None:
            value, bracket = "", ""
        elif emm["bracketed"]:
            value, bracket = format_number(emm["value"]), f"{emm['lower']}..{emm['upper']}"
        elif emm["lower"] is None:
            value, bracket = f"< {emm['upper']}", f"..{emm['upper']}"
        else:
            value, bracket = f">= {emm['lower']}", f"{emm['lower']}.."
        ci = f"{format_number(row['ci_low'])}..{format_number(row['ci_high'])}" if row["ci_low"] is not None else ""
        monotone = "" if row["monotone"] is None else ("yes" if row["monotone"] else "no")
        cells = [str(row["index"]), *[str(row[f]) for f in factors], value, bracket, ci, monotone, str(row["runs"]),
                 row["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(summary: dict[str, Any], sweep_dir: str | pathlib.Path) -> None:
    """summary.json, emm.csv, emm.md and curves.csv, each written atomically."""
    sweep_dir = pathlib.Path(sweep_dir)
    factors = summary["factors"]
    write_json_atomic(summary, sweep_dir / SUMMARY_FILE)
    emm_columns = ["index", "label", *factors, "emm", "lower", "upper", "bracketed", "monotone", "ci_low", "ci_high",
                   "runs", "status"]
    curve_columns = ["index", "label", *factors, "size", "ratio", "max_ratio", "final_ratio", "n_samples", "run_dir"]
    for name, text in (("emm.csv", _csv_text(emm_rows(summary), emm_columns)),
                       ("curves.csv", _csv_text(curve_rows(summary), curve_columns)),
                       ("emm.md", emm_markdown(summary))):
        write_atomic(sweep_dir / name, lambda file, text=text: file.write(text), "w")
