"""Start-up cost of a no-op plan's process, without any host: what ``kvmstate plan`` imports
vs what the minimal script (B1b) imports, each in a new process, and the heaviest imports
(``python -X importtime``). Part of B1b's gap to the physical limit.

Also the whole ``kvmstate plan`` process on the lab's spec with every host unreachable (all on
127.0.0.1, no identity file: nothing is contacted): imports, spec load, graph, engine, SSH
transports up to the first connect, output, exit; the start-up half of B1b, on any machine."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench.common import KVMSTATE, PY, REPO, median, row, timed_run

KVMSTATE_IMPORTS = (
    "import kvmstate.cli, kvmstate.cli.plan, kvmstate.loader, kvmstate.engine.graph, "
    "kvmstate.resources, kvmstate.engine, kvmstate.transport.real"
)
MINIMAL_IMPORTS = "import asyncio, json, asyncssh, libvirt"
# the garbage-collector settings the kvmstate command starts with (cli.app's
# _gc_for_a_short_process): without them the import probe alone read ~0.2 s MORE than a
# whole `kvmstate plan` process (collections during the imports, the walk at exit)
AS_THE_COMMAND = (
    "import atexit, gc; gc.set_threshold(10_000, *gc.get_threshold()[1:]); "
    "atexit.register(gc.freeze); "
)


def _wall(code: str, runs: int) -> float:
    return median([timed_run([PY, "-c", code], timeout=60)[0] for _ in range(runs)])


def unreachable_lab_spec(tmp: Path) -> Path:
    """specs/lab.yaml with every host on 127.0.0.1 and no identity file: a plan that reaches
    for its hosts and contacts none."""
    text = (REPO / "specs" / "lab.yaml").read_text()
    for n in ("10", "11", "12"):
        text = text.replace(f"10.77.0.{n}", "127.0.0.1")
    text = text.replace("/var/lib/kvmstate-lab/id_ed25519", str(tmp / "no-such-key"))
    text = text.replace("/var/lib/kvmstate-lab/known_hosts", str(tmp / "no-known-hosts"))
    path = tmp / "unreachable.yaml"
    path.write_text(text)
    return path


def plan_unreachable(runs: int) -> float:
    """Median wall of ``kvmstate plan`` (a new process) with no host reachable."""
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        spec = str(unreachable_lab_spec(Path(tmp)))
        return median([timed_run([KVMSTATE, "plan", spec], timeout=60)[0] for _ in range(runs)])


def top_imports(code: str, n: int = 12) -> list[dict[str, Any]]:
    """The top-level packages by cumulative import time (µs), from ``-X importtime``."""
    _, proc = timed_run([PY, "-X", "importtime", "-c", code], timeout=60)
    best: dict[str, int] = {}
    for ln in proc.stderr.splitlines():
        if not ln.startswith("import time:") or "self [us]" in ln:
            continue
        parts = ln.split("|")
        cum = int(parts[1])
        name = parts[2].rstrip()
        depth = (len(name) - len(name.lstrip())) // 2
        name = name.strip()
        # a kvmstate module's own cost, or a third-party package at its top level
        if (name.startswith("kvmstate.") and depth <= 2) or ("." not in name and depth <= 3):
            best[name] = max(best.get(name, 0), cum)
    ranked = sorted(best.items(), key=lambda kv: -kv[1])[:n]
    return [{"module": k, "cumulative_ms": round(v / 1000, 1)} for k, v in ranked]


def run(runs: int = 5) -> dict[str, Any]:
    base = _wall("pass", runs)
    ks = _wall(AS_THE_COMMAND + KVMSTATE_IMPORTS, runs)
    mn = _wall(MINIMAL_IMPORTS, runs)
    plan = plan_unreachable(runs)
    top = top_imports(KVMSTATE_IMPORTS)
    print(
        f"startup: python alone {base:.3f}s, + kvmstate's plan imports {ks:.3f}s, "
        f"+ the minimal script's imports {mn:.3f}s; kvmstate plan, no host reachable {plan:.3f}s"
    )
    print(
        "  heaviest imports (cumulative, -X importtime): "
        + ", ".join(f"{t['module']} {t['cumulative_ms']:.0f} ms" for t in top[:8])
    )
    return {
        "python_s": base,
        "kvmstate_imports_s": ks,
        "minimal_imports_s": mn,
        "plan_unreachable_s": plan,
        "top_imports": top,
        "rows": [
            row(
                "start-up: kvmstate plan imports vs minimal",
                f"{ks:.3f} s vs {mn:.3f} s (+{ks - mn:.3f} s)",
                "(part of B1b's gap)",
                None,
            ),
            row(
                "start-up: kvmstate plan, no host reachable",
                f"{plan:.3f} s (whole process)",
                "(B1b's start-up half)",
                None,
            ),
        ],
    }
