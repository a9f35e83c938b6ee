"""Start-up cost of a no-op plan's process, without any host: what ``kvmstate plan`` imports
vs what the minimal script (B1b) imports, each in a new process, and the heaviest imports
(``python -X importtime``). Part of B1b's gap to the physical limit."""

from __future__ import annotations

from typing import Any

from bench.common import PY, median, row, timed_run

KVMSTATE_IMPORTS = (
    "import kvmstate.cli, kvmstate.cli.plan, kvmstate.loader, kvmstate.engine.graph, "
    "kvmstate.resources, kvmstate.engine, kvmstate.transport.real"
)
MINIMAL_IMPORTS = "import asyncio, json, asyncssh, libvirt"


def _wall(code: str, runs: int) -> float:
    return median([timed_run([PY, "-c", code], timeout=60)[0] for _ in range(runs)])


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
    ks = _wall(KVMSTATE_IMPORTS, runs)
    mn = _wall(MINIMAL_IMPORTS, runs)
    top = top_imports(KVMSTATE_IMPORTS)
    print(
        f"startup: python alone {base:.3f}s, + kvmstate's plan imports {ks:.3f}s, "
        f"+ the minimal script's imports {mn:.3f}s"
    )
    print(
        "  heaviest imports (cumulative, -X importtime): "
        + ", ".join(f"{t['module']} {t['cumulative_ms']:.0f} ms" for t in top[:8])
    )
    return {
        "python_s": base,
        "kvmstate_imports_s": ks,
        "minimal_imports_s": mn,
        "top_imports": top,
        "rows": [
            row(
                "start-up: kvmstate plan imports vs minimal",
                f"{ks:.3f} s vs {mn:.3f} s (+{ks - mn:.3f} s)",
                "(part of B1b's gap)",
                None,
            )
        ],
    }
