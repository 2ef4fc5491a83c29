"""Training diffusion models the way the memorization papers do, and measuring how much
of their training set they reproduce.

    config = TrainingConfig.from_dict(dict(data="digits", size=64, ...))
    dataset = build_dataset(config)
    result = train(config, dataset, run_dir)
    RunEvaluator(run_dir, dataset, config).evaluate_all(result.snapshots)

The command line front end is `diffmem-train` (diffmem.cli.train).
"""
from __future__ import annotations

from .checkpoint import load_checkpoint, load_snapshot, save_atomic
from .config import PRESETS, TrainingConfig, read_config_file
from .data_order import CyclicOrder
from .dataset import build_dataset
from .ema import EMA, EMA_MODES, ema_beta
from .evaluate import RunEvaluator, evaluate_snapshot, verdict_line
from .loop import TrainingInterrupted, TrainingResult, train
from .model import build_denoiser, load_denoiser, network_spec
from .schedule import Duration, TrainingSchedule, learning_rate, parse_duration, resolve_schedule


__all__ = [
    "CyclicOrder",
    "Duration",
    "EMA",
    "EMA_MODES",
    "PRESETS",
    "RunEvaluator",
    "TrainingConfig",
    "TrainingInterrupted",
    "TrainingResult",
    "TrainingSchedule",
    "build_dataset",
    "build_denoiser",
    "ema_beta",
    "evaluate_snapshot",
    "learning_rate",
    "load_checkpoint",
    "load_denoiser",
    "load_snapshot",
    "network_spec",
    "parse_duration",
    "read_config_file",
    "resolve_schedule",
    "save_atomic",
    "train",
    "verdict_line",
]
