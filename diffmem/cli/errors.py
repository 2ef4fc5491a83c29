"""How every diffmem command ends on bad input: one `PROG: error: ...` line on stderr and
exit status 1, never a traceback (those are for bugs, not for input problems)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable


def one_line(err: BaseException) -> str:
    """A multi-line message (e.g. a list of accepted forms) folded into one line."""
    parts = [part.strip() for part in (str(err) or type(err).__name__).splitlines() if part.strip()]
    text = parts[0] if parts else ""
    for part in parts[1:]:
        text += (" " if text.endswith(":") else "; ") + part
    return text


def run_command(prog: str, run: Callable[[], int]) -> int:
    """run(), with input errors and Ctrl-C turned into one line and an exit status."""
    try:
        return run()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 1


def command_parser(prog: str, description: str | None, add_arguments) -> argparse.ArgumentParser:
    """A subcommand's options as a parser of its own."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def standalone_main(prog: str, description: str | None, add_arguments, run, argv: list[str] | None) -> int:
    """`python -m diffmem.cli.<command>`: the subcommand's parser and run(), on its own."""
    args = command_parser(prog, description, add_arguments).parse_args(argv)
    return run_command(prog, lambda: run(args))
