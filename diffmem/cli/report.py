"""`diffmem report DIR`: a Markdown report with figures of a run or a sweep directory.

    diffmem report runs/digits-64-uncond-...          # a diffmem-train run
    diffmem report sweeps/width --eps 0.05            # a sweep, EMM at another eps
    python -m diffmem.cli.report DIR --out notes/width.md

report.md goes to DIR (or --out), its figures to report-figures/ beside it.
"""
from __future__ import annotations

import argparse
import sys

PROG = "diffmem report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR",
                        help="a run directory (diffmem-train) or a sweep directory (summary.json)")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="the report's path (default: DIR/report.md); figures go to report-figures/ beside it")
    parser.add_argument("--eps", type=float, default=None, metavar="FLOAT",
                        help="memorized when ratio >= 1 - eps (default: the sweep's eps, else 0.1)")


def run(args: argparse.Namespace) -> int:
    """Write the report; errors propagate to the dispatcher (ValueError, OSError, ImportError)."""
    from ..emm.report import write_report

    path = write_report(args.dir, args.out, eps=args.eps)
    print(f"report: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (`python -m diffmem.cli.report`)."""
    from .errors import standalone_main

    return standalone_main(PROG, __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
