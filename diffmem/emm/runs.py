"""Training runs of a sweep on disk: where each lives, whether it is finished, what it measured.

A run's directory is `<sweep>/runs/<run name>`, the name being TrainingConfig.run_name()
(readable settings + a hash of every option that changes training), so the same
configuration always maps to the same directory, in any process. A run is finished when
its results.json is complete and was evaluated with the settings asked for now.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np

from ..training.config import TrainingConfig
from ..training.evaluate import RESULTS_FILE, evaluation_settings, unpack_flags

RUNS_DIR = "runs"
JOBS_DIR = "jobs"
LOGS_DIR = "logs"


@dataclasses.dataclass(frozen=True)
class RunRecord:
    size: int
    ratio: float  # by the sweep's metric
    max_ratio: float
    final_ratio: float
    n_samples: int
    run_dir: pathlib.Path
    flags: np.ndarray | None  # per-sample memorization of the snapshot that gave `ratio`, when recorded


def run_dir(config: TrainingConfig) -> pathlib.Path:
    return pathlib.Path(config.outdir) / config.run_name()


def read_results(path: pathlib.Path) -> dict[str, Any] | None:
    """A run's results.json, or None when missing or unreadable (a run in progress)."""
    try:
        return json.loads((path / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return None


def finished_record(config: TrainingConfig, metric: str = "max") -> RunRecord | None:
    """The run's measurement if it finished with the evaluation settings `config` asks for."""
    directory = run_dir(config)
    results = read_results(directory)
    if not results or not results.get("complete") or not results.get("snapshots"):
        return None
    if results.get("evaluation") != evaluation_settings(config):
        return None  # evaluated differently: resuming re-evaluates without retraining
    return record_from_results(results, directory, metric)


def record_from_results(results: dict[str, Any], directory: pathlib.Path, metric: str) -> RunRecord:
    chosen_name = results["max" if metric == "max" else "final"]["snapshot"]
    chosen = next(e for e in results["snapshots"] if e["snapshot"] == chosen_name)
    flags = None
    if chosen.get("memorized_bits"):
        flags = unpack_flags(chosen["memorized_bits"], int(chosen["n_samples"]))
    return RunRecord(size=int(results["dataset"]["size"]), ratio=float(chosen["ratio"]),
                     max_ratio=float(results["max"]["ratio"]), final_ratio=float(results["final"]["ratio"]),
                     n_samples=int(chosen["n_samples"]), run_dir=directory, flags=flags)


def write_job(config: TrainingConfig, sweep_dir: pathlib.Path) -> pathlib.Path:
    """The run's full configuration as a JSON file that `diffmem-train --config` reads."""
    from ..training.checkpoint import write_json_atomic

    path = sweep_dir / JOBS_DIR / f"{config.run_name()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config.to_dict(), path)
    return path


def has_checkpoint(config: TrainingConfig) -> bool:
    return (run_dir(config) / "checkpoint.pt").is_file()
