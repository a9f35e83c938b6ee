"""Helpers for tests against the real lab: run kvmstate as a user would, and look at the hosts
directly (virsh, cat, mount) to check what it did."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvmstate.engine import Engine
from kvmstate.graph import build_graph
from kvmstate.lab.lab import Lab
from kvmstate.loader import load_spec
from kvmstate.model import Plan, Report
from kvmstate.resources import KINDS
from kvmstate.resources.base import Options, RunContext
from kvmstate.transport.real import RealTransports

ROOT = Path(__file__).resolve().parents[2]
LAB_SPEC = ROOT / "specs" / "lab.yaml"
MIGRATED_SPEC = ROOT / "specs" / "lab-migrated.yaml"
GUEST = "lab-guest"
KVM_HOSTS = ("kvm-1", "kvm-2")


def cli(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``kvmstate ARGS`` in a new process, exactly as a user or cron runs it."""
    return subprocess.run(
        [sys.executable, "-m", "kvmstate.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "120", **(env or {})},
        timeout=timeout,
    )


async def _plan(path: Path) -> tuple[Plan, dict[str, Any]]:
    loaded = load_spec(path)
    graph = build_graph(loaded.spec, KINDS)
    async with RealTransports(loaded.spec) as transports:
        engine = Engine(graph, RunContext(loaded.spec, transports))
        plan = await engine.plan()
        return plan, transports.stats()


def plan(path: Path) -> Plan:
    return asyncio.run(_plan(path))[0]


def plan_with_stats(path: Path) -> tuple[Plan, dict[str, Any]]:
    return asyncio.run(_plan(path))


def apply(
    path: Path,
    *,
    allow_destroy: bool = False,
    events: Callable[[Any], None] | None = None,
) -> Report:
    async def run() -> Report:
        loaded = load_spec(path)
        graph = build_graph(loaded.spec, KINDS)
        async with RealTransports(loaded.spec) as transports:
            ctx = RunContext(loaded.spec, transports, Options(allow_destroy=allow_destroy), events)
            return await Engine(graph, ctx).apply()

    return asyncio.run(run())


def pending(p: Plan) -> dict[str, list[tuple[str, str]]]:
    """id -> [(field, drift class)] for every change in a plan."""
    return {str(c.id): [(d.field, d.drift) for d in c.diffs] for c in p.pending}


def virsh(lab: Lab, host: str, *args: str, check: bool = True) -> str:
    return lab.run(host, ["virsh", "-q", "-c", "qemu:///system", *args], check=check).stdout


def defined_on(lab: Lab, domain: str = GUEST) -> dict[str, str]:
    """host -> state for every lab KVM host where ``domain`` is defined."""
    out: dict[str, str] = {}
    for h in KVM_HOSTS:
        names = virsh(lab, h, "list", "--all", "--name").split()
        if domain in names:
            out[h] = virsh(lab, h, "domstate", domain).strip()
    return out


def wait_counter(lab: Lab, *, above: int = 0, timeout: float = 30.0, domain: str = GUEST) -> int:
    """Wait until the guest's counter is greater than ``above``; return it."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = lab.guest_counter(domain)
            if value > above:
                return value
        except Exception as e:  # noqa: BLE001 - the guest may not have printed yet
            last = e
        time.sleep(0.5)
    raise AssertionError(f"guest counter did not pass {above} within {timeout}s ({last})")


def variant(tmp_path: Path, name: str, edit: Callable[[str], str], base: Path = LAB_SPEC) -> Path:
    """A copy of a lab spec with a textual edit (asserted to change something)."""
    text = base.read_text()
    new = edit(text)
    assert new != text, f"variant {name} changed nothing"
    out = tmp_path / f"{name}.yaml"
    out.write_text(new)
    return out
