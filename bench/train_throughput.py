"""Benchmark of training throughput (images/s): DDPM++ on CIFAR-10-sized images, diffmem's
fast settings against plain fp32 eager (the reference recipe) and torch.compile, in one run.

    python bench/train_throughput.py --help

Prints a table and writes a JSON record (see bench/README.md).
Importable too: `from bench import train_throughput; train_throughput.main([...])`.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench import cli, contention, kernel_profile, knn, knn_data, knn_report, machine
from bench.knn_methods import Skipped, _CompileTimeout, _run_with_limit

# The size: DDPM++ width 128, 2 blocks per level, CIFAR-10 32x32, batch 128.
FULL_SIZE = dict(channels=128, blocks=2, resolution=32, batch=128)
# A CPU run of the full size takes hours on a few cores; its default is reduced to finish
# in minutes. The full size stays available with flags.
DEFAULT_SIZES = {"cuda": FULL_SIZE, "cpu": dict(FULL_SIZE, channels=32, batch=32)}
DEFAULT_STEPS = {"cuda": dict(warmup=10, steps=50), "cpu": dict(warmup=2, steps=3)}
DROPOUT = 0.13
LR = 2e-4
IMG_CHANNELS = 3
TARGET_SPEEDUP = 2.5  # fastest diffmem setting / fp32_eager, on an H100 at the full size
COMPILE_LIMIT_S = 900
POOL_BATCHES = 8  # images drawn from a pool of this many batches, on the device
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Variant:
    """One way of running the same training step. precision / channels_last / compile
    are the fields of diffmem's TrainingConfig that select it."""
    name: str
    precision: str        # "fp32" (TF32 off) | "tf32" | "bf16" (autocast, TF32 off)
    channels_last: bool
    compile: bool
    role: str             # "reference" | "baseline" | "candidate" (a diffmem setting)
    description: str
    cuda_only: bool = False


VARIANTS = {v.name: v for v in [
    Variant("fp32_eager", "fp32", False, False, "reference",
            "reference recipe: float32, TF32 off (matmul and cuDNN), NCHW, eager"),
    Variant("fp32_compile", "fp32", False, True, "baseline",
            "the reference under torch.compile"),
    Variant("tf32", "tf32", False, False, "candidate",
            "float32 weights, TF32 matmuls and convolutions, eager", cuda_only=True),
    Variant("bf16_autocast", "bf16", False, False, "candidate",
            "torch.autocast(bfloat16), float32 weights, NCHW, eager"),
    Variant("bf16_channels_last", "bf16", True, False, "candidate",
            "bf16 autocast, channels-last model and images, eager"),
    Variant("bf16_channels_last_compile", "bf16", True, True, "candidate",
            "bf16 autocast, channels-last, torch.compile"),
]}
REFERENCE, COMPILE_BASELINE = "fp32_eager", "fp32_compile"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=cli.positive_int, default=None,
                   help="torch threads (default: 2 on CPU, torch's own on CUDA)")
    p.add_argument("--channels", type=cli.positive_int, help="model_channels (default: CUDA 128, CPU 32)")
    p.add_argument("--blocks", type=cli.positive_int, help="residual blocks per level (default: 2)")
    p.add_argument("--resolution", type=cli.positive_int, help="image side (default: 32)")
    p.add_argument("--batch", type=cli.positive_int, help="images per step (default: CUDA 128, CPU 32)")
    p.add_argument("--warmup", type=cli.positive_int,
                   help="untimed steps first, incl. compilation; at least 1: the first step compiles and "
                        "is never timed (default: CUDA 10, CPU 2)")
    p.add_argument("--steps", type=cli.positive_int,
                   help="timed steps; the median is reported (default: CUDA 50, CPU 3)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma list (default: all: {','.join(VARIANTS)})")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune",
                            "max-autotune-no-cudagraphs"],
                   help="torch.compile mode of the *_compile variants (default: default)")
    p.add_argument("--compile-limit", type=cli.positive_int, default=COMPILE_LIMIT_S,
                   help=f"seconds the first (compiling) step may take before the variant is "
                        f"skipped (default: {COMPILE_LIMIT_S})")
    p.add_argument("--data", choices=["auto", "random", "cifar10"], default="auto",
                   help="auto: CIFAR-10 where cifar10-train.npz exists and --resolution is 32, "
                        "else random uint8 pixels (default: auto)")
    p.add_argument("--data-dir", type=Path, default=knn_data.DEFAULT_DATA_DIR,
                   help="folder with cifar10-train.npz (default: ../shared/data)")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    cli.add_profile_flag(p, "one more step of each variant")
    p.add_argument("--out", type=Path,
                   help="JSON path (default: bench/results/train-throughput-<device-slug>.json)")
    args = p.parse_args(argv)
    machine.resolve_device_defaults(args, {**DEFAULT_SIZES[args.device], **DEFAULT_STEPS[args.device]})
    if args.resolution % 4:
        p.error("--resolution must be a multiple of 4 (three U-Net levels)")
    args.variant_names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variant_names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.variant_names = [v for v in VARIANTS if v in args.variant_names]  # reference first
    if args.data == "auto":
        cifar_ok = args.resolution == 32 and (args.data_dir / "cifar10-train.npz").exists()
        args.data_source = "cifar10" if cifar_ok else "random"
    else:
        args.data_source = args.data
    return args


