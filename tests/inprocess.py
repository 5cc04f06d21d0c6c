"""The project's command-line entry points run inside the test process (no new interpreter: importing torch
and Lightning again costs several seconds per command), with their exit status and output."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


def exit_code(err: SystemExit) -> int:
    if err.code is None:
        return 0
    return err.code if isinstance(err.code, int) else 1


def run_entry(main, argv: list[str], prog: str, cwd: Path | None = None, pass_argv: bool = False) -> Outcome:
    """Call `main` as the console script `prog` with `argv` (in sys.argv, or as its argument with
    `pass_argv`), in `cwd`; its exit status (SystemExit or the returned int) and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    sys.argv = [prog, *argv]
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                result = main(list(argv)) if pass_argv else main()
                code = result if isinstance(result, int) else 0
            except SystemExit as exit_:
                code = exit_code(exit_)
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    return Outcome(code, out.getvalue(), err.getvalue())


def train(*argv: str, cwd: Path | None = None) -> Outcome:
    """`testbed-train <argv>` in this process."""
    from testbed.train.cli import train_main

    return run_entry(train_main, list(argv), "testbed-train", cwd=cwd)
