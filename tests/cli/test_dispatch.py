"""Every command the parser accepts has a function that runs it (command modules are imported
only when their command runs, so a typo in the table would show up only then)."""

from __future__ import annotations

import argparse

from kvmstate.cli.app import COMMANDS, command
from kvmstate.cli.parser import build_parser


def test_every_parsed_command_resolves_to_its_function() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {*COMMANDS, "lab"}  # lab has its own parser (kvmstate.lab.cli)
    for name in COMMANDS:
        assert callable(command(name)), name
