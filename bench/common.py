"""Small helpers shared by the benchmarks: processes we start (killed by PID only), timing,
verdicts, machine info."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kvmstate.lab.proc import stop

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
KVMSTATE = str(Path(PY).with_name("kvmstate"))


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def verdict(ok: bool | None) -> str:
    return "PASS" if ok else ("MISS" if ok is not None else "n/a")


def row(name: str, figure: str, target: str, ok: bool | None) -> dict[str, Any]:
    """One result line: what was measured, the figure, its target, PASS/MISS (None: info)."""
    return {"name": name, "figure": figure, "target": target, "ok": ok, "verdict": verdict(ok)}


def fmt(r: dict[str, Any]) -> str:
    return f"  {r['name']:<44} {r['figure']:<36} target {r['target']:<24} {r['verdict']}"


def timed_run(
    argv: Sequence[str], *, timeout: float = 300, env: dict[str, str] | None = None, cwd: Any = None
) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run a NEW process; its wall time from fork to exit."""
    start = time.perf_counter()
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd or REPO,
    )
    return time.perf_counter() - start, proc


@contextlib.contextmanager
def child(argv: Sequence[str], *, log: Path, **kw: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A background process we own; terminated (then killed) by its PID on exit."""
    fh = log.open("wb")
    proc = subprocess.Popen(list(argv), stdout=fh, stderr=subprocess.STDOUT, **kw)
    try:
        yield proc
    finally:
        stop(proc)
        fh.close()


def proc_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) a process of ours has used so far; 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _first(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    os_name = "unknown"
    with contextlib.suppress(OSError):
        for ln in Path("/etc/os-release").read_text().splitlines():
            if ln.startswith("PRETTY_NAME="):
                os_name = ln.split("=", 1)[1].strip('"')
    versions: dict[str, str] = {"python": platform.python_version()}
    for mod in ("kvmstate", "asyncssh", "libvirt", "pydantic"):
        try:
            if mod == "libvirt":
                import libvirt

                v = libvirt.getVersion()
                versions["libvirt-python(lib)"] = f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"
            else:
                from importlib.metadata import version

                versions[mod] = version(mod)
        except Exception:  # noqa: BLE001 - informational only
            versions[mod] = "not installed"
    if shutil.which("ansible-playbook"):
        versions["ansible-core"] = _first(["ansible-playbook", "--version"])
    versions["openssh"] = _first(["ssh", "-V"])
    versions["qemu"] = _first(["qemu-system-x86_64", "--version"])
    return {
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "os": os_name,
        "versions": versions,
    }
