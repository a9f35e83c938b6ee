"""Where B3's client CPU goes, phase by phase, in a fresh process; prints one JSON line.

``python -m bench.phases SPEC``: against the simulated hosts of SPEC (bench.simhost, full
mode), the same work a no-op plan does, one phase at a time over every host in parallel:
SSH connect, one exec batch, libvirt open (forward + handshake), the libvirt observation of
each KVM host's pool, volume and domain, one extra libvirt call (the cost of a single round
trip), and closing. Per phase: client CPU and wall time, and CPU per host.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def measure(spec_path: str) -> dict[str, dict[str, float]]:
    from kvmstate import virt
    from kvmstate.loader import load_spec
    from kvmstate.transport.real import RealTransports

    spec = load_spec(spec_path).spec
    domains = {name: d for name, d in spec.domains.items()}  # one per KVM host in B3's spec
    kvm = [d.host for d in domains.values()]
    t = RealTransports(spec)
    out: dict[str, dict[str, float]] = {}

    async def phase(name: str, hosts: int, work: Callable[[], Awaitable[Any]]) -> None:
        c0, w0 = cpu(), time.perf_counter()
        await work()
        c, w = cpu() - c0, time.perf_counter() - w0
        out[name] = {"cpu_s": c, "wall_s": w, "hosts": hosts, "cpu_ms_per_host": c / hosts * 1e3}

    async def observe(name: str) -> None:
        d = domains[name]
        lv = t.libvirt(d.host)
        conn = await lv.connect()
        pool = spec.volumes[d.disks[0].volume].pool
        await lv.run(virt.observe_pool, conn, pool)
        await lv.run(virt.observe_volume, conn, pool, d.disks[0].volume)
        await lv.run(virt.observe_domain, conn, name)

    async def one_call(h: str) -> None:
        lv = t.libvirt(h)
        await lv.run(lambda c: c.getLibVersion(), await lv.connect())

    def each(fn: Callable[[str], Awaitable[Any]], items: list[str]) -> Callable[[], Any]:
        return lambda: asyncio.gather(*map(fn, items))

    async def fstab(h: str) -> Any:
        return await t.shell(h).run_many([["cat", "--", "/etc/fstab"]])

    async def libvirt_open(h: str) -> Any:
        return await t.libvirt(h).connect()

    n = len(spec.hosts)
    try:
        await phase("ssh connect", n, t.connect_all)
        await phase("exec (1 batch)", n, each(fstab, list(spec.hosts)))
        await phase("libvirt open", len(kvm), each(libvirt_open, kvm))
        await phase("observe pool+volume+domain", len(kvm), each(observe, list(domains)))
        await phase("1 libvirt call", len(kvm), each(one_call, kvm))
        await phase("close", n, t.close)
    finally:
        await t.close()
    return out


def main() -> int:
    print(json.dumps(asyncio.run(measure(sys.argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
