"""Where the command's output goes: rich consoles sized for a terminal, a pipe or cron, JSON
text, and a stdout whose reader went away."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import IO

from rich.console import Console

DEFAULT_WIDTH = 80


def output_width(stream: IO[str]) -> int | None:
    """``COLUMNS`` when it is set (as rich and argparse read it); else the terminal's own width
    on a terminal (None: rich asks it), and 80 columns anywhere else (a pipe, a file, cron)."""
    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    return None if stream.isatty() else DEFAULT_WIDTH


def make_console(
    *, stderr: bool = False, no_color: bool = False, file: IO[str] | None = None
) -> Console:
    no_color = no_color or bool(os.environ.get("NO_COLOR"))
    stream = file or (sys.stderr if stderr else sys.stdout)
    return Console(
        file=stream,
        no_color=no_color,
        highlight=False,
        width=output_width(stream),
        soft_wrap=False,
    )


def silence_stdout() -> None:
    """Point a stdout whose reader went away at /dev/null: the interpreter flushes it again at
    exit, and would print a BrokenPipeError there."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def to_json(data: object) -> str:
    """Indented JSON of plain data; values JSON has no type for are written as their ``str``."""
    return json.dumps(data, indent=2, default=str)
