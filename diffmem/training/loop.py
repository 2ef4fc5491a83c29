"""The training loop, in the structure of EDM's training_loop.py with DiffMemorize's
changes (|D|-scaled durations, EMA modes, fixed data order) and an exact resume.

Each step:
  1. every process takes its share of the next global batch (CyclicOrder),
  2. loss = lambda(sigma) ||D(y + sigma n; sigma) - y||^2, summed and divided by the
     per-process batch; DDP averages the gradients over processes,
  3. lr = warm-up(images seen), NaN/inf gradients are replaced (EDM), optimizer step,
  4. EMA update with the mode's beta for the images seen before this step.

Randomness comes from three places, all saved in checkpoints: the global torch RNG
(network initialization, then dropout), a dedicated torch.Generator for the loss's noise
levels and noise, and the data order (a pure function of the step). Resuming from a
checkpoint on the same hardware therefore continues bit for bit where the interrupted
run was.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import pathlib
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..data import ImageDataset
from . import checkpoint, distributed
from .config import TrainingConfig
from .data_order import CyclicOrder
from .ema import EMA, ema_beta
from .model import build_denoiser, build_loss, cast_output_to_float32, network_spec
from .schedule import TrainingSchedule, learning_rate
from .signals import StopRequest

try:
    from tqdm import tqdm as _tqdm
except ImportError:  # the progress bar is optional
    _tqdm = None

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"
SNAPSHOT_DIR = "snapshots"

# Distinct random streams derived from the seed: (seed, process, stream) -> seed.
_STREAM_DROPOUT = 0
_STREAM_LOSS = 1


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""

    def __init__(self, signum: int, checkpoint_path: pathlib.Path, nimg: int):
        self.signum = signum
        self.checkpoint_path = checkpoint_path
        self.nimg = nimg
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name} at {nimg / 1e3:.3f} kimg; checkpoint saved to {checkpoint_path}; "
                         f"rerun with --resume to continue")


@dataclass
class TrainingResult:
    run_dir: pathlib.Path
    snapshots: list[str] = field(default_factory=list)  # file names under run_dir/snapshots, in training order
    nimg: int = 0
    steps: int = 0
    net: torch.nn.Module | None = None  # the trained denoiser (raw weights), on the training device
    ema: torch.nn.Module | None = None  # its EMA, in eval mode


def nan_to_num_gradients(params) -> None:
    """EDM's guard: a NaN gradient entry becomes 0 and +-inf becomes +-1e5, so one bad
    batch cannot poison the weights or the optimizer state."""
    for param in params:
        if param.grad is not None:
            torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)


def derive_seed(seed: int, rank: int, stream: int) -> int:
    """An independent 63-bit seed per (seed, process, stream)."""
    words = np.random.SeedSequence([seed, rank, stream]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31 ^ int(words[1])) & ((1 << 63) - 1)


def _rng_state(device: torch.device, loss_generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "loss": loss_generator.get_state().cpu()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device, loss_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    loss_generator.set_state(state["loss"].to(loss_generator.get_state().device))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _check_resumable(saved_config: dict, config: TrainingConfig) -> None:
    saved = TrainingConfig.from_dict(saved_config, source="checkpoint config").training_identity()
    current = config.training_identity()
    changed = [key for key in current if saved.get(key) != current[key]]
    if changed:
        details = ", ".join(f"--{key.replace('_', '-')} {saved.get(key)!r} -> {current[key]!r}" for key in changed)
        raise ValueError(f"cannot resume: the checkpoint was trained with different settings ({details})")


def _truncate_log(path: pathlib.Path, nimg: int) -> None:
    """Drop log lines written after the checkpoint being resumed from: those steps are
    redone and logged again."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("nimg", 0) <= nimg:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    checkpoint.write_atomic(path, lambda file: file.write("".join(line + "\n" for line in kept)), "w")


