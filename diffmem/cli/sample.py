"""`diffmem sample`: sample a closed-form denoiser of a training set and measure how much of
the training set its samples copy, in the format of a trained run.

    diffmem sample --data digits --size 64 --subset first --samples 1000 --outdir runs/optimal-digits
    diffmem sample --data cifar10:../shared/data/cifar10-train.npz --size 1000 --tikhonov 0.01 \\
        --samples 10000 --outdir runs/optimal-tikhonov-0.01
    python -m diffmem.cli.sample ...        # the same, without the `diffmem` dispatcher

--model optimal is the closed-form optimal denoiser of the training set (the posterior mean
of Gu et al. and Baptista et al.; it memorizes everything) with its regularized forms
(--tikhonov, --truncate, --topk). With labels (--labels true|random|unique) each seed is
sampled with a uniformly random class drawn from its own stream, as trained runs are
evaluated, and denoised by the class-conditional optimum.

DIR (--outdir) receives config.json, results.json (one snapshot entry named after the
model, readable by `diffmem report DIR` and the sweep tools) and nn-grid-<model>.png; the
verdict line is the one diffmem-train prints.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from typing import Any

from ..optimal import CONVENTIONS
from ..training.config import LABEL_MODES, SAMPLERS, SUBSETS

PROG = "diffmem sample"
MODELS = ("optimal",)  # trained snapshots can be added here later
PRECISIONS = ("float64", "float32")  # --precision: EmpiricalOptimalDenoiser(dtype=...)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's options (the training-set ones as diffmem-train spells them)."""
    parser.add_argument("--model", choices=MODELS, default="optimal",
                        help="what to sample: optimal = the closed-form optimal denoiser of the training set")

    data = parser.add_argument_group("training set")
    data.add_argument("--data", required=True, help="dataset: digits | cifar10 | cifar10:PATH | PATH.npz | PATH.zip | DIR")
    data.add_argument("--data-root", default=None, help="CIFAR-10 location (torchvision root or .npz) for --data cifar10")
    data.add_argument("--size", type=int, default=None, help="|D|, the number of training images (default: all)")
    data.add_argument("--subset", choices=SUBSETS, default="balanced",
                      help="balanced = the reference's class-balanced rule, first = the first |D| in file order")
    data.add_argument("--resolution", type=int, default=None, help="resize the images to this resolution")
    data.add_argument("--labels", choices=LABEL_MODES, default="none",
                      help="class labels; other than none, the class-conditional optimum is sampled (default: none)")
    data.add_argument("--num-classes", type=int, default=None,
                      help="classes for --labels random; class-diversity subset for true/none")

    reg = parser.add_argument_group("regularization (Baptista et al.)")
    reg.add_argument("--tikhonov", type=float, default=None, metavar="C",
                     help="Tikhonov: score (D - x) / (sigma^2 + C), C >= 0")
    reg.add_argument("--truncate", type=float, default=None, metavar="TAU",
                     help="empirical-Bayes truncation of the kernel sum at TAU > 0")
    reg.add_argument("--truncate-convention", choices=CONVENTIONS, default="kernel",
                     help="kernel = unnormalized kernels (Baptista et al.'s code), density = the mixture density")
    reg.add_argument("--topk", type=int, default=None, metavar="K",
                     help="softmax over the K nearest training images only (1 <= K <= |D|)")

    ev = parser.add_argument_group("sampling and evaluation")
    ev.add_argument("--samples", type=int, default=10000, help="samples, seeds 0..N-1 (default: 10000)")
    ev.add_argument("--sample-batch", type=int, default=512, help="sampling batch size (default: 512)")
    ev.add_argument("--steps", type=int, default=18, help="sampler steps (default: 18)")
    ev.add_argument("--sampler", choices=SAMPLERS, default="heun", help="ODE sampler (default: heun)")
    ev.add_argument("--sigma-min", type=float, default=0.002, help="lowest noise level of the schedule (default: 0.002)")
    ev.add_argument("--sigma-max", type=float, default=80.0, help="highest noise level of the schedule (default: 80)")
    ev.add_argument("--precision", choices=PRECISIONS, default="float64",
                    help="compute precision of the optimal denoiser: float64 (default) or float32 (the native "
                         "op in float32, relative error <= 5e-4, faster; on CUDA its tensor-core kernel where "
                         "enabled (DIFFMEM_CUDA_OPTIMAL=1), else the float64 reference)")
    ev.add_argument("--grid-rows", type=int, default=16, help="rows of [sample | NN1 | NN2] in the PNG grid (default: 16)")

    perf = parser.add_argument_group("performance and output")
    perf.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    perf.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: PyTorch's choice)")
    perf.add_argument("--progress", type=int, choices=(0, 1), default=0, help="show a progress bar (default: 0)")
    perf.add_argument("--outdir", required=True, metavar="DIR", help="folder for config.json, results.json and the grid")