def sizes_of(args) -> dict:
    return {key: getattr(args, key) for key in FULL_SIZE}


def default_out(device_slug: str, args) -> Path:
    """Device in the name; sizes other than the device's default, non-default data and
    compile mode get a suffix so they never overwrite the default-size result."""
    parts = [f"train-throughput-{device_slug}"]
    default = DEFAULT_SIZES[args.device]
    tags = {"channels": "c", "blocks": "nb", "resolution": "r", "batch": "b"}
    parts += [f"{tags[key]}{value}" for key, value in sizes_of(args).items()
              if value != default[key]]
    if args.data != "auto":
        parts.append(args.data_source)
    if args.compile_mode != "default":
        parts.append(args.compile_mode)
    if args.variant_names != list(VARIANTS):  # a partial run must not replace a full one
        parts.append("subset")
    return RESULTS_DIR / ("-".join(parts) + ".json")


# --- model, data and one training step ----------------------------------------------

def model_kwargs(channels: int, blocks: int, resolution: int) -> dict:
    from diffmem.nn import configs
    return configs.ddpmpp(model_channels=channels, num_blocks=blocks, dropout=DROPOUT,
                          img_resolution=resolution, in_channels=IMG_CHANNELS,
                          out_channels=IMG_CHANNELS)


def build_net(kwargs: dict, seed: int) -> torch.nn.Module:
    """VPPrecond(SongUNet), initialized from the seed alone: every variant starts from
    the same weights."""
    from diffmem.diffusion import VPPrecond
    from diffmem.nn import SongUNet
    torch.manual_seed(seed)
    return VPPrecond(SongUNet(**kwargs), img_resolution=kwargs["img_resolution"],
                     img_channels=kwargs["in_channels"], label_dim=0)


def load_images(source: str, count: int, resolution: int, seed: int,
                data_dir: Path = knn_data.DEFAULT_DATA_DIR) -> tuple[torch.Tensor, dict]:
    """(count, 3, R, R) uint8 images: the first CIFAR-10 training images, or random pixels."""
    if source == "cifar10":
        if resolution != 32:
            raise ValueError(f"--data cifar10 has 32x32 images; got --resolution {resolution}")
        rows = knn_data._load_cifar_rows(Path(data_dir), count, 32 * 32 * IMG_CHANNELS)
        images = torch.from_numpy(rows.reshape(count, 32, 32, IMG_CHANNELS)).permute(0, 3, 1, 2)
        return images.contiguous(), {"source": "cifar10", "data_dir": str(data_dir),
                                     "pool_images": count}
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, IMG_CHANNELS, resolution, resolution), dtype=np.uint8)
    return torch.from_numpy(images), {"source": "random", "seed": seed, "pool_images": count}


