"""B1b: the physical limit of a no-op plan, as a NEW process does it with nothing extra.

``python -m bench.minimal JOB.json`` where the job (written by ``bench.lab``, from kvmstate's
own graph so the reads are exactly the plan's) lists, per host: its address, the argv lists of
the facts it reads, and the libvirt objects it looks up. For every host in parallel: one
asyncssh connection, ONE exec that runs all the reads, and (KVM hosts) libvirt over the same
connection (``forward_local_path`` to ``/run/libvirt/libvirt-sock`` + ``qemu+unix``), doing the
same lookups kvmstate's observers do. No spec loading, no parsing, no diff, no rendering.
Prints a JSON line: wall time from ``main`` start, bytes read, per-host stats.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from typing import Any  # noqa: E402

import asyncssh  # noqa: E402
import libvirt  # noqa: E402

T_IMPORT = time.perf_counter() - T0
libvirt.registerErrorHandler(lambda _c, _e: None, None)


def _libvirt_reads(uri: str, lv: dict[str, list[Any]]) -> int:
    """The lookups kvmstate's observers do; "not found" is a value, as in kvmstate."""
    conn = libvirt.open(uri)
    n = 0
    try:
        for name in lv.get("pools", []):
            try:
                p = conn.storagePoolLookupByName(name)
            except libvirt.libvirtError:
                continue
            n += len(p.XMLDesc(0)) + p.autostart()
            if p.isActive():
                n += len(p.listVolumes())
        for pool, vol in lv.get("volumes", []):
            try:
                v = conn.storagePoolLookupByName(pool).storageVolLookupByName(vol)
            except libvirt.libvirtError:
                continue
            n += len(v.XMLDesc(0))
        for name in lv.get("domains", []):
            try:
                d = conn.lookupByName(name)
            except libvirt.libvirtError:
                continue  # not on this host
            n += d.state()[0] + d.autostart() + d.isPersistent()
            n += len(d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            if d.isActive():
                n += len(d.XMLDesc(0))
    finally:
        conn.close()
    return n


async def one(job: dict[str, object], host: dict[str, object]) -> dict[str, object]:
    t = time.perf_counter()
    conn = await asyncssh.connect(
        str(host["address"]),
        username="root",
        client_keys=[str(job["identity"])],
        known_hosts=str(job["known_hosts"]),
        config=[],
    )
    t_conn = time.perf_counter() - t
    async with conn:
        argvs = host["argvs"]
        assert isinstance(argvs, list)
        script = "; ".join(f"{shlex.join(a)}; echo ===$?" for a in argvs)
        shell = conn.run(f"LC_ALL=C sh -c {shlex.quote(script)}", check=False)
        lv = host.get("libvirt")
        if lv:
            tmp = tempfile.mkdtemp(prefix="bench-min-")
            try:
                local = os.path.join(tmp, "sock")
                listener = await conn.forward_local_path(local, "/run/libvirt/libvirt-sock")
                uri = f"qemu+unix:///system?socket={local}"
                res, nlv = await asyncio.gather(
                    shell,
                    asyncio.to_thread(_libvirt_reads, uri, lv),  # type: ignore[arg-type]
                )
                listener.close()
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            res, nlv = await shell, 0
    out = res.stdout or ""
    return {"connect": t_conn, "bytes": len(out), "libvirt": nlv, "exit": res.exit_status}


async def main_async(job: dict[str, object]) -> dict[str, object]:
    hosts = job["hosts"]
    assert isinstance(hosts, list)
    got = await asyncio.gather(*(one(job, h) for h in hosts))
    return {str(h["name"]): g for h, g in zip(hosts, got, strict=True)}


def main() -> int:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    per_host = asyncio.run(main_async(job))
    print(
        json.dumps(
            {"wall": time.perf_counter() - T0, "import": T_IMPORT, "hosts": per_host},
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
