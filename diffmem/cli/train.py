"""diffmem-train: train a diffusion model on a training subset and measure how much of it
the model memorizes.

    diffmem-train --preset quickstart                       # 64 digits, tiny DDPM++-VP, CPU, minutes
    diffmem-train --data cifar10:../shared/data/cifar10-train.npz --size 1000 --cond 0 \\
        --arch ddpmpp --precond vp --duration 2000 --outdir runs   # the papers' basic setting
    torchrun --standalone --nproc_per_node=8 -m diffmem.cli.train --config run.yaml

Options come from (later wins) the defaults (DiffMemorize's basic configuration), --preset,
--config FILE (YAML or JSON, keys = flag names) and the command line. The run directory
(--outdir/<name from the config>, or --outdir itself with --nosubdir) receives config.json,
log.jsonl, snapshots/snapshot-XXXXXX.pt, checkpoint.pt, results.json and nn-grid-*.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import sys
from typing import Any

from .errors import one_line as _one_line

PROG = "diffmem-train"


def build_parser() -> argparse.ArgumentParser:
    from ..training.config import PRESETS

    parser = argparse.ArgumentParser(
        prog=PROG, argument_default=argparse.SUPPRESS,
        description="Train a diffusion model (EDM / DiffMemorize recipe) and report its memorization ratio.",
        epilog="Durations: 2000 (reference units: Mimg at |D|=50k, i.e. 40,000 epochs), 40000ep, 512kimg, "
               "2.5Mimg, 300steps. Run under torchrun for multi-process data parallelism.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (flags override it)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named set of defaults (flags and --config override it)")
    parser.add_argument("--resume", nargs="?", const=True, metavar="RUN_DIR",
                        help="continue the run from its checkpoint.pt; with RUN_DIR, that run with its saved config")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved options and schedule, then exit")

    add_training_options(parser)
    return parser


def add_training_options(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per TrainingConfig field (--num-channels for num_channels), grouped by
    section, with the field's help and default; fields in `exclude` are left out."""
    from ..training.config import TrainingConfig

    sections = {"data": "training set", "arch": "network", "optimizer": "optimization", "device": "performance",
                "outdir": "output", "samples": "evaluation"}
    group = parser
    for f in dataclasses.fields(TrainingConfig):
        if f.name in sections:
            group = parser.add_argument_group(sections[f.name])
        if f.name in exclude:
            continue
        meta = f.metadata
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text = meta["help"] + ("" if default is None else f" (default: {shown})")
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = dict(dest=f.name, help=help_text)
        if meta["kind"] == "bool":
            kwargs.update(nargs="?", const="1", metavar="0|1")
        elif meta.get("choices"):
            kwargs.update(metavar="|".join(meta["choices"]))
        else:
            kwargs.update(metavar={"int": "INT", "float": "FLOAT", "int_list": "LIST", "duration": "DURATION"}.get(meta["kind"], "STR"))
        group.add_argument(flag, **kwargs)


