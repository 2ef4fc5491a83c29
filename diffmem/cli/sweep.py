"""`diffmem emm` and `diffmem sweep`: EMM of one training configuration by an adaptive
search over |D|, or of every entry of a factor grid from a YAML/JSON spec.

    diffmem emm --preset emm-digits --min 8 --max 1024 --tolerance 0.25 --jobs 2 --outdir emm-runs
    diffmem sweep spec.yaml --outdir sweeps/width --devices 0,1,2,3
    diffmem sweep spec.yaml --outdir sweeps/width --entry $SLURM_ARRAY_TASK_ID    # one entry per task
    diffmem sweep spec.yaml --outdir sweeps/width --aggregate                     # then the tables

The output folder holds sweep.json (the spec), runs/ (one diffmem-train run directory
per trained model), jobs/ and logs/ (each run's options and output), summary.json,
emm.csv, emm.md and curves.csv. Rerunning the same command resumes: finished runs are
reused, interrupted ones continue from their checkpoints.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

from ..training.checkpoint import write_json_atomic


def add_execution_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("execution")
    group.add_argument("--outdir", required=True, metavar="DIR", help="the sweep's folder (created; reused on resume)")
    group.add_argument("--devices", default="cpu", metavar="cpu|0,1,...",
                       help="cpu, or GPU numbers: one run per GPU at a time (default: cpu)")
    group.add_argument("--jobs", type=int, default=1, metavar="N", help="parallel runs on the CPU, or per GPU (default: 1)")
    group.add_argument("--torchrun", action="store_true", default=False,
                       help="train each run on all --devices at once (DistributedDataParallel), one run at a time")


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC", help="sweep specification (YAML or JSON)")
    add_execution_options(parser)
    parser.add_argument("--entry", type=int, action="append", metavar="I",
                        help="run only entry I (repeatable), e.g. --entry $SLURM_ARRAY_TASK_ID")
    parser.add_argument("--list", action="store_true", help="print the entries and their number, then exit")
    parser.add_argument("--aggregate", action="store_true",
                        help="train nothing: collect the finished runs into summary.json and the tables")


def add_emm_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.config import PRESETS
    from .train import add_training_options

    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of training options (flags override it)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named set of training defaults")
    group = parser.add_argument_group("EMM search")
    group.add_argument("--min", dest="min_size", type=int, required=True, metavar="N", help="smallest |D| to train")
    group.add_argument("--max", dest="max_size", type=int, required=True, metavar="N", help="largest |D| to train")
    group.add_argument("--tolerance", type=float, default=0.25, metavar="T",
                       help="stop when the bracket's upper / lower <= 1 + T (default: 0.25)")
    group.add_argument("--eps", type=float, default=0.1, help="memorized when ratio >= 1 - eps (default: 0.1)")
    group.add_argument("--metric", choices=("max", "final"), default="max",
                       help="a run's ratio: max over snapshots (the papers) or the final snapshot's")
    group.add_argument("--interpolation", choices=("linear", "log"), default="linear",
                       help="interpolate the ratio between the bracket's ends in |D| or log |D| (default: linear)")
    group.add_argument("--bootstrap", type=int, default=0, metavar="B",
                       help="bootstrap replicates for a confidence interval of EMM (default: 0, none)")
    group.add_argument("--name", default="emm", help="a name for the reports")
    add_execution_options(parser)
    # --devices decides where runs train, and runs log to files rather than progress bars.
    add_training_options(parser, exclude=("size", "outdir", "nosubdir", "device", "progress"))


def _emm_spec(args: argparse.Namespace) -> dict[str, Any]:
    """A one-entry sweep spec from `diffmem emm` flags."""
    from ..training.config import TrainingConfig, read_config_file

    base: dict[str, Any] = {}
    config_file, preset = getattr(args, "config", None), getattr(args, "preset", None)
    if config_file is not None:
        base.update(read_config_file(config_file))
    if preset is not None:
        base["preset"] = preset
    for key in ("size", "outdir", "nosubdir"):
        if key in base:
            raise ValueError(f"--config {config_file}: option {key!r} is set by the EMM search; remove it")
    for name in TrainingConfig.field_names():
        if name in vars(args) and name not in ("size", "outdir", "nosubdir"):  # --outdir is the search's folder
            base[name] = getattr(args, name)
    return dict(name=args.name, base=base, eps=args.eps, metric=args.metric, interpolation=args.interpolation,
                bootstrap=args.bootstrap,
                search=dict(min=args.min_size, max=args.max_size, tolerance=args.tolerance))


def _run(spec_values: dict[str, Any], args: argparse.Namespace, source: str, entries: list[int] | None = None,
         aggregate: bool = False) -> int:
    from ..emm.execute import parse_slots, run_sweep
    from ..emm.summary import SPEC_FILE, build_summary, collect_progress, emm_markdown, write_outputs
    from ..emm.sweep import parse_spec

    spec = parse_spec(spec_values, source=source)
    if entries is not None:
        bad = [i for i in entries if not 0 <= i < len(spec.entries)]
        if bad:
            raise ValueError(f"--entry {bad[0]}: the sweep has {len(spec.entries)} entries (0..{len(spec.entries) - 1})")
    slots = parse_slots(args.devices, args.jobs, args.torchrun)
    sweep_dir = pathlib.Path(args.outdir)
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise ValueError(f"--outdir {sweep_dir} exists and is not a directory")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(dict(format="diffmem-sweep", version=1, spec=spec.to_dict()), sweep_dir / SPEC_FILE)

    def write(progress=None):
        # All entries, from disk (other processes may train the others); then this process's view.
        on_disk = {s.entry.index: s for s in collect_progress(spec, sweep_dir)}
        for state in progress or []:
            # Runs on disk that this search did not ask for again (speculative sizes of an
            # earlier session) still count.
            state.finished = {**on_disk[state.entry.index].finished, **state.finished}
            on_disk[state.entry.index] = state
        summary = build_summary(spec, [on_disk[e.index] for e in spec.entries], sweep_dir)
        write_outputs(summary, sweep_dir)
        return summary

    if aggregate:
        summary = write()
        print(emm_markdown(summary), end="")
        print(f"summary: {sweep_dir / 'summary.json'}")
        return 0

    print(f"sweep {spec.name!r}: {len(spec.entries)} entr{'y' if len(spec.entries) == 1 else 'ies'}"
          f"{'' if entries is None else f' (running {len(entries)})'}, {len(slots)} slot(s) ({args.devices}); "
          f"folder {sweep_dir}", flush=True)
    outcome = run_sweep(spec, sweep_dir, slots, entries=entries, log=lambda line: print(line, flush=True),
                        on_change=lambda progress, failures: write(progress))
    summary = write(outcome.progress)
    print(emm_markdown(summary), end="")
    print(f"trained {outcome.trained} run(s) this time, reused {outcome.reused} finished run(s), "
          f"{outcome.failed} failed; summary: {sweep_dir / 'summary.json'}; report: diffmem report {sweep_dir}")
    if outcome.interrupted:
        print("interrupted: running runs saved checkpoints; rerun the same command to resume", file=sys.stderr)
        return 130
    return 1 if outcome.failed else 0


def run_sweep_command(args: argparse.Namespace) -> int:
    from ..emm.sweep import parse_spec
    from ..training.config import read_config_file

    values = read_config_file(args.spec)
    if args.list:
        spec = parse_spec(values, source=args.spec)
        for entry in spec.entries:
            print(f"{entry.index}\t{entry.label}")
        print(f"{len(spec.entries)} entries (Slurm: --array=0-{len(spec.entries) - 1})")
        return 0
    return _run(values, args, args.spec, entries=args.entry, aggregate=args.aggregate)


def run_emm_command(args: argparse.Namespace) -> int:
    return _run(_emm_spec(args), args, "diffmem emm")
