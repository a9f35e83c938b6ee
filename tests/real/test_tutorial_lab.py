"""Every command of docs/tutorial.md, run in order on the lab, with its exit status checked."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from labkit import ROOT

from kvmstate.lab.lab import Lab

pytestmark = pytest.mark.lab

TUTORIAL = ROOT / "docs" / "tutorial.md"
_BLOCK = re.compile(r"```console\n(.*?)```", re.S)
_EXIT = re.compile(r"#\s*exit\s+(\d+)\s*$")


def tutorial_commands(path: Path = TUTORIAL) -> list[tuple[str, int]]:
    out = []
    for block in _BLOCK.findall(path.read_text()):
        for line in block.splitlines():
            if not line.startswith("$ "):
                continue
            cmd = line[2:]
            m = _EXIT.search(cmd)
            expected = int(m.group(1)) if m else 0
            cmd = _EXIT.sub("", cmd).strip()
            out.append((cmd, expected))
    return out


def test_the_tutorial_has_the_whole_story() -> None:
    cmds = [c for c, _ in tutorial_commands()]
    assert cmds[0] == "kvmstate lab up" and cmds[-1] == "kvmstate lab down"
    assert "kvmstate apply specs/lab-migrated.yaml --auto-approve" in cmds
    assert "kvmstate plan lab-imported.yaml" in cmds


def test_every_tutorial_command_runs_with_the_documented_exit_status(lab: Lab) -> None:
    lab.reset()
    venv_bin = Path(sys.executable).parent  # the venv running the tests (.venv or .venv-latest)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "NO_COLOR": "1"}
    try:
        for cmd, expected in tutorial_commands():
            argv = shlex.split(cmd)
            assert argv[0] == "kvmstate"
            r = subprocess.run(
                argv,
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
                stdin=subprocess.DEVNULL,
            )
            assert r.returncode == expected, f"$ {cmd}\n{r.stdout}\n{r.stderr}"
    finally:
        (ROOT / "lab-imported.yaml").unlink(missing_ok=True)  # written by the import step
        if not lab.is_up():
            lab.up()
