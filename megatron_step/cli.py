"""Command-line plumbing shared by the tools in tools/: one error format, one exit-code contract.

Every tool reports a problem as one line, `PROG: error: MESSAGE`, on stderr (no usage block: the
message names the argument or file at fault) and exits with a code its docstring lists (2: bad
arguments, as argparse). Its `main(argv)` returns the exit code instead of raising SystemExit,
so tests call it in process and a shell gets the same code through `sys.exit(main())`.

This module imports nothing heavy: `--help` and usage errors must stay instant, so tools import
megatron_step's megatron-core modules only after their arguments parsed.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import NoReturn, ParamSpec, TextIO

_P = ParamSpec("_P")


class Parser(argparse.ArgumentParser):
    """argparse with the tool's docstring as --help and one-line errors with exit code 2."""

    def __init__(self, prog: str, doc: str | None) -> None:
        super().__init__(prog=prog, description=doc,
                         formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message: str) -> NoReturn:
        """Usage error: print `PROG: error: MESSAGE` and exit 2 (argparse's code)."""
        self.exit(2, f"{self.prog}: error: {message}\n")

    def fail(self, message: str, code: int = 1) -> int:
        """Error found after parsing: print it in the same one-line format, return `code`."""
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        return code

    def echo(self, args: argparse.Namespace, file: TextIO | None = None,
             **resolved: object) -> None:
        """Print every argument as `PROG: name=value ...` before any work, so a log says what
        ran; `resolved` replaces values the tool worked out itself (e.g. a default read from
        the checkpoint). Default stream: stderr, which keeps stdout for the tool's result."""
        values = {**vars(args), **resolved}
        print(f"{self.prog}: " + " ".join(f"{k}={v}" for k, v in values.items()),
              file=file or sys.stderr)


def returns_exit_code(main: Callable[_P, int]) -> Callable[_P, int]:
    """Decorate a tool's `main`: the SystemExit of --help and `parser.error` becomes its return.

    argparse ends `--help` (0) and usage errors (2) with SystemExit, also when a tool calls
    `parser.error` for a check it can only make after parsing; returning the code instead keeps
    in-process callers (tests) alive.
    """

    @functools.wraps(main)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1

    return wrapper


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
