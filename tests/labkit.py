"""Helpers for tests against the real lab: run kvmstate as a user would, and look at the hosts
directly (virsh, cat, mount) to check what it did."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvmstate.engine import Engine
from kvmstate.engine.graph import build_graph
from kvmstate.lab.lab import Lab
from kvmstate.model import Plan, Report
from kvmstate.resources import KINDS, REGISTRY
from kvmstate.resources.base import Options, RunContext
from kvmstate.transport.real import RealTransports

ROOT = Path(__file__).resolve().parents[1]
LAB_SPEC = ROOT / "specs" / "lab.yaml"
MIGRATED_SPEC = ROOT / "specs" / "lab-migrated.yaml"
GUEST = "lab-guest"
KVM_HOSTS = ("kvm-1", "kvm-2")


def _cli_argv(args: tuple[object, ...]) -> list[str]:
    return [sys.executable, "-m", "kvmstate.cli", *map(str, args)]


def _cli_env(env: dict[str, str] | None) -> dict[str, str]:
    return {**os.environ, "NO_COLOR": "1", "COLUMNS": "120", **(env or {})}


def cli(
    *args: object, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``kvmstate ARGS`` in a new process, exactly as a user or cron runs it."""
    return subprocess.run(
        _cli_argv(args),
        capture_output=True,
        text=True,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        env=_cli_env(env),
        timeout=timeout,
    )


def spawn(*args: object, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``kvmstate ARGS`` started in the background (stdout/stderr piped), for tests that act
    while it runs: read its events, kill it, start a second run beside it."""
    return subprocess.Popen(
        _cli_argv(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        env=_cli_env(env),
    )


async def _plan(path: Path) -> tuple[Plan, dict[str, Any]]:
    loaded = REGISTRY.load(path)
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
        loaded = REGISTRY.load(path)
        graph = build_graph(loaded.spec, KINDS)
        async with RealTransports(loaded.spec) as transports:
            ctx = RunContext(loaded.spec, transports, Options(allow_destroy=allow_destroy), events)
            return await Engine(graph, ctx).apply()

    return asyncio.run(run())


def converge(path: Path = LAB_SPEC, *, events: Callable[[Any], None] | None = None) -> Report:
    """``apply`` that must converge (what failed is the assertion's message)."""
    report = apply(path, events=events)
    assert report.converged, [o.as_dict() for o in report.failed]
    return report


def home(lab: Lab) -> Lab:
    """specs/lab.yaml applied and the guest counting on kvm-1."""
    converge(LAB_SPEC)
    wait_counter(lab)
    return lab


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


# --- faults: stop and restart lab daemons by PID ------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


COMM = {"ganesha": "ganesha.nfsd"}


def daemon_processes(lab: Lab, name: str, host: str) -> list[int]:
    """PIDs of the processes of the lab's daemon ``name`` on ``host`` (the lab runs libvirtd
    and sshd under a small reaper process: its children of the same command count)."""
    comm = COMM.get(name, name)
    found: list[int] = []
    for d in lab.pids.load():
        if d.name != name or d.host != host:
            continue
        todo = [d.pid]
        while todo:
            pid = todo.pop()
            if _comm(pid) == comm:
                found.append(pid)
            todo += _children(pid)
    return found


def kill_daemon(lab: Lab, name: str, host: str) -> list[int]:
    """SIGKILL every process of the lab's daemon ``name`` on ``host`` (sshd: the listener and
    every session); what it started (QEMU, NFS clients) keeps running."""
    import signal

    name_comm = COMM.get(name, name)
    pids = daemon_processes(lab, name, host)
    assert pids, f"no {name} on {host}"
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") and _comm(p) == name_comm for p in pids):
        assert time.monotonic() < deadline, f"{name} on {host} did not die"
        for p in pids:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(p, os.WNOHANG)
        time.sleep(0.05)
    return pids


def restart_daemon(lab: Lab, name: str, host: str) -> None:
    """Start the lab's ``libvirtd`` or ``sshd`` on ``host`` again and wait until it answers."""
    from kvmstate.lab import hosts as lab_hosts
    from kvmstate.lab.netns import host_argv
    from kvmstate.lab.proc import spawn

    cfg = lab.cfg
    h = cfg.host(host)
    if name == "sshd":
        proc = lab_hosts.start_sshd(cfg, h, lab.pids)
        lab_hosts.wait_sshd(cfg, h, proc)
    elif name == "libvirtd":
        argv = ["/usr/sbin/libvirtd", "-f", "/etc/libvirt/libvirtd.conf"]
        proc = spawn(
            lab.pids,
            "libvirtd",
            h.name,
            lab_hosts.reaped(host_argv(h, argv)),
            cfg.log_dir / f"{h.name}-libvirtd.log",
            env=lab_hosts.HOST_ENV,
        )
        lab_hosts.wait_libvirt(cfg, h, proc)
    elif name == "ganesha":
        from kvmstate.lab import nfsserver

        for rpc in daemon_processes(lab, "rpcbind", host):
            with contextlib.suppress(ProcessLookupError):
                os.kill(rpc, 9)
        proc = nfsserver.start(cfg, h, lab.pids)
        nfsserver.wait_ready(h, proc)
    else:
        raise ValueError(name)


def running_on(lab: Lab, domain: str = GUEST) -> list[str]:
    return [h for h, state in defined_on(lab, domain).items() if state == "running"]


def file_sha(lab: Lab, host: str, path: str) -> str:
    return lab.run(host, ["sha256sum", path]).stdout.split()[0]
