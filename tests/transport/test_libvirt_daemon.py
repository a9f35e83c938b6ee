"""libvirt over the forwarded socket against a REAL libvirtd, started here in private mount and
network namespaces (tmpfs over its state dirs, a copy of /etc/libvirt): nothing of the machine's
own state is touched, and only the daemon this test started is stopped (by its pid).

Skipped unless root with ``unshare`` and ``libvirtd`` installed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sshd_server import LocalSSHD

from kvmstate.lab.private_libvirtd import private_libvirtd
from kvmstate.transport.libvirt import LibvirtError
from kvmstate.transport.real import RealTransports

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not os.path.exists("/usr/sbin/libvirtd"),
    reason="needs root, unshare and libvirtd",
)


@pytest.fixture(scope="module")
def libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with private_libvirtd(tmp_path_factory.mktemp("libvirtd")) as (sock, _pid):
        yield Path(sock)


POOL_XML = """<pool type='dir'><name>kvmstate-test</name>
<target><path>{path}</path></target></pool>"""


def test_real_libvirtd_over_the_same_ssh_connection(
    sshd: LocalSSHD, libvirtd: Path, tmp_path: Path
) -> None:
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()

    async def main() -> dict[str, Any]:
        async with sshd, RealTransports(sshd.spec(), libvirt_socket=str(libvirtd)) as t:
            lv = t.libvirt("h1")
            start = time.perf_counter()
            conn = await lv.connect()
            opened = time.perf_counter() - start
            version = await lv.run(conn.getLibVersion)
            with pytest.raises(LibvirtError) as exc:
                await lv.run(conn.lookupByName, "kvmstate-no-such-domain")
            assert exc.value.not_found
            # a write round: define, start, list, destroy, undefine a dir pool
            pool = await lv.run(conn.storagePoolDefineXML, POOL_XML.format(path=pool_dir), 0)
            await lv.run(pool.create, 0)
            assert await lv.run(pool.isActive) == 1
            names = [p.name() for p in await lv.run(conn.listAllStoragePools, 0)]
            assert "kvmstate-test" in names
            await lv.run(pool.destroy)
            await lv.run(pool.undefine)
            with pytest.raises(LibvirtError) as exc2:
                await lv.run(conn.storagePoolLookupByName, "kvmstate-test")
            assert exc2.value.not_found
            # shell and libvirt interleaved, concurrently, on the one connection
            results = await asyncio.gather(
                *(t.shell("h1").run(["echo", str(i)]) for i in range(5)),
                *(lv.run(conn.getHostname) for _ in range(5)),
            )
            assert len(results) == 10
            start = time.perf_counter()
            for _ in range(20):
                await lv.run(conn.listAllDomains, 0)
            per_call = (time.perf_counter() - start) / 20
            return {
                "stats": t.stats(),
                "version": version,
                "opened": opened,
                "per_call": per_call,
            }

    out = asyncio.run(main())
    print(
        f"\nssh connect + forward + libvirt open: {out['opened'] * 1000:.1f} ms; "
        f"listAllDomains over the forward: {out['per_call'] * 1000:.2f} ms"
    )
    assert out["version"] >= 9000000
    assert out["stats"] == {"h1": {"connections": 1, "channels": 5}}
    assert sshd.connections == 1
    assert sshd.unix_forwards == [str(libvirtd)]  # libvirt's one RPC stream


def test_libvirt_reopens_after_the_ssh_connection_is_lost(sshd: LocalSSHD, libvirtd: Path) -> None:
    async def main() -> dict[str, dict[str, int]]:
        async with sshd, RealTransports(sshd.spec(), libvirt_socket=str(libvirtd)) as t:
            lv = t.libvirt("h1")
            conn = await lv.connect()
            assert await lv.run(conn.getLibVersion) >= 9000000
            (await t.ssh_host("h1").connection()).abort()
            await asyncio.sleep(0.1)
            with pytest.raises(LibvirtError) as exc:
                await lv.run(conn.getLibVersion)
            assert exc.value.temporary
            conn2 = await lv.connect()  # a new SSH connection, forward and libvirt connection
            assert conn2 is not conn
            assert await lv.run(conn2.getLibVersion) >= 9000000
            return t.stats()

    assert asyncio.run(main()) == {"h1": {"connections": 2, "channels": 0}}
    assert sshd.connections == 2


def test_prerequisites_libvirtd_answering(sshd: LocalSSHD, libvirtd: Path) -> None:
    from kvmstate.resources.prereq import REQUIREMENTS, Requirement, check_prerequisites

    reqs = {**REQUIREMENTS, "libvirtd-binary": Requirement("x", "command", None, "sh", "t")}

    async def main() -> Any:
        async with sshd, RealTransports(sshd.spec(), libvirt_socket=str(libvirtd)) as t:
            found = await check_prerequisites(
                t, "h1", {"libvirtd", "libvirtd-binary"}, requirements=reqs
            )
            return found, t.stats()

    found, stats = asyncio.run(main())
    assert found == []
    assert stats == {"h1": {"connections": 1, "channels": 1}}


def test_concurrent_calls_share_one_connection_with_per_call_errors(
    sshd: LocalSSHD, libvirtd: Path
) -> None:
    async def main() -> list[Any]:
        async with sshd, RealTransports(sshd.spec(), libvirt_socket=str(libvirtd)) as t:
            lv = t.libvirt("h1")
            conn = await lv.connect()
            calls = []
            for i in range(40):
                if i % 2:
                    calls.append(lv.run(conn.lookupByName, f"missing-{i}"))
                else:
                    calls.append(lv.run(conn.getLibVersion))
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())
    for i, r in enumerate(results):
        if i % 2:
            assert isinstance(r, LibvirtError) and r.not_found, r
            assert f"'missing-{i}'" in r.stderr  # libvirt's own message: this very call's
        else:
            assert r >= 9000000
    assert sshd.connections == 1
    assert len(sshd.unix_forwards) == 1
