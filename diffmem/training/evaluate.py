"""Memorization ratio of a run's snapshots, as the papers measure it.

For each snapshot: generate n samples (seeds 0..n-1, EDM's deterministic Heun sampler,
18 steps by default) with the EMA weights, quantize them like saved PNGs, and count the
samples whose nearest training image is 3x closer than the second nearest
(diffmem.memorization.evaluate). The number a run reports is the maximum over its
snapshots (DiffMemorize README, step III); the final snapshot's ratio is kept beside it.

results.json holds one entry per snapshot plus the maximum and the final value; it is
rewritten after every snapshot, and entries evaluated with the same settings are reused
when a run is resumed. Under torchrun the seeds are split over the processes.
"""
from __future__ import annotations

import base64
import json
import os
import pathlib
import time
from typing import Any

import numpy as np
import torch

from .. import memorization
from ..data import ImageDataset
from ..diffusion import euler_sampler, generate, heun_sampler
from . import checkpoint, distributed
from .config import TrainingConfig
from .grid import save_nn_grid
from .model import load_denoiser

RESULTS_FILE = "results.json"
MEMORIZED_THRESHOLD = 0.9  # EMM's 1 - eps with eps = 0.1
SAMPLERS_BY_NAME = {"heun": heun_sampler, "euler": euler_sampler}


def evaluation_settings(config: TrainingConfig) -> dict[str, Any]:
    return dict(num_samples=config.samples, seeds=f"0-{config.samples - 1}", sampler=config.sampler,
                num_steps=config.steps, weights="ema", class_labels="random", threshold=1 / 3,
                criterion="||x - NN1|| / ||x - NN2|| < 1/3 on uint8 pixels")


def generate_samples(denoiser, num_samples: int, *, batch_size: int, device, sampler: str, num_steps: int,
                     progress: bool) -> torch.Tensor:
    """uint8 (num_samples, C, H, W) for seeds 0..num_samples-1, each process generating
    its share; every process gets all of them."""
    seeds = torch.arange(num_samples).tensor_split(distributed.world_size())[distributed.rank()]
    if len(seeds):
        mine = generate(denoiser, seeds.tolist(), batch_size=batch_size, device=device, class_labels="random",
                        sampler=SAMPLERS_BY_NAME[sampler], progress=progress, num_steps=num_steps)
    else:
        mine = torch.empty(0, denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution, dtype=torch.uint8)
    return torch.cat(distributed.gather_objects(mine))


def evaluate_snapshot(path: str | os.PathLike, train_u8: torch.Tensor, config: TrainingConfig, *,
                      grid_path: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """Score one snapshot. Returns its results entry on the main process, None elsewhere."""
    path = pathlib.Path(path)
    device = distributed.resolve_device(config.device)
    start = time.time()
    denoiser, meta = load_denoiser(path, which="ema", device=device)
    samples = generate_samples(denoiser, config.samples, batch_size=config.sample_batch, device=device,
                               sampler=config.sampler, num_steps=config.steps,
                               progress=config.progress and distributed.is_main())
    if not distributed.is_main():
        return None
    scores, _ = score_samples(samples, train_u8, config, grid_path=grid_path, device=device)
    return dict(
        snapshot=path.name, nimg=int(meta["nimg"]), kimg=float(meta["kimg"]), step=int(meta["step"]),
        epochs=float(meta["epochs"]), **scores, seconds=time.time() - start, settings=evaluation_settings(config),
    )


def score_samples(samples: torch.Tensor, train_u8: torch.Tensor, config: TrainingConfig, *,
                  grid_path: str | os.PathLike | None, device) -> tuple[dict[str, Any], memorization.MemorizationReport]:
    """The memorization fields of a results.json snapshot entry for uint8 samples (and the
    PNG grid at grid_path when config.grid_rows > 0), with the full report."""
    report = memorization.evaluate(samples, train_u8, device=device)
    drawn = grid_path is not None and config.grid_rows > 0
    if drawn:
        save_nn_grid(grid_path, samples, train_u8, report.nn_index, report.nn_dist, report.memorized,
                     rows=config.grid_rows)
    return dict(
        ratio=report.ratio, n_memorized=int(report.memorized.sum()), n_samples=report.n_samples,
        knn_distance=report.knn_distance, hidden_copies=report.hidden_copies,
        n_duplicate_training_images=int(sum(len(g) - 1 for g in report.duplicate_groups)),
        grid=pathlib.Path(grid_path).name if drawn else None, memorized_bits=pack_flags(report.memorized),
    ), report


def pack_flags(flags: np.ndarray) -> str:
    """Per-sample memorization flags as base64 of np.packbits (1,250 bytes per 10,000
    samples), so EMM confidence intervals can be bootstrapped from results.json alone."""
    return base64.b64encode(np.packbits(np.asarray(flags, dtype=bool)).tobytes()).decode("ascii")


def unpack_flags(bits: str, count: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(bits), dtype=np.uint8), count=count).astype(bool)


