"""T1/T2: the transport's own timings on this machine, no lab needed (what the transport
tests used to bound by wall clock; they now count connections and prove concurrency by
events).

* T1: connect + ``run_many`` of 5 commands over loopback SSH (the in-process server of
  ``tests/transport/sshd_server.py``), then the same ``run_many`` on the open connection.
* T2: libvirt calls on one host's thread pool (``test:///default``, no SSH): 4 calls of 0.2 s
  at once (serialized they would take 0.8 s), and the event loop's ticks (every 10 ms) during
  one blocking call of 0.3 s (a blocked loop ticks ~0 times).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, median, row

ARGVS = [["true"], ["echo", "a"], ["uname"], ["id", "-u"], ["pwd"]]


async def _ssh_once(root: Path) -> tuple[float, float]:
    sys.path.insert(0, str(REPO / "tests" / "transport"))
    from sshd_server import LocalSSHD

    from kvmstate.transport.real import RealTransports

    sshd = LocalSSHD(root)
    async with sshd, RealTransports(sshd.spec()) as t:
        start = time.perf_counter()
        await t.shell("h1").run_many(ARGVS)
        first = time.perf_counter() - start
        start = time.perf_counter()
        await t.shell("h1").run_many(ARGVS)
        again = time.perf_counter() - start
    return first, again


async def _libvirt_once() -> tuple[float, int]:
    from kvmstate.spec import Spec
    from kvmstate.transport.libvirt import LibvirtOverSSH
    from kvmstate.transport.real import target_for
    from kvmstate.transport.ssh import SSHHost

    spec = Spec.model_validate({"version": 1, "hosts": {"h1": {"address": "127.0.0.1"}}})
    lv = LibvirtOverSSH(SSHHost(target_for(spec, "h1")), direct_uri="test:///default")
    await lv.connect()
    start = time.perf_counter()
    await asyncio.gather(*(lv.run(time.sleep, 0.2) for _ in range(4)))
    overlap = time.perf_counter() - start
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.ensure_future(ticker())
    await lv.run(time.sleep, 0.3)
    task.cancel()
    await lv.close()
    return overlap, ticks


def run(runs: int = 5) -> dict[str, Any]:
    firsts, agains, overlaps, ticks = [], [], [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="kvmstate-bench-") as tmp:
            first, again = asyncio.run(_ssh_once(Path(tmp)))
        firsts.append(first)
        agains.append(again)
        overlap, tick = asyncio.run(_libvirt_once())
        overlaps.append(overlap)
        ticks.append(tick)
    first, again, overlap = median(firsts), median(agains), median(overlaps)
    tick = int(median([float(t) for t in ticks]))
    print(
        f"transport: connect + run_many(5) {first * 1000:.1f} ms, again {again * 1000:.1f} ms; "
        f"libvirt 4 x 0.2 s at once {overlap:.3f} s; loop ticks during a 0.3 s call {tick}"
    )
    return {
        "connect_run_many_s": first,
        "run_many_again_s": again,
        "libvirt_4x0.2_s": overlap,
        "loop_ticks_during_0.3_s": tick,
        "rows": [
            row(
                "T1 connect + run_many(5), loopback",
                f"{first * 1000:.0f} ms (again {again * 1000:.0f} ms)",
                "< 5 s",
                first < 5,
            ),
            row(
                "T2 libvirt 4 x 0.2 s calls, one host", f"{overlap:.2f} s", "< 0.6 s", overlap < 0.6
            ),
            row("T2 loop ticks during a 0.3 s call", f"{tick}", ">= 10", tick >= 10),
        ],
    }
