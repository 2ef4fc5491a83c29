"""Training durations and the learning-rate warm-up.

DiffMemorize rescales every EDM duration by the training-set size |D| so that a run on a
subset sees as many epochs as EDM's CIFAR-10 recipe does on all 50,000 images. Its
`--duration`, `--ema` and the warm-up are therefore in "Mimg at |D| = 50k", which this
module calls *reference units*:

    total_kimg        = max(int(duration * |D| / 50), 1)     duration 2000 = 40,000 epochs
    ema_halflife_kimg = int(ema * |D| / 50)                   ema 0.5      = 10 epochs
    lr_rampup_kimg    = int(|D| / 5)  (= int(10 * |D| / 50))  10           = 200 epochs

The int() truncations are the reference's and are kept: they make the EMA half-life 0
(no averaging) for |D| < 100, for instance. Durations may also be given in other units,
which are converted exactly:

    "2000"      reference units, as above
    "40000ep"   epochs (passes over |D|)
    "512kimg"   thousands of training images; also "2.5Mimg" and "100000img"
    "300steps"  optimizer steps of the global batch
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

REFERENCE_DATASET_SIZE = 50_000  # |D| of full CIFAR-10, which the reference units are scaled to

_UNITS = {
    "": "ref", "ref": "ref",
    "ep": "epochs", "epoch": "epochs", "epochs": "epochs",
    "kimg": "kimg",
    "mimg": "mimg",
    "img": "img", "nimg": "img", "images": "img",
    "step": "steps", "steps": "steps", "it": "steps", "iter": "steps",
}
_NUMBER_WITH_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


@dataclass(frozen=True)
class Duration:
    """An amount of training, in the unit it was given in. `to_nimg` converts it to a
    number of training images once |D| and the batch size are known."""

    value: float
    unit: str  # 'ref' | 'epochs' | 'kimg' | 'mimg' | 'img' | 'steps'

    def __str__(self) -> str:
        return f"{self.value:g}" if self.unit == "ref" else f"{self.value:g}{self.unit}"

    def to_nimg(self, dataset_size: int, batch_size: int, *, truncate_to_kimg: bool = True) -> int:
        """Training images. Reference units truncate to whole kimg as the reference does,
        unless truncate_to_kimg=False."""
        if self.unit == "ref":
            kimg = self.value * dataset_size / (REFERENCE_DATASET_SIZE / 1000)
            return int(kimg) * 1000 if truncate_to_kimg else round(kimg * 1000)
        if self.unit == "epochs":
            return round(self.value * dataset_size)
        if self.unit == "kimg":
            return round(self.value * 1e3)
        if self.unit == "mimg":
            return round(self.value * 1e6)
        if self.unit == "img":
            return round(self.value)
        if self.unit == "steps":
            return round(self.value) * batch_size
        raise AssertionError(self.unit)


def parse_duration(text, *, what: str = "duration", allow_zero: bool = False) -> Duration:
    """'2000' (reference units), '40000ep', '512kimg', '2.5Mimg', '100000img', '300steps'.
    Raises ValueError naming `what` for anything else."""
    if isinstance(text, bool):
        raise ValueError(f"{what} must be a number with an optional unit, got {text!r}")
    if isinstance(text, (int, float)):
        text = repr(text)
    match = _NUMBER_WITH_UNIT.match(str(text))
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if unit is None:
        raise ValueError(
            f"{what} must be a number in reference units (Mimg at |D|=50k) or a number with a unit "
            f"ep|kimg|Mimg|img|steps (e.g. 2000, 40000ep, 512kimg), got {text!r}"
        )
    value = float(match.group(1))
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{what} must be {'non-negative' if allow_zero else 'positive'}, got {text!r}")
    if unit == "steps" and value != int(value):
        raise ValueError(f"{what} in steps must be a whole number, got {text!r}")
    return Duration(value, unit)


def learning_rate(base_lr: float, cur_nimg: int, rampup_nimg: int) -> float:
    """Linear warm-up from 0 to base_lr over the first rampup_nimg images, then constant
    (no decay), evaluated before the step that sees images cur_nimg .. cur_nimg + batch.
    As in the reference, the very first step has learning rate 0 even without warm-up."""
    return base_lr * min(cur_nimg / max(rampup_nimg, 1e-8), 1)


@dataclass(frozen=True)
class TrainingSchedule:
    """Every duration of one run in training images, resolved for its |D|, batch size and
    number of processes."""

    dataset_size: int
    batch_size: int  # global batch, all processes and accumulation rounds together
    batch_per_round: int  # images one process feeds the network at once
    accumulation_rounds: int
    total_nimg: int
    total_steps: int
    lr_rampup_nimg: int
    ema_halflife_nimg: float
    snapshot_nimg: int  # a snapshot is written whenever training passes a multiple of this
    tick_nimg: int  # a log line is written whenever training passes a multiple of this

    @property
    def data_ratio(self) -> float:
        """50,000 / |D|: the reference's factor for the EMA decay per step in mode2/mode4."""
        return REFERENCE_DATASET_SIZE / self.dataset_size

    def epochs(self, nimg: int) -> float:
        return nimg / self.dataset_size

    def steps_done(self, nimg: int) -> int:
        return -(-nimg // self.batch_size)


def parse_snapshots(text) -> tuple[str, object]:
    """'4' -> ('count', 4): that many snapshots evenly spread, the last at the end;
    '2500kimg' / '100ep' / ... -> ('interval', Duration): one whenever training passes a
    multiple of it, plus one at the end."""
    if isinstance(text, bool):
        raise ValueError(f"--snapshots must be a count or an interval such as 2500kimg, got {text!r}")
    s = str(text).strip()
    if re.fullmatch(r"[0-9]+", s):
        count = int(s)
        if count < 1:
            raise ValueError(f"--snapshots count must be at least 1 (the final snapshot), got {text!r}")
        return "count", count
    if re.fullmatch(r"[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?", s):
        raise ValueError(f"--snapshots count must be a whole number, got {text!r}")
    return "interval", parse_duration(s, what="--snapshots interval")


def resolve_schedule(
    *,
    dataset_size: int,
    batch_size: int,
    batch_gpu: int | None,
    world_size: int,
    duration,
    lr_rampup,
    ema_halflife,
    ema_mode: str,
    snapshots,
    tick=None,
) -> TrainingSchedule:
    """All durations in images. ema_halflife in reference units is truncated to whole kimg
    as the reference does, except in mode4 where it only shapes the ramp-up and is kept
    exact, so that the per-step beta after ramp-up is final_ema for every |D|."""
    if dataset_size < 1:
        raise ValueError("the training set is empty")
    if batch_size % world_size:
        raise ValueError(f"--batch {batch_size} is not divisible by the {world_size} processes")
    per_process = batch_size // world_size
    batch_per_round = per_process if batch_gpu is None or batch_gpu > per_process else batch_gpu
    if per_process % batch_per_round:
        raise ValueError(f"--batch-gpu {batch_gpu} does not divide the per-process batch {per_process}")
    rounds = per_process // batch_per_round

    duration = parse_duration(duration, what="--duration") if not isinstance(duration, Duration) else duration
    total_nimg = duration.to_nimg(dataset_size, batch_size)
    if duration.unit == "ref":
        total_nimg = max(total_nimg, 1000)  # max(int(...), 1) kimg, as the reference
    total_nimg = max(total_nimg, 1)
    lr_rampup = parse_duration(lr_rampup, what="--lr-rampup", allow_zero=True) if not isinstance(lr_rampup, Duration) else lr_rampup
    ema_halflife = parse_duration(ema_halflife, what="--ema", allow_zero=True) if not isinstance(ema_halflife, Duration) else ema_halflife

    kind, value = parse_snapshots(snapshots)
    if kind == "count":
        snapshot_nimg = max(-(-total_nimg // value), 1)
    else:
        snapshot_nimg = max(value.to_nimg(dataset_size, batch_size), 1)

    if tick is None:
        # EDM's 50 kimg ticks, but at least ~20 log lines for short runs.
        tick_nimg = max(min(50_000, total_nimg // 20), 1)
    else:
        tick_duration = parse_duration(tick, what="--tick") if not isinstance(tick, Duration) else tick
        tick_nimg = max(tick_duration.to_nimg(dataset_size, batch_size), 1)

    return TrainingSchedule(
        dataset_size=dataset_size,
        batch_size=batch_size,
        batch_per_round=batch_per_round,
        accumulation_rounds=rounds,
        total_nimg=total_nimg,
        total_steps=-(-total_nimg // batch_size),
        lr_rampup_nimg=lr_rampup.to_nimg(dataset_size, batch_size),
        ema_halflife_nimg=float(ema_halflife.to_nimg(dataset_size, batch_size, truncate_to_kimg=ema_mode != "mode4")),
        snapshot_nimg=snapshot_nimg,
        tick_nimg=tick_nimg,
    )