# ---- options -----------------------------------------------------------------------------


def regularization(args: argparse.Namespace) -> dict[str, Any]:
    """The denoiser's options (diffmem.optimal.denoise's names), checked; topk is checked
    against |D| once the training set is known."""
    if args.tikhonov is not None and not (math.isfinite(args.tikhonov) and args.tikhonov >= 0):
        raise ValueError(f"--tikhonov must be finite and >= 0, got {args.tikhonov}")
    if args.truncate is not None and not (math.isfinite(args.truncate) and args.truncate > 0):
        raise ValueError(f"--truncate must be finite and > 0, got {args.truncate}")
    if args.topk is not None and args.topk < 1:
        raise ValueError(f"--topk must be at least 1, got {args.topk}")
    return dict(tikhonov=args.tikhonov, truncate=args.truncate,
                truncate_convention=args.truncate_convention if args.truncate is not None else None, topk=args.topk)


def check_schedule(args: argparse.Namespace) -> None:
    """The noise range must be a real interval of positive levels."""
    for flag, value in (("--sigma-min", args.sigma_min), ("--sigma-max", args.sigma_max)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be finite and > 0, got {value}")
    if args.sigma_min >= args.sigma_max:
        raise ValueError(f"--sigma-min ({args.sigma_min}) must be below --sigma-max ({args.sigma_max})")


def training_config(args: argparse.Namespace):
    """A TrainingConfig holding the training-set and evaluation options, so the training set
    is cut exactly as diffmem-train cuts it and results.json matches a trained run's."""
    from ..training.config import TrainingConfig

    values = dict(data=args.data, data_root=args.data_root, size=args.size, subset=args.subset,
                  resolution=args.resolution, labels=args.labels, num_classes=args.num_classes,
                  samples=args.samples, sample_batch=args.sample_batch, steps=args.steps, sampler=args.sampler,
                  device=args.device, threads=args.threads, grid_rows=args.grid_rows, outdir=args.outdir,
                  nosubdir=True, progress=bool(args.progress))
    config = TrainingConfig.from_dict(values, source="command line")
    if config.samples < 1:
        raise ValueError(f"--samples must be at least 1, got {config.samples}")
    return config


# ---- the model ---------------------------------------------------------------------------


def optimal_denoiser(dataset, options: dict[str, Any], conditional: bool, sigma_min: float, sigma_max: float, device,
                     precision: str = "float64"):
    """The (regularized, class-conditional when `conditional`) optimal denoiser of `dataset`
    with its training images on `device`, computing in `precision` (PRECISIONS)."""
    import torch

    from ..diffusion import EmpiricalOptimalDenoiser

    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")

    if options["topk"] is not None and options["topk"] > len(dataset):
        raise ValueError(f"--topk must be between 1 and |D| = {len(dataset)}, got {options['topk']}")
    labels = None
    if conditional:
        labels = dataset.labels
        check_classes(labels, dataset.num_classes)
    kwargs = {k: v for k, v in options.items() if v is not None}
    denoiser = EmpiricalOptimalDenoiser(dataset.images.to(device), sigma_min, sigma_max, train_labels=labels,
                                        dtype=getattr(torch, precision), **kwargs)
    if conditional:
        # Random classes are drawn over the dataset's one-hot size, as for a trained run
        # (the denoiser alone would take max(label) + 1); check_classes made them equal.
        denoiser.label_dim = dataset.num_classes
    return denoiser


def check_classes(labels, num_classes: int) -> None:
    """Every class a random draw can pick needs training images: the conditional optimum of
    a class without any is undefined."""
    import torch

    if labels is None or num_classes < 1:
        raise ValueError("the conditional optimum needs labels; use --labels random or unique on unlabelled data")
    counts = torch.bincount(labels.reshape(-1).long(), minlength=num_classes)
    empty = (counts == 0).nonzero().reshape(-1).tolist()
    if empty:
        raise ValueError(f"class {empty[0]} of {num_classes} has no training image ({len(empty)} empty classes); "
                         "the conditional optimum is undefined there: use fewer classes or a larger |D|")


# ---- one evaluation ----------------------------------------------------------------------


def evaluate_model(denoiser, dataset, config, *, name: str, grid_path: pathlib.Path | None,
                   sigma_min: float, sigma_max: float, device) -> tuple[dict[str, Any], Any]:
    """Sample seeds 0..samples-1, score them against the training set and draw the grid.
    Returns the results.json snapshot entry and the memorization report."""
    from ..diffusion import generate
    from ..training.evaluate import SAMPLERS_BY_NAME, evaluation_settings, score_samples

    start = time.time()
    samples = generate(denoiser, range(config.samples), batch_size=config.sample_batch, device=device,
                       class_labels="random", sampler=SAMPLERS_BY_NAME[config.sampler], progress=config.progress,
                       num_steps=config.steps, sigma_min=sigma_min, sigma_max=sigma_max)
    scores, report = score_samples(samples, dataset.images, config, grid_path=grid_path, device=device)
    # The fields of a trained snapshot's entry; a closed-form model has no training time.
    entry = dict(
        snapshot=name, nimg=0, kimg=0.0, step=0, epochs=0.0, **scores, seconds=time.time() - start,
        settings=dict(evaluation_settings(config), weights="closed form", sigma_min=sigma_min, sigma_max=sigma_max,
                      precision=_precision(denoiser)),
    )
    return entry, report


def run(args: argparse.Namespace) -> int:
    """Sample, score, write DIR's files and print the verdict. Errors are raised
    (ValueError, OSError) for the dispatcher to print as one line."""
    options = regularization(args)
    check_schedule(args)
    config = training_config(args)

    import torch

    from .. import __version__
    from ..training.checkpoint import write_json_atomic
    from ..training.dataset import build_dataset
    from ..training.distributed import resolve_device
    from ..training.evaluate import RESULTS_FILE, summarize, verdict_line

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    dataset = build_dataset(config)
    if len(dataset) < 2:
        raise ValueError("the memorization criterion needs at least 2 training images (NN1 and NN2)")
    denoiser = optimal_denoiser(dataset, options, config.conditional, args.sigma_min, args.sigma_max, device,
                                precision=args.precision)

    outdir = pathlib.Path(config.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    name = args.model
    info = dict(
        command=PROG, model=name, regularization=options, precision=args.precision,
        # TrainingConfig's `precision` is the training one (fp32/tf32/bf16); ours is the sampler's
        config=dict(vars(args), **{k: v for k, v in config.to_dict().items() if k in vars(args) and k != "precision"}),
        dataset=dict(name=dataset.name, size=len(dataset), channels=dataset.channels,
                     resolution=list(dataset.resolution), num_classes=dataset.num_classes),
        device=str(device), torch=torch.__version__, diffmem=__version__, argv=sys.argv[1:],
    )
    info["config"].pop("func", None)  # a dispatcher may store its handler in the namespace
    write_json_atomic(info, outdir / "config.json")
    print(f"training set:  {dataset.name}, |D|={len(dataset)}, labels {config.label_mode}")
    print(f"model:         {name} {_describe(options)}, {args.precision}, {config.samples} samples, "
          f"{config.sampler} {config.steps} steps")

    entry, _ = evaluate_model(denoiser, dataset, config, name=name, grid_path=outdir / f"nn-grid-{name}.png",
                              sigma_min=args.sigma_min, sigma_max=args.sigma_max, device=device)
    entry["regularization"] = options
    results = summarize([entry], dataset, config, complete=True)
    results.update(model=name, regularization=options, precision=args.precision)
    results["evaluation"].update(entry["settings"])
    write_json_atomic(results, outdir / RESULTS_FILE)
    print(f"results:       {outdir / RESULTS_FILE}")
    print(verdict_line(results))
    return 0


def _precision(denoiser) -> str | None:
    """'float64' / 'float32': the compute precision of a closed-form denoiser."""
    dtype = getattr(denoiser, "dtype", None)
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _describe(options: dict[str, Any]) -> str:
    """'(tikhonov=0.01, topk=5)' for the options in use, '(plain)' for none."""
    used = [f"{k}={v}" for k, v in options.items() if v is not None]
    return "(" + (", ".join(used) if used else "plain") + ")"


def build_parser() -> argparse.ArgumentParser:
    """The options alone (scripts such as bench/optimal_memorization.py parse with it)."""
    from .errors import command_parser

    return command_parser(PROG, __doc__, add_arguments)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (`python -m diffmem.cli.sample`)."""
    from .errors import standalone_main

    return standalone_main(PROG, __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
