"""The ``kvmstate`` entry point: parse, set up logging and the consoles, run one command, and
turn errors into exit codes (kvmstate.cli.exits). Logging is configured here only.

A command's module is imported only when that command runs: the bare CLI (--help,
completion, lab) loads no spec machinery (tests/cli/test_startup_imports.py)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from rich.console import Console

from kvmstate.cli.exits import EXIT_ERROR, EXIT_INTERRUPTED
from kvmstate.cli.parser import GlobalArgs, build_parser, typed
from kvmstate.errors import KvmstateError, SpecError
from kvmstate.ui.console import make_console, silence_stdout

Command = Callable[[argparse.Namespace, Console, Console], int]

# command -> "module:function" in kvmstate.cli
COMMANDS = {
    "validate": "specfile:cmd_validate",
    "plan": "plan:cmd_plan",
    "apply": "apply:cmd_apply",
    "drift": "drift:cmd_drift",
    "evacuate": "apply:cmd_evacuate",
    "fence": "fence:cmd_fence",
    "show": "plan:cmd_show",
    "completion": "completion:cmd_completion",
    "graph": "specfile:cmd_graph",
    "import": "importing:cmd_import",
    "schema": "specfile:cmd_schema",
}


def command(name: str) -> Command:
    """The function that runs command ``name`` (its module is imported now)."""
    module, _, function = COMMANDS[name].partition(":")
    run: Command = getattr(importlib.import_module(f"kvmstate.cli.{module}"), function)
    return run


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler: logging.Handler
    if verbosity == 0:  # warnings only: a plain handler, no rich import on the hot path
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    else:
        from rich.logging import RichHandler

        handler = RichHandler(console=make_console(stderr=True), show_path=False)
    logging.basicConfig(level=level, handlers=[handler], format="%(message)s")
    if verbosity < 3:
        logging.getLogger("asyncssh").setLevel(max(level, logging.WARNING))


def _gc_for_a_short_process() -> None:
    """Garbage-collector settings for the kvmstate command, a process that lives seconds to
    minutes (bench B1b: ~0.3 s for a no-op plan, of which the collector took ~30 ms):

    * collect the youngest generation after 10,000 new container objects instead of 700:
      loading the modules a plan needs makes ~55,000 that live to the end, and scanning them
      again and again on the way cost ~15-20 ms;
    * at exit, after the atexit handlers and the thread joins, and after stdout and stderr are
      flushed, the interpreter would walk and free every object one by one (~40 ms) that the
      OS reclaims at once anyway: moving them all to the permanent generation first skips it.
      Every file kvmstate writes is closed by then; only memory is left for the OS to free.
    """
    import atexit
    import gc

    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(10_000, gen1, gen2)
    atexit.register(gc.freeze)


def main(argv: Sequence[str] | None = None) -> int:
    as_program = argv is None  # the kvmstate command, not a caller in a long-lived process
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "lab":
        from kvmstate.lab.cli import main as lab_main

        return lab_main(argv[1:])
    if as_program:
        _gc_for_a_short_process()
    parser = build_parser()
    ns = parser.parse_args(argv)
    args = typed(GlobalArgs, ns)
    if not args.command:
        parser.print_help()
        return EXIT_ERROR
    _setup_logging(args.verbose)
    out = make_console(no_color=args.no_color)
    err = make_console(stderr=True, no_color=args.no_color)
    try:
        return command(args.command)(ns, out, err)
    except SpecError as e:
        from kvmstate.cli.views import problems

        problems(err, e.problems)
        n = len(e.problems)
        err.print(
            f"{n} error{'s' if n != 1 else ''} in the spec; nothing was contacted.", style="red"
        )
        return EXIT_ERROR
    except KvmstateError as e:
        err.print(f"error: {e}", style="red")
        return EXIT_ERROR
    except KeyboardInterrupt:
        err.print("interrupted", style="red")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of our output went away (`kvmstate plan x | head`)
        silence_stdout()
        return EXIT_ERROR