def train(
    config: TrainingConfig,
    dataset: ImageDataset,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    on_snapshot: Callable[[pathlib.Path], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainingResult:
    """Train on `dataset` as `config` says, writing snapshots, checkpoint.pt and log.jsonl
    into run_dir (which must exist). Call on every process of a distributed run.

    resume: continue from run_dir/checkpoint.pt (refused if the training settings differ).
    on_snapshot(path): called on every process after each snapshot is written (used for
        evaluation after each snapshot).
    on_step(step, nimg): called after every optimizer step (tests use it to interrupt).

    Raises TrainingInterrupted after saving a checkpoint on SIGINT/SIGTERM.
    """
    run_dir = pathlib.Path(run_dir)
    device = distributed.resolve_device(config.device)
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, dataset, run_dir, device, resume, on_snapshot, on_step)
    finally:
        torch.set_num_threads(threads_before)


def _train(config, dataset, run_dir, device, resume, on_snapshot, on_step) -> TrainingResult:
    rank, world = distributed.rank(), distributed.world_size()
    is_main = rank == 0
    sched: TrainingSchedule = config.schedule(len(dataset), world)
    ema_mode, _, final_ema = config.ema_settings()
    snapshot_dir = run_dir / SNAPSHOT_DIR
    checkpoint_path = run_dir / CHECKPOINT_FILE
    log_path = run_dir / LOG_FILE

    # Numerics. fp32 is true fp32 as in the reference (TF32 off); tf32 lets CUDA matmuls
    # and convolutions use TF32; bf16 runs the network under autocast.
    allow_tf32 = config.precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if config.precision == "bf16"
                else contextlib.nullcontext())
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format

    # Network: initialized from the seed alone, identical on every process.
    label_dim = dataset.num_classes if config.conditional else 0
    spec = network_spec(config, dataset.resolution[0], dataset.channels, label_dim)
    torch.manual_seed(config.seed)
    net = build_denoiser(spec).train().requires_grad_(True).to(device=device, memory_format=memory_format)
    if config.precision == "bf16":
        cast_output_to_float32(net)
    ema = EMA(net)
    optimizer_class = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    # Adam's weight_decay is L2 added to the gradient (coupled), as the reference sweeps it.
    params = list(net.parameters())
    # foreach: one kernel launch per operation over all tensors (PyTorch's default on CUDA only).
    optimizer = optimizer_class(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=config.weight_decay, foreach=True)
    loss_fn = build_loss(config.precond)

    # Training data, on the device once (training sets here are small).
    images_u8 = dataset.images.to(device)
    labels_1hot = dataset.one_hot().to(device) if label_dim else None
    order = CyclicOrder(len(dataset), config.seed, rank=rank, world_size=world)

    # Random streams of this process (dropout: global RNG; loss noise: own generator).
    torch.manual_seed(derive_seed(config.seed, rank, _STREAM_DROPOUT))
    loss_generator = torch.Generator(device).manual_seed(derive_seed(config.seed, rank, _STREAM_LOSS))

    nimg, step, snapshots, elapsed_before = 0, 0, [], 0.0
    loss_sum = torch.zeros([], dtype=torch.float64, device=device)  # this tick's loss, for the log
    loss_count = 0
    if resume:
        state = checkpoint.load_checkpoint(checkpoint_path)
        _check_resumable(state["config"], config)
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        nimg, step, snapshots = int(state["nimg"]), int(state["step"]), list(state["snapshots"])
        elapsed_before = float(state["elapsed_s"])
        if len(state["rng"]) == world:
            _set_rng_state(state["rng"][rank], device, loss_generator)
            loss_sum.fill_(state["tick"]["loss_sum"][rank])
            loss_count = int(state["tick"]["loss_count"][rank])
        else:
            # Another process count: the data order still matches (it is global), but the
            # per-process noise streams cannot; reseed them from the step.
            distributed.print0(f"note: checkpoint written by {len(state['rng'])} processes, resuming with {world}; "
                               "random streams are reseeded, so results will not match an uninterrupted run bit for bit")
            torch.manual_seed(derive_seed(config.seed, rank, _STREAM_DROPOUT) + step)
            loss_generator.manual_seed(derive_seed(config.seed, rank, _STREAM_LOSS) + step)
        if bool(state["done"]) or nimg >= sched.total_nimg:
            distributed.print0(f"training already complete ({nimg / 1e3:.1f} kimg); nothing to resume")
            return TrainingResult(run_dir, snapshots, nimg, step, net, ema.module)
        if is_main:
            _truncate_log(log_path, nimg)
        distributed.print0(f"resuming from {checkpoint_path} at {nimg / 1e3:.3f} kimg (step {step})")
    elif is_main and log_path.exists():
        log_path.unlink()  # a fresh run starts a fresh log
    if is_main:
        snapshot_dir.mkdir(parents=True, exist_ok=True)

    ddp = None
    if world > 1:
        # The buffers (resampling filters, Fourier frequencies) are constants: no need to
        # re-send them before every forward pass (EDM's broadcast_buffers=False; newer
        # PyTorch spells it forward_sync_buffers).
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        ddp = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device] if device.type == "cuda" else None, **no_buffer_sync)
    train_net = ddp if ddp is not None else net
    if config.compile:
        train_net = torch.compile(train_net)

    def save_checkpoint(done: bool) -> None:
        # A collective (the RNG states of all processes), so every process calls it.
        rng = distributed.gather_objects(_rng_state(device, loss_generator))
        # The running tick's loss, so a resumed run logs exactly what an uninterrupted one would.
        tick_loss = distributed.gather_objects((float(loss_sum), loss_count))
        if is_main:
            checkpoint.save_atomic(dict(
                format=checkpoint.CHECKPOINT_FORMAT, version=checkpoint.FORMAT_VERSION,
                config=config.to_dict(), network=spec, nimg=nimg, step=step, done=done,
                net=net.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                rng=rng, snapshots=list(snapshots), elapsed_s=elapsed_before + time.time() - session_start,
                tick=dict(loss_sum=[t[0] for t in tick_loss], loss_count=[t[1] for t in tick_loss]),
            ), checkpoint_path)

    def save_snapshot() -> pathlib.Path:
        name = checkpoint.snapshot_name(nimg)
        path = snapshot_dir / name
        if is_main:
            checkpoint.save_atomic(dict(
                format=checkpoint.SNAPSHOT_FORMAT, version=checkpoint.FORMAT_VERSION,
                network=spec, config=config.to_dict(), nimg=nimg, kimg=nimg / 1e3, step=step,
                epochs=sched.epochs(nimg), dataset_size=len(dataset),
                ema={k: v.cpu() for k, v in ema.state_dict().items()},
                model={k: v.cpu() for k, v in net.state_dict().items()},
            ), path)
        snapshots.append(name)
        return path

    final_nimg = sched.total_steps * sched.batch_size
    per_process = sched.batch_size // world
    distributed.print0(
        f"training {sched.total_nimg / 1e3:g} kimg = {sched.epochs(sched.total_nimg):g} epochs of |D|={len(dataset)} "
        f"({sched.total_steps} steps of batch {sched.batch_size}, {world} process(es) on {device.type}); "
        f"lr warm-up {sched.lr_rampup_nimg / 1e3:g} kimg, EMA {ema_mode} half-life {sched.ema_halflife_nimg / 1e3:g} kimg")
    if sched.ema_halflife_nimg == 0 and ema_mode != "mode3":
        distributed.print0(f"note: an EMA half-life of 0 (the reference's int(ema * |D| / 50) kimg at |D|={len(dataset)}) "
                           "makes the EMA weights equal the raw weights; pass e.g. --ema 10ep for an average")

    bar = None
    if is_main and config.progress and _tqdm is not None:
        # Redrawn 10x a second on a terminal; in a log file, a line every 30 s is plenty.
        bar = _tqdm(total=final_nimg, initial=nimg, unit="img", unit_scale=True, dynamic_ncols=True,
                    desc="train", file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 30)
    session_start = time.time()
    last_checkpoint_time = session_start
    tick_start_time = time.time()
    tick_speed_nimg = nimg  # images trained in this session since the last tick, for img/s
    lr = beta = 0.0
    log_file = open(log_path, "a") if is_main else None
    try:
        message = ("stopping after this step and saving a checkpoint (Ctrl-C again to abort without saving)"
                   if distributed.is_main() else None)
        with StopRequest(message) as stop:
            while nimg < sched.total_nimg:
                # Gradients of this process's share, accumulated over rounds.
                optimizer.zero_grad(set_to_none=True)
                for round_index in range(sched.accumulation_rounds):
                    index = torch.from_numpy(order.indices(step, per_process, round_index, sched.batch_per_round)).to(device)
                    images = images_u8[index].to(torch.float32).div_(127.5).sub_(1)
                    images = images.contiguous(memory_format=memory_format)
                    labels = labels_1hot[index] if labels_1hot is not None else None
                    last_round = round_index == sched.accumulation_rounds - 1
                    sync = ddp.no_sync() if (ddp is not None and not last_round) else contextlib.nullcontext()
                    with sync:
                        with autocast:
                            loss = loss_fn(net=train_net, images=images, labels=labels, generator=loss_generator)
                        loss.sum().mul(1 / per_process).backward()
                    loss_sum += loss.detach().sum(dtype=torch.float64)
                    loss_count += loss.numel()

                lr = learning_rate(config.lr, nimg, sched.lr_rampup_nimg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                nan_to_num_gradients(params)
                optimizer.step()
                beta = ema_beta(ema_mode, cur_nimg=nimg, batch_size=sched.batch_size,
                                halflife_nimg=sched.ema_halflife_nimg, rampup_ratio=config.ema_rampup,
                                data_ratio=sched.data_ratio, final_ema=final_ema)
                ema.update(net, beta)
                previous_nimg = nimg
                nimg += sched.batch_size
                step += 1
                if bar is not None:
                    bar.update(sched.batch_size)
                if on_step is not None:
                    on_step(step, nimg)

                # Maintenance: which of log / snapshot / checkpoint / stop is due.
                done = nimg >= sched.total_nimg
                # Agreed by all processes, so they all save and stop at the same step.
                stopping = distributed.any_process(stop.signum is not None, device)
                # A stop is not a tick: the checkpoint carries the running tick over, so the
                # resumed run's log equals an uninterrupted run's.
                tick = done or nimg // sched.tick_nimg > previous_nimg // sched.tick_nimg
                kimg = nimg // 1000
                last_kimg = int(snapshots[-1][len("snapshot-"):-3]) if snapshots else -1
                # One snapshot per kimg at most (they are named by kimg, as the reference's);
                # one within the final kimg would be superseded by the final snapshot.
                snapshot_due = done or (nimg // sched.snapshot_nimg > previous_nimg // sched.snapshot_nimg
                                        and kimg != last_kimg and kimg != final_nimg // 1000)
                if not (tick or snapshot_due or stopping):
                    continue

                tick_end_time = time.time()
                if tick:
                    totals = distributed.sum_across(torch.stack([loss_sum, torch.tensor(float(loss_count), dtype=torch.float64, device=device)]))
                    mean_loss = float(totals[0] / max(float(totals[1]), 1.0))
                    seconds = max(tick_end_time - tick_start_time, 1e-9)
                    record = dict(
                        step=step, nimg=nimg, kimg=nimg / 1e3, epoch=sched.epochs(nimg), loss=mean_loss, lr=lr,
                        ema_beta=beta, img_per_s=(nimg - tick_speed_nimg) / seconds,
                        sec_per_kimg=seconds / max(nimg - tick_speed_nimg, 1) * 1e3,
                        time=elapsed_before + tick_end_time - session_start, timestamp=tick_end_time,
                    )
                    if log_file is not None:
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                    if bar is not None:
                        bar.set_postfix(kimg=f"{nimg / 1e3:.1f}", loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                    elif is_main and config.progress:
                        # No tqdm: EDM-style status line per tick.
                        print(f"kimg {nimg / 1e3:<9.1f} epoch {record['epoch']:<8.0f} loss {mean_loss:<8.4f} "
                              f"lr {lr:<9.3g} img/s {record['img_per_s']:<7.0f} time {record['time']:.0f} s", flush=True)
                    loss_sum.zero_()
                    loss_count = 0

                snapshot_path = save_snapshot() if snapshot_due else None
                time_for_checkpoint = (config.checkpoint_minutes > 0 and tick
                                       and time.time() - last_checkpoint_time >= 60 * config.checkpoint_minutes)
                if snapshot_due or stopping or distributed.any_process(time_for_checkpoint, device):
                    save_checkpoint(done=done)
                    last_checkpoint_time = time.time()
                if stopping:
                    raise TrainingInterrupted(stop.signum if stop.signum is not None else signal.SIGTERM,
                                              checkpoint_path, nimg)
                if snapshot_path is not None and on_snapshot is not None:
                    distributed.barrier()  # the snapshot file is complete before anyone reads it
                    on_snapshot(snapshot_path)
                # Maintenance time does not count against the next tick's speed.
                tick_speed_nimg, tick_start_time = nimg, time.time()
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
    distributed.barrier()
    return TrainingResult(run_dir, snapshots, nimg, step, net, ema.module)
