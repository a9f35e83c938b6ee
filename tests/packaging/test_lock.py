"""Issue 14: the versions CI tested are the versions a fresh machine gets.

``make install`` installs exactly what ``uv.lock`` pins (``uv sync --frozen``, hashes checked);
``pyproject.toml`` keeps the compatible ranges that ``pip install kvmstate`` resolves. These
tests fail when the two disagree (a range changed without ``make lock``), and when the venv
the suite runs in is not the one the lock describes."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "uv.lock"
UV = Path(sys.executable).parent / "uv"


def test_the_lock_agrees_with_pyproject() -> None:
    r = subprocess.run(
        [str(UV), "lock", "--check", "--python", sys.executable, "--no-python-downloads"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "UV_NO_PROGRESS": "1"},
    )
    assert r.returncode == 0, f"uv.lock disagrees with pyproject.toml; run `make lock`:\n{r.stderr}"


def test_every_artifact_in_the_lock_has_a_hash() -> None:
    data = tomllib.loads(LOCK.read_text())
    unhashed = [
        p["name"]
        for p in data["package"]
        if p["name"] != "kvmstate"
        for art in [*(p.get("wheels") or []), *([p["sdist"]] if "sdist" in p else [])]
        if not str(art.get("hash", "")).startswith("sha256:")
    ]
    assert unhashed == []


def test_pyproject_keeps_ranges_for_pip_users() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [
        *project["dependencies"],
        *(r for v in project["optional-dependencies"].values() for r in v),
    ]
    pinned = [r for r in reqs if "==" in r]
    assert pinned == [], "pin exact versions in uv.lock, not in pyproject.toml"
    assert project["license"] == "Apache-2.0"  # an SPDX expression, not the old table


def test_the_suite_runs_on_exactly_the_locked_versions() -> None:
    """The venv this suite runs in holds what uv.lock pins for this Python, no other version
    (`uv sync --check`: reports, changes nothing)."""
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip(f"running in {sys.prefix}, not the locked .venv (e.g. make test-latest)")
    r = subprocess.run(
        [
            str(UV),
            "sync",
            "--frozen",
            "--check",
            "--inexact",
            "--no-install-project",
            "--extra",
            "dev",
            "--extra",
            "lab",
            "--python",
            sys.executable,
            "--no-python-downloads",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "UV_PROJECT_ENVIRONMENT": sys.prefix, "UV_NO_PROGRESS": "1"},
    )
    assert r.returncode == 0, f"installed != locked; run `make install`:\n{r.stderr}"
