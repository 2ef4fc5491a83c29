"""`diffmem`: one command for the package's jobs.

    diffmem train ...                    # the same as diffmem-train
    diffmem emm --preset emm-digits --min 8 --max 1024 --jobs 2 --outdir emm-runs
    diffmem sweep spec.yaml --outdir sweeps/NAME [--devices 0,1] [--entry I] [--aggregate] [--list]
    diffmem sample --data digits --size 64 [--tikhonov C | --truncate TAU | --topk K] --outdir DIR
    diffmem report RUN_OR_SWEEP_DIR

Errors in the input end with one `diffmem: error: ...` line and exit status 1, no traceback.
"""
from __future__ import annotations

import argparse
import sys

PROG = "diffmem"


def build_parser() -> argparse.ArgumentParser:
    from . import report, sample, sweep

    parser = argparse.ArgumentParser(prog=PROG, description="Measure memorization in diffusion models.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("train", help="train a model and measure its memorization ratio (= diffmem-train)",
                        add_help=False)
    emm = commands.add_parser("emm", help="find EMM of one configuration by an adaptive search over |D|",
                              argument_default=argparse.SUPPRESS,
                              description="Train at training-set sizes chosen one after another (the range ends, "
                                          "then bisection in log |D|) until EMM is bracketed within the tolerance.")
    sweep.add_emm_arguments(emm)
    sweeps = commands.add_parser("sweep", help="EMM (or ratio curves) for every entry of a factor grid",
                                 description=sweep.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_sweep_arguments(sweeps)
    samples = commands.add_parser("sample", help="sample the closed-form optimal denoiser (optionally regularized) "
                                                 "and measure its memorization")
    sample.add_arguments(samples)
    reports = commands.add_parser("report", help="a Markdown report with figures of a run or a sweep")
    report.add_arguments(reports)
    return parser


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "train":
        from .train import main as train_main

        return train_main(argv[1:])
    from . import report, sample, sweep
    from .errors import run_command

    args = build_parser().parse_args(argv)
    commands = dict(emm=sweep.run_emm_command, sweep=sweep.run_sweep_command, sample=sample.run, report=report.run)
    return run_command(PROG, lambda: commands[args.command](args))


def main(argv: list[str] | None = None) -> int:
    return _dispatch(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
