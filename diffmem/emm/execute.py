"""Running a sweep: every training run is its own `diffmem-train` process, on a slot of
the machine (a GPU, a group of GPUs under torchrun, or a CPU job), and the sweep keeps the
slots busy with the runs its entries ask for next.

Nothing but the run directories holds state: a run that finished is read back, a run
that was interrupted resumes from its checkpoint, so a crashed or killed sweep continues
by running the same command again and redoes nothing that finished.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Callable

from ..training.signals import StopRequest
from .runs import LOGS_DIR, RUNS_DIR, RunRecord, finished_record, has_checkpoint, run_dir, write_job
from .search import plan
from .sweep import SweepEntry, SweepSpec


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one run executes: `device` for diffmem-train, extra environment, and how
    many processes (torchrun when more than one)."""
    name: str
    device: str
    env: dict[str, str]
    nproc: int = 1


def parse_slots(devices: str | None, jobs: int = 1, torchrun: bool = False) -> list[Slot]:
    """--devices cpu (with --jobs N parallel CPU runs), --devices 0,1,3 (one run per GPU
    at a time, or --jobs N per GPU for models too small to fill one), or with torchrun=True
    one run at a time over all listed GPUs (DDP)."""
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    text = (devices or "cpu").strip().lower()
    if text == "cpu":
        if torchrun:
            raise ValueError("--torchrun needs GPUs: pass --devices 0,1,...")
        return [Slot(f"cpu#{i}", "cpu", {}) for i in range(jobs)]
    ids = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"--devices must be 'cpu' or distinct GPU numbers such as 0,1,2; got {devices!r}")
    physical = _visible_devices(ids)
    if torchrun:
        if jobs != 1:
            raise ValueError("--torchrun trains one run at a time over all --devices; --jobs must be 1")
        return [Slot("gpus " + ",".join(ids), "cuda", {"CUDA_VISIBLE_DEVICES": ",".join(physical)}, nproc=len(ids))]
    return [Slot(f"gpu {i}" + (f"#{j}" if jobs > 1 else ""), "cuda", {"CUDA_VISIBLE_DEVICES": p})
            for j in range(jobs) for i, p in zip(ids, physical)]


