"""What the benchmark scripts share on the command line: argparse types that refuse bad
numbers at parse time (a usage line and exit status 2, before any work starts), and the
entry point that ends a run on bad input with one line and exit status 1, never a
traceback, as the diffmem commands do (diffmem/cli/errors.py)."""
from __future__ import annotations

import argparse
import math
from typing import Callable


def _number(kind, text: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _number(int, text)
        if value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value
    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def positive_float(text: str) -> float:
    value = _number(float, text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def number_list(kind, low: float, *, strict: bool, allow_empty: bool = False) -> Callable[[str], list]:
    """A comma list of numbers, each > low (strict) or >= low; at least one unless allow_empty."""
    def parse(text: str) -> list:
        values = [_number(kind, part) for part in text.split(",") if part.strip()]
        if not values and not allow_empty:
            raise argparse.ArgumentTypeError("needs at least one value")
        bad = [v for v in values if not (math.isfinite(v) and (v > low if strict else v >= low))]
        if bad:
            raise argparse.ArgumentTypeError(f"every value must be {'>' if strict else '>='} {low:g}, got {bad}")
        return values
    parse.__name__ = "list"
    return parse


def add_profile_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """--profile, as every benchmark takes it: `what` gets one profiled call more."""
    parser.add_argument("--profile", action="store_true",
                        help=f"also profile {what} (torch.profiler: time in GEMMs and convolutions, compiled "
                             "kernels and the rest; bench/kernel_profile.py)")


def run_main(prog: str, main: Callable[[], object]) -> int:
    """main() as a script's exit status: 0 for a run that returns a record (or None),
    its own status where it returns an int; bad input and Ctrl-C as one line."""
    from diffmem.cli.errors import run_command  # here: the types above need no torch

    def run() -> int:
        result = main()
        return result if isinstance(result, int) and not isinstance(result, bool) else 0
    return run_command(prog, run)