def _resolve_config(args: dict[str, Any]):
    from ..training.config import PRESETS, TrainingConfig, read_config_file

    resume = args.pop("resume", None)
    config_file = args.pop("config", None)
    preset = args.pop("preset", None)
    layers, sources = [], []
    if isinstance(resume, str):
        # Resume a named run: its saved options are the base, flags may change the rest.
        run_dir = pathlib.Path(resume)
        if run_dir.name == "checkpoint.pt":
            run_dir = run_dir.parent
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise ValueError(f"--resume {resume}: no config.json in {run_dir} (not a diffmem-train run directory)")
        try:
            layers.append(json.loads(saved.read_text())["config"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"--resume {resume}: {saved} is not a valid run configuration") from None
        sources.append(str(saved))
        args.setdefault("outdir", str(run_dir))
        args.setdefault("nosubdir", True)
    file_values = read_config_file(config_file) if config_file is not None else {}
    preset = preset if preset is not None else file_values.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; available: {', '.join(sorted(PRESETS))}")
        layers.insert(0, PRESETS[preset])
        sources.insert(0, f"preset {preset}")
    layers += [file_values, args]
    sources += [str(config_file), "command line"]
    return TrainingConfig.layered(*layers, sources=tuple(sources)), resume is not None


def _prepare_run_dir(config, run_dir: pathlib.Path, resume: bool, info: dict[str, Any]) -> None:
    """Create the run directory and write config.json (main process). A fresh run refuses
    a directory holding another run's checkpoint; --resume needs one."""
    from ..training import checkpoint

    checkpoint_file = run_dir / "checkpoint.pt"
    if resume and not checkpoint_file.is_file():
        raise ValueError(f"--resume: no checkpoint.pt in {run_dir}; nothing to resume")
    if not resume and checkpoint_file.exists():
        raise ValueError(f"{run_dir} already holds a run (checkpoint.pt); pass --resume to continue or evaluate it, "
                         "or choose another --outdir")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        # Leftovers of a run that never wrote a checkpoint would be mistaken for this run's.
        for stale in ["results.json", "log.jsonl", *run_dir.glob("nn-grid-*.png")]:
            (run_dir / stale).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "snapshots", ignore_errors=True)
    checkpoint.write_json_atomic(dict(config=config.to_dict(), **info), run_dir / "config.json")


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    dry_run = args.pop("dry_run", False)
    config, resume = _resolve_config(args)

    import torch

    from .. import __version__
    from ..nn import count_parameters
    from ..training import distributed
    from ..training.dataset import build_dataset
    from ..training.evaluate import RunEvaluator, verdict_line
    from ..training.loop import train
    from ..training.model import build_denoiser, network_spec

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = distributed.resolve_device(config.device)
    distributed.init(device)
    try:
        dataset = build_dataset(config)
        config.check_dataset(dataset.resolution[0], *dataset.resolution)
        side = dataset.resolution[0]
        missing = config.attention_missing_levels(side)
        if missing and distributed.is_main():  # e.g. EDM's CIFAR-10 default (16) on 8x8 digits
            print(f"diffmem-train: note: --attn-resolutions {','.join(map(str, missing))} matches no level of this "
                  f"U-Net at {side}x{side} (levels {','.join(map(str, config.unet_levels(side)))}): no self-attention "
                  "there", file=sys.stderr)
        if config.samples > 0 and config.eval != "none" and len(dataset) < 2:
            raise ValueError("the memorization criterion needs at least 2 training images (NN1 and NN2)")
        if config.conditional and dataset.num_classes < 1:
            raise ValueError("a conditional model needs labels; use --labels random or unique on unlabelled data")
        world = distributed.world_size()
        sched = config.schedule(len(dataset), world)
        run_dir = config.run_dir()
        label_dim = dataset.num_classes if config.conditional else 0
        spec = network_spec(config, dataset.resolution[0], dataset.channels, label_dim)
        params = count_parameters(build_denoiser(spec))
        info = dict(
            run_dir=str(run_dir), world_size=world, device=str(device), parameters=params,
            dataset=dict(name=dataset.name, size=len(dataset), channels=dataset.channels,
                         resolution=list(dataset.resolution), num_classes=dataset.num_classes),
            schedule=dataclasses.asdict(sched), torch=torch.__version__, diffmem=__version__, argv=sys.argv[1:],
        )
        if dry_run:
            distributed.print0(json.dumps(dict(config=config.to_dict(), **info), indent=2))
            return 0

        # The main process creates the directory; the others learn whether that worked.
        failure = None
        if distributed.is_main():
            try:
                _prepare_run_dir(config, run_dir, resume, info)
            except (ValueError, OSError) as err:
                failure = err
        failure = distributed.broadcast_object(None if failure is None else _one_line(failure))
        if failure is not None:
            raise ValueError(failure)

        distributed.print0(f"run directory: {run_dir}")
        distributed.print0(f"training set:  {dataset.name}, |D|={len(dataset)}, {dataset.channels}x"
                           f"{dataset.resolution[0]}x{dataset.resolution[1]}, labels {config.label_mode}")
        distributed.print0(f"network:       {config.arch}-{config.precond}, {params / 1e6:.3f} M parameters")

        evaluator = None
        if config.samples > 0 and config.eval != "none":
            evaluator = RunEvaluator(run_dir, dataset, config)
        result = train(config, dataset, run_dir, resume=resume,
                       on_snapshot=evaluator if (evaluator is not None and config.eval == "each") else None)
        if evaluator is None:
            distributed.print0(verdict_line({}))
            return 0
        distributed.print0(f"evaluating {len(result.snapshots)} snapshot(s) with {config.samples} samples each")
        results = evaluator.evaluate_all(result.snapshots)
        if results is not None:
            distributed.print0(f"results:       {run_dir / 'results.json'}")
            distributed.print0(verdict_line(results))
        return 0
    finally:
        distributed.shutdown()


def main(argv: list[str] | None = None) -> int:
    """Console entry point. Errors in the input end the program with one line on stderr
    and a non-zero status, without a traceback."""
    from ..training.loop import TrainingInterrupted

    # Under torchrun every process meets the same error; one of them reports it.
    report = os.environ.get("RANK", "0") == "0"
    try:
        return _main(argv)
    except TrainingInterrupted as err:
        if report:
            print(f"{PROG}: {err}", file=sys.stderr)
        return 128 + int(err.signum)
    except KeyboardInterrupt:
        if report:
            print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as err:
        if report:
            print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