def _visible_devices(ids: list[str]) -> list[str]:
    """The CUDA_VISIBLE_DEVICES entries for GPU numbers as this process sees them: under
    Slurm (or any parent that restricts the GPUs) GPU 0 is the first *visible* one."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return ids
    entries = [v.strip() for v in visible.split(",")]
    for i in ids:
        if int(i) >= len(entries):
            raise ValueError(f"--devices {i}: only {len(entries)} GPU(s) are visible (CUDA_VISIBLE_DEVICES={visible})")
    return [entries[int(i)] for i in ids]


def train_command(job_file: pathlib.Path, config_dir: pathlib.Path | None, slot: Slot) -> list[str]:
    if slot.nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={slot.nproc}",
                   "-m", "diffmem.cli.train"]
    else:
        command = [sys.executable, "-m", "diffmem.cli.train"]
    command += ["--config", str(job_file), "--device", slot.device, "--progress", "0"]
    if config_dir is not None:
        command += ["--resume", str(config_dir)]
    return command


@dataclasses.dataclass
class _Job:
    key: pathlib.Path  # the run directory
    slot: Slot
    process: subprocess.Popen
    log_path: pathlib.Path
    started: float
    waiters: list[tuple[int, int]]  # (entry index, size) waiting for this run
    resumed: bool
    signalled: bool = False


@dataclasses.dataclass
class EntryProgress:
    entry: SweepEntry
    finished: dict[int, RunRecord] = dataclasses.field(default_factory=dict)
    pending: set[int] = dataclasses.field(default_factory=set)
    failed: dict[int, str] = dataclasses.field(default_factory=dict)
    done: bool = False


@dataclasses.dataclass
class SweepOutcome:
    progress: list[EntryProgress]
    trained: int  # runs started this time (fresh or resumed)
    reused: int  # runs found finished on disk
    failed: int
    interrupted: bool = False


def next_size(spec: SweepSpec, state: EntryProgress) -> tuple[bool, int | None]:
    """(entry done, a size to start) from what is finished and pending."""
    finished = {size: record.ratio for size, record in state.finished.items()}
    if spec.search is not None:
        decision = plan(spec.search, finished, state.pending)
        return decision.done, decision.next_size
    missing = [s for s in spec.sizes if s not in finished and s not in state.pending]
    return (not missing and not state.pending), (missing[0] if missing else None)


def run_sweep(spec: SweepSpec, sweep_dir: str | os.PathLike, slots: list[Slot], *,
              entries: list[int] | None = None, log: Callable[[str], None] = print,
              on_change: Callable[[list[EntryProgress], dict], None] | None = None,
              poll_seconds: float = 0.5) -> SweepOutcome:
    """Train what the entries need until every one is done or failed (or a signal stops
    the sweep). `entries` limits the sweep to those indices (e.g. one Slurm array task).
    on_change(progress, failures) is called after every finished run (to rewrite summaries)."""
    sweep_dir = pathlib.Path(sweep_dir)
    outdir = str(sweep_dir / RUNS_DIR)
    chosen = spec.entries if entries is None else [spec.entries[i] for i in entries]
    progress = [EntryProgress(entry) for entry in chosen]
    running: dict[pathlib.Path, _Job] = {}
    free = list(slots)
    trained = reused = failed = 0
    failures: dict[str, str] = {}

    def tag(state: EntryProgress) -> str:
        return f"[{state.entry.index}: {state.entry.label}]"

    def schedule() -> None:
        nonlocal reused, trained
        changed = True
        while changed:
            changed = False
            for state in progress:
                if state.done or state.failed:
                    continue
                done, size = next_size(spec, state)
                if done:
                    state.done = True
                    changed = True
                    continue
                if size is None:
                    continue
                config = spec.config(state.entry, size, outdir)
                key = run_dir(config)
                record = finished_record(config, spec.metric)
                if record is not None:
                    state.finished[size] = record
                    reused += 1
                    log(f"{tag(state)} |D|={size}: finished earlier, ratio {record.ratio:.4f} ({key.name})")
                    changed = True
                    continue
                if key in running:  # another entry is training the same configuration
                    running[key].waiters.append((state.entry.index, size))
                    state.pending.add(size)
                    changed = True
                    continue
                if not free:
                    continue
                slot = free.pop(0)
                resume = has_checkpoint(config)
                job_file = write_job(config, sweep_dir)
                log_path = sweep_dir / LOGS_DIR / f"{key.name}.log"
                log_path.parent.mkdir(parents=True, exist_ok=True)
                with open(log_path, "a") as log_file:
                    log_file.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {'resume' if resume else 'start'} "
                                   f"on {slot.name}\n")
                    log_file.flush()
                    process = subprocess.Popen(
                        train_command(job_file, key if resume else None, slot), stdout=log_file,
                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, **slot.env})
                running[key] = _Job(key, slot, process, log_path, time.time(), [(state.entry.index, size)], resume)
                state.pending.add(size)
                trained += 1
                log(f"{tag(state)} |D|={size}: {'resuming' if resume else 'training'} on {slot.name} ({key.name})")
                changed = True

    def finish(job: _Job) -> None:
        nonlocal failed
        free.append(job.slot)
        code = job.process.returncode
        seconds = time.time() - job.started
        for index, size in job.waiters:
            state = next(s for s in progress if s.entry.index == index)
            state.pending.discard(size)
            config = spec.config(state.entry, size, outdir)
            record = finished_record(config, spec.metric) if code == 0 else None
            if record is not None:
                state.finished[size] = record
                verdict = "memorized" if record.ratio >= 1 - spec.eps else "not memorized"
                log(f"{tag(state)} |D|={size}: ratio {record.ratio:.4f} ({verdict}) after {seconds:.0f} s")
            elif interrupt.signum is None:
                reason = _last_error(job.log_path) or f"exit status {code}"
                state.failed[size] = reason
                failures[str(job.key)] = reason
                log(f"{tag(state)} |D|={size}: FAILED ({reason}); log: {job.log_path}")
        if code != 0 and interrupt.signum is None:
            failed += 1
        if on_change is not None:
            on_change(progress, failures)

    with StopRequest("starting no more runs; the running ones save checkpoints and exit "
                     "(Ctrl-C again to abort at once)") as interrupt:
        while True:
            if interrupt.signum is None:
                schedule()
            if not running:
                break
            time.sleep(poll_seconds)
            if interrupt.signum is not None:
                for job in running.values():
                    if job.process.poll() is None and not job.signalled:
                        job.process.send_signal(signal.SIGTERM)  # the run checkpoints, then exits
                        job.signalled = True
            for key in [k for k, j in running.items() if j.process.poll() is not None]:
                finish(running.pop(key))
    if on_change is not None:
        on_change(progress, failures)
    return SweepOutcome(progress, trained, reused, failed, interrupted=interrupt.signum is not None)


def _last_error(log_path: pathlib.Path) -> str | None:
    """The `diffmem-train: error: ...` line (or the last line) of a failed run's log."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    for line in reversed(lines):
        if "error:" in line:
            return line
    return lines[-1] if lines else None