def batch_indices(pool: int, batch: int, count: int, seed: int) -> torch.Tensor:
    """The same sequence of batches for every variant."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(pool, generator=g)[:batch] for _ in range(count)])


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def tf32_state() -> dict:
    return {"matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32}


def _cast_output_to_float32(denoiser: torch.nn.Module):
    """Under bf16 autocast the U-Net returns bf16, which VPPrecond rejects: cast the raw
    network's output back to float32 with a hook (as diffmem's training loop does)."""
    return denoiser.model.register_forward_hook(lambda module, args, output: output.float())


class Trainer:
    """One variant's model, optimizer and data on the device; `step()` is one full
    training step: batch to [-1, 1], VP loss forward, backward of sum / batch, Adam step.

    Use as a context manager: TF32 flags are set on entry and restored on exit, and the
    model, optimizer and compiled graphs are released."""

    def __init__(self, variant: Variant, kwargs: dict, images_u8: torch.Tensor,
                 indices: torch.Tensor, device: str, seed: int = 0,
                 compile_mode: str = "default"):
        if variant.cuda_only and device != "cuda":
            raise Skipped("CUDA only (TF32 is a GPU tensor-core mode)")
        self.variant, self.device = variant, torch.device(device)
        self.kwargs, self.seed, self.compile_mode = kwargs, seed, compile_mode
        self.images_u8 = images_u8.to(self.device)
        self.indices = indices.to(self.device)
        self.batch = indices.shape[1]
        self.memory_format = torch.channels_last if variant.channels_last else torch.contiguous_format
        self.steps_done = 0

    def __enter__(self):
        self._tf32_before = tf32_state()
        self.net = self.train_net = self.optimizer = None
        try:
            self._build()
        except BaseException:
            self.__exit__()  # restore the flags and free what was built
            raise
        return self

    def _build(self) -> None:
        from diffmem.diffusion import VPLoss
        set_tf32(self.variant.precision == "tf32")  # fp32 and bf16: TF32 off, as diffmem
        net = build_net(self.kwargs, self.seed)
        net = net.train().requires_grad_(True).to(device=self.device, memory_format=self.memory_format)
        if self.variant.precision == "bf16":
            _cast_output_to_float32(net)
        self.net = net
        self.optimizer = torch.optim.Adam(net.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8)
        self.loss_fn = VPLoss()
        self.train_net = net
        if self.variant.compile:
            mode = None if self.compile_mode == "default" else self.compile_mode
            self.train_net = torch.compile(net, mode=mode)
        self.generator = torch.Generator(self.device).manual_seed(self.seed)
        torch.manual_seed(self.seed + 1)  # dropout stream: the same for every eager variant

    def autocast(self):
        if self.variant.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self) -> torch.Tensor:
        idx = self.indices[self.steps_done % len(self.indices)]
        self.steps_done += 1
        self.optimizer.zero_grad(set_to_none=True)
        images = self.images_u8[idx].to(torch.float32).div_(127.5).sub_(1)
        images = images.contiguous(memory_format=self.memory_format)
        with self.autocast():
            loss = self.loss_fn(net=self.train_net, images=images, generator=self.generator)
        loss.sum().mul(1 / self.batch).backward()
        self.optimizer.step()
        return loss.detach().mean()

    def __exit__(self, *exc):
        self.net = self.train_net = self.optimizer = None
        if self.variant.compile:
            torch._dynamo.reset()  # drop compiled graphs; the next variant compiles afresh
        torch.backends.cuda.matmul.allow_tf32 = self._tf32_before["matmul"]
        torch.backends.cudnn.allow_tf32 = self._tf32_before["cudnn"]
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return False


# --- timing ----------------------------------------------------------------------------

def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _first_step(trainer: Trainer, sync, limit_s: int) -> tuple[float, torch.Tensor]:
    """The first step (compiles the *_compile variants), aborted after limit_s."""
    out = []

    def run():
        out.append(trainer.step())
        sync()

    t0 = time.perf_counter()
    if trainer.variant.compile:
        try:
            _run_with_limit(run, limit_s)
        except _CompileTimeout:
            raise Skipped(f"torch.compile: first step took > {limit_s} s") from None
        except Exception as exc:
            raise Skipped(f"torch.compile failed: {type(exc).__name__}: {exc}"[:500]) from exc
    else:
        run()
    return time.perf_counter() - t0, out[0]


def measure(variant: Variant, args, kwargs: dict, images_u8, indices) -> dict:
    """Warm up and time one variant; a variant that cannot run is recorded as skipped."""
    sync = knn.sync_for(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        with Trainer(variant, kwargs, images_u8, indices, args.device, args.seed,
                     args.compile_mode) as trainer:
            tf32 = tf32_state()
            t0 = time.perf_counter()
            first_s, first_loss = _first_step(trainer, sync, args.compile_limit)
            for _ in range(args.warmup - 1):
                trainer.step()
            sync()
            warmup_s = time.perf_counter() - t0
            times, losses = [], []
            with contention.OtherLoad() as load:
                for _ in range(args.steps):
                    sync()
                    t = time.perf_counter()
                    losses.append(trainer.step())
                    sync()
                    times.append(time.perf_counter() - t)
            losses = [float(first_loss)] + [float(x) for x in losses]
            profiled = (kernel_profile.profile_call(trainer.step, torch.device(args.device), sync)
                        if args.profile else None)
    except Skipped as exc:
        _log(f"  {variant.name}: skipped ({exc})")
        return {"skipped": str(exc)}
    except Exception as exc:  # a broken variant (OOM, unsupported op) must not hide the others
        _log(f"  {variant.name}: failed ({type(exc).__name__}: {exc})")
        return {"skipped": f"failed: {type(exc).__name__}: {exc}"[:500]}
    median = statistics.median(times)
    result = {
        "median_step_s": median, "min_step_s": min(times), "step_times_s": times,
        "images_per_s": args.batch / median,
        "first_step_s": first_s, "warmup_s": warmup_s, "warmup_steps": args.warmup,
        # the first step of an eager variant costs about one step; the excess is compilation
        "compile_s": max(0.0, first_s - median) if variant.compile else None,
        "other_cpu_load": load.fraction,
        "loss_first_step": losses[0], "loss_last_step": losses[-1],
        "loss_finite": all(np.isfinite(losses)),
        "tf32": tf32,
        "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30
                            if args.device == "cuda" else None),
    }
    _log(f"  {variant.name}: {median * 1e3:.1f} ms/step, {result['images_per_s']:.1f} img/s "
         f"(first step {first_s:.1f} s)")
    if profiled is not None:
        result["profile"] = profiled
        _log(f"  {variant.name} profile of one step: {kernel_profile.summary(profiled)}")
    return result


def add_ratios(results: dict) -> dict:
    """Speed-ups against the reference and the compiled reference; the fastest variants."""
    ran = {n: r for n, r in results.items() if "images_per_s" in r}
    for base, key in ((REFERENCE, "speedup_vs_fp32_eager"), (COMPILE_BASELINE, "speedup_vs_fp32_compile")):
        ref = ran.get(base, {}).get("images_per_s")
        for r in ran.values():
            r[key] = r["images_per_s"] / ref if ref else None
    candidates = {n: r for n, r in ran.items() if VARIANTS[n].role == "candidate"}
    fastest = max(ran, key=lambda n: ran[n]["images_per_s"], default=None)
    best = max(candidates, key=lambda n: candidates[n]["images_per_s"], default=None)
    return {"fastest_overall": fastest, "fastest_diffmem_setting": best}


def evaluate_target(results: dict, best: str | None, args, device_name: str) -> dict:
    """fastest diffmem setting >= 2.5x fp32_eager: judged on CUDA; on the CPU the ratio is
    reported with no verdict (the target is for an H100)."""
    speedup = results[best].get("speedup_vs_fp32_eager") if best else None
    full = sizes_of(args) == FULL_SIZE
    out = {"label": f"fastest diffmem setting / fp32_eager >= {TARGET_SPEEDUP:g} (images/s)",
           "value": TARGET_SPEEDUP, "variant": best, "measured": speedup, "pass": None,
           "device": device_name, "full_size": full}
    if args.device != "cuda":
        out["note"] = "target applies to H100 (CUDA) runs; on the CPU the ratio is reported only"
    else:
        out["pass"] = None if speedup is None else speedup >= TARGET_SPEEDUP
        notes = []
        if "H100" not in device_name.upper():
            notes.append(f"target is stated for an H100; this ran on {device_name}")
        if not full:
            notes.append("not the issue's size (128 ch, 2 blocks, 32x32, batch 128): indicative only")
        if notes:
            out["note"] = "; ".join(notes)
    return out


# --- report ----------------------------------------------------------------------------

HEADER = ["variant", "settings", "ms/step", "images/s", "vs fp32_eager", "vs fp32_compile",
          "first step s", "other load", "peak GiB", "loss", "best"]


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _settings(v: Variant) -> str:
    return "/".join([v.precision, "NHWC" if v.channels_last else "NCHW",
                     "compile" if v.compile else "eager"])


def target_line(target: dict) -> str:
    if target["variant"] is None:
        return f"target {target['label']}: n/a (no diffmem setting ran)"
    if target["measured"] is None:
        verdict = "n/a (fp32_eager did not run)"
    else:
        verdict = {True: "PASS", False: "FAIL", None: "no verdict"}[target["pass"]]
    note = f" ({target['note']})" if target.get("note") else ""
    return (f"target {target['label']}: {target['variant']} "
            f"{_fmt(target['measured'], '.2f')}x -> {verdict}{note}")


def table(title: str, results: dict, picks: dict, target: dict) -> str:
    rows = []
    for name, r in results.items():
        v = VARIANTS[name]
        if "skipped" in r:
            rows.append([name, "skipped: " + r["skipped"][:100]])
            continue
        best = ("*" if name == picks["fastest_diffmem_setting"] else "") + \
               ("fastest" if name == picks["fastest_overall"] else "")
        rows.append([name, _settings(v), _fmt(r["median_step_s"] * 1e3, ".1f"),
                     _fmt(r["images_per_s"], ".1f"), _fmt(r.get("speedup_vs_fp32_eager"), ".2f"),
                     _fmt(r.get("speedup_vs_fp32_compile"), ".2f"), _fmt(r["first_step_s"], ".1f"),
                     _fmt(r["other_cpu_load"], ".0%"), _fmt(r["peak_memory_gib"], ".2f"),
                     "ok" if r["loss_finite"] else "NON-FINITE", best])
    full = [HEADER] + [r for r in rows if len(r) == len(HEADER)]
    widths = [max(len(r[i]) for r in full) for i in range(len(HEADER))]

    def line(r):
        if len(r) != len(HEADER):
            return f"{r[0].ljust(widths[0])}  {r[1]}"
        return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()

    lines = [title, line(HEADER), *map(line, rows),
             "(* = fastest diffmem setting; vs = images/s ratio, > 1 faster)"]
    lines.append(target_line(target))
    worst = max((r.get("other_cpu_load") or 0 for r in results.values()), default=0)
    if worst > knn_report.BUSY_WARN:
        lines.append(f"WARNING: other processes used up to {worst:.0%} of the CPU while "
                     "timing; these timings understate this machine's speed.")
    return "\n".join(lines)


NOTES = [
    "Each variant: a fresh VPPrecond(SongUNet) from the same seed, Adam(lr 2e-4); --warmup "
    "untimed steps (the first compiles the *_compile variants and is reported as first_step_s), "
    "then --steps timed steps; median step time reported.",
    "A step: uint8 batch (from a pool on the device) -> float [-1, 1], VPLoss forward, "
    "backward of loss.sum() / batch, Adam step; CUDA steps are timed with "
    "torch.cuda.synchronize() on both sides.",
    "images_per_s = batch / median step time; speedup_vs_* = images/s ratio to that variant "
    "in the same run (> 1: faster).",
    "fp32 and bf16 variants run with TF32 off (matmul and cuDNN), as diffmem's training loop "
    "does for precision fp32 / bf16; tf32 turns it on. cudnn.benchmark is on for every CUDA "
    "variant (as in the reference EDM recipe).",
    "bf16 variants cast the U-Net output back to float32 (forward hook), as diffmem's "
    "training loop does; weights and optimizer state stay float32.",
    "compile_s = first_step_s - median step time for the *_compile variants; it is shorter "
    "when inductor's on-disk caches hold the graphs from an earlier run.",
    "loss_first_step is comparable between variants (same weights, batch and noise; eager "
    "variants also draw the same dropout masks, compiled ones may not).",
    "other_cpu_load = CPU time other processes used while timing, as a share of all cores.",
    f"Target: fastest diffmem setting >= {TARGET_SPEEDUP:g}x fp32_eager images/s on an H100 at "
    "the full size; on the CPU the ratio is reported without a verdict.",
]


def environment(args, device_name: str) -> dict:
    cuda = args.device == "cuda"
    dev = {"type": args.device, "name": device_name, "threads": args.threads}
    if cuda:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        dev.update(capability=f"{props.major}.{props.minor}",
                   memory_gib=props.total_memory / 2**30)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "benchmark": "train_throughput",
        "command": shlex.join([sys.executable, *sys.argv]),
        "git_commit": machine.git_commit(),
        "git_dirty": machine.git_dirty(),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_1_5_15": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "device": dev,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark if cuda else None,
        "triton": triton_version,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "numpy": np.__version__,
        "diffmem": machine.diffmem_info(),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    knn.set_threads(args.threads)
    device_name = machine.device_name(args.device, args.threads)
    out_path = args.out or default_out(machine.slug(f"{args.device} {device_name}"), args)
    cudnn_before = torch.backends.cudnn.benchmark
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # the reference recipe's setting too
    env = environment(args, device_name)  # first, so the load average predates our own work

    kwargs = model_kwargs(args.channels, args.blocks, args.resolution)
    from diffmem.nn import count_parameters
    n_params = count_parameters(build_net(kwargs, args.seed))
    pool = POOL_BATCHES * args.batch
    try:
        images_u8, data_info = load_images(args.data_source, pool, args.resolution, args.seed,
                                           args.data_dir)
    except (OSError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    indices = batch_indices(pool, args.batch, POOL_BATCHES * 2, args.seed)

    sizes = sizes_of(args)
    reduced = sizes != FULL_SIZE
    record = {**env, "sizes": sizes, "full_size": FULL_SIZE, "reduced_size": reduced,
              "size_note": (("CPU default, reduced from the issue's size to finish in minutes; "
                             "pass --channels 128 --batch 128 for the full size")
                            if reduced and sizes == DEFAULT_SIZES["cpu"] and args.device == "cpu"
                            else "reduced size set by flags" if reduced else "the issue's size"),
              "model": {"class": "VPPrecond(SongUNet) DDPM++", "song_unet_kwargs": kwargs,
                        "parameters": n_params},
              "optimizer": {"class": "Adam", "lr": LR, "betas": [0.9, 0.999], "eps": 1e-8},
              "loss": "VPLoss, per-element loss .sum() / batch",
              "input_dtype": "uint8 -> float32 in [-1, 1]", "data": data_info,
              "warmup_steps": args.warmup, "timed_steps": args.steps,
              "compile_mode": args.compile_mode, "compile_limit_s": args.compile_limit,
              "variant_settings": {n: asdict(VARIANTS[n]) for n in args.variant_names},
              "notes": NOTES, "variants": {}}
    _log(f"training throughput | {device_name} | {sizes} | {n_params / 1e6:.2f} M parameters")
    try:
        for name in args.variant_names:
            record["variants"][name] = measure(VARIANTS[name], args, kwargs, images_u8, indices)
            knn_report.write_json(record, out_path, complete=False)
    finally:
        torch.backends.cudnn.benchmark = cudnn_before
    picks = add_ratios(record["variants"])
    record.update(picks)
    record["target"] = evaluate_target(record["variants"], picks["fastest_diffmem_setting"],
                                       args, device_name)
    title = (f"\n== training throughput | DDPM++ {args.channels} ch, {args.blocks} blocks, "
             f"{args.resolution}x{args.resolution}, batch {args.batch} | {device_name} | "
             f"{args.data_source} data{' | REDUCED size' if reduced else ''} ==")
    print(table(title, record["variants"], picks, record["target"]), flush=True)
    knn_report.write_json(record, out_path)
    print(f"\nwrote {out_path}")
    return record


if __name__ == "__main__":
    sys.exit(cli.run_main("train_throughput", main))