def summarize(entries: list[dict[str, Any]], dataset: ImageDataset, config: TrainingConfig, *,
              complete: bool = False) -> dict[str, Any]:
    """results.json: per-snapshot entries, the maximum over snapshots and the final one.
    `complete` marks the run's final results (every snapshot of a finished training)."""
    results: dict[str, Any] = dict(
        complete=complete,
        dataset=dict(data=config.data, name=dataset.name, size=len(dataset), channels=dataset.channels,
                     resolution=list(dataset.resolution), labels=config.label_mode, num_classes=dataset.num_classes),
        evaluation=evaluation_settings(config),
        snapshots=entries,
        memorized_threshold=MEMORIZED_THRESHOLD,
    )
    if entries:
        best = max(entries, key=lambda e: (e["ratio"], e["nimg"]))
        final = max(entries, key=lambda e: e["nimg"])
        results.update(
            memorization_ratio=best["ratio"],  # the papers' number: max over snapshots
            max=dict(ratio=best["ratio"], snapshot=best["snapshot"], kimg=best["kimg"]),
            final=dict(ratio=final["ratio"], snapshot=final["snapshot"], kimg=final["kimg"]),
            verdict="memorized" if best["ratio"] >= MEMORIZED_THRESHOLD else "not memorized",
        )
    return results


def verdict_line(results: dict[str, Any]) -> str:
    if not results.get("snapshots"):
        return "no snapshot evaluated (--samples 0 or --eval none): no memorization ratio"
    count = len(results["snapshots"])
    ratio, final = results["max"]["ratio"], results["final"]["ratio"]
    data = results["dataset"]
    where = f"|D|={data['size']} {data['data']}"
    held = "memorized (>= 0.9)" if ratio >= MEMORIZED_THRESHOLD else "not memorized (< 0.9)"
    return (f"memorization ratio {ratio:.4f} (max over {count} snapshot{'s' * (count != 1)}; final {final:.4f}; "
            f"{results['evaluation']['num_samples']} samples) on {where}: {held}")


class RunEvaluator:
    """Evaluates a run's snapshots one by one, keeping results.json current."""

    def __init__(self, run_dir: str | os.PathLike, dataset: ImageDataset, config: TrainingConfig):
        self.run_dir = pathlib.Path(run_dir)
        self.dataset = dataset
        self.config = config
        self.entries: dict[str, dict[str, Any]] = {}
        results_path = self.run_dir / RESULTS_FILE
        if distributed.is_main() and results_path.exists():
            try:
                previous = json.loads(results_path.read_text())
                settings = evaluation_settings(config)
                # Snapshots are deterministic, so their scores can be reused when the
                # evaluation settings are the same.
                self.entries = {e["snapshot"]: e for e in previous.get("snapshots", []) if e.get("settings") == settings}
            except (ValueError, KeyError, TypeError, AttributeError):
                self.entries = {}

    def __call__(self, snapshot_path: str | os.PathLike) -> None:
        snapshot_path = pathlib.Path(snapshot_path)
        cached = distributed.broadcast_object(snapshot_path.name in self.entries)
        if not cached:
            grid = self.run_dir / f"nn-grid-{snapshot_path.stem.removeprefix('snapshot-')}.png"
            entry = evaluate_snapshot(snapshot_path, self.dataset.images, self.config, grid_path=grid)
            if entry is not None:
                self.entries[snapshot_path.name] = entry
                distributed.print0(f"{snapshot_path.name}: memorization ratio {entry['ratio']:.4f} "
                                   f"({entry['n_memorized']}/{entry['n_samples']}), {entry['seconds']:.1f} s")
        self.write()

    def write(self, only: list[str] | None = None) -> dict[str, Any] | None:
        if not distributed.is_main():
            return None
        names = only if only is not None else sorted(self.entries)
        entries = sorted((self.entries[n] for n in names if n in self.entries), key=lambda e: e["nimg"])
        # evaluate_all (only given) is the end of a run: every snapshot of it is scored.
        complete = only is not None and all(n in self.entries for n in only)
        results = summarize(entries, self.dataset, self.config, complete=complete)
        checkpoint.write_json_atomic(results, self.run_dir / RESULTS_FILE)
        return results

    def evaluate_all(self, snapshot_names: list[str]) -> dict[str, Any] | None:
        """Evaluate the named snapshots (newest first, as the reference does, so the
        final ratio is known early) and write results.json for exactly those."""
        for name in reversed(snapshot_names):
            self(self.run_dir / "snapshots" / name)
        return self.write(only=snapshot_names)
