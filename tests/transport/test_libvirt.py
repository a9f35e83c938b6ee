"""libvirt over the host's SSH connection: forwarding, URIs, error mapping, thread model."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from pathlib import Path

import libvirt
import pytest
from sshd_server import LocalSSHD

from kvmstate.errors import HostUnreachable
from kvmstate.spec import SSHSettings
from kvmstate.transport import libvirt as lvmod
from kvmstate.transport.libvirt import LibvirtError, LibvirtOverSSH, ssh_uri, unix_uri
from kvmstate.transport.real import RealTransports, target_for
from kvmstate.transport.ssh import SSHHost


def test_unix_uri() -> None:
    assert (
        unix_uri("/tmp/kvmstate-h1-x/libvirt-sock")
        == "qemu+unix:///system?socket=/tmp/kvmstate-h1-x/libvirt-sock"
    )
    assert unix_uri("/tmp/a b/s") == "qemu+unix:///system?socket=/tmp/a%20b/s"


def test_ssh_uri_for_migration_destination() -> None:
    s = SSHSettings(
        user="root",
        port=2222,
        identity=("/root/.ssh/id_lab",),
        known_hosts="/etc/kvmstate/known_hosts",
        verify_host_key=True,
        config=None,
        connect_timeout=10,
        keepalive_interval=60,
        sudo=False,
    )
    assert ssh_uri("10.77.0.11", s) == (
        "qemu+ssh://root@10.77.0.11:2222/system?keyfile=/root/.ssh/id_lab"
        "&known_hosts=/etc/kvmstate/known_hosts&no_tty=1"
    )
    s2 = s.model_copy(update={"verify_host_key": False, "identity": None, "known_hosts": None})
    assert ssh_uri("fd00::1", s2) == "qemu+ssh://root@[fd00::1]:2222/system?no_verify=1&no_tty=1"


def test_libvirt_module_silences_stderr_once() -> None:
    assert lvmod.libvirt_module() is libvirt
    assert lvmod.libvirt_module() is lvmod.libvirt_module()


def test_error_codes_match_the_libvirt_module() -> None:
    for name in dir(lvmod):
        if name.startswith("VIR_ERR_"):
            assert getattr(lvmod, name) == getattr(libvirt, name), name


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(4096):
        writer.write(b"echo:" + data)
        await writer.drain()
    writer.close()


def test_forward_over_the_same_connection(sshd: LocalSSHD, tmp_path: Path) -> None:
    remote = str(tmp_path / "remote.sock")

    async def main() -> None:
        echo = await asyncio.start_unix_server(_echo, path=remote)
        async with sshd:
            t = RealTransports(sshd.spec(), libvirt_socket=remote)
            await t.shell("h1").run(["true"])
            lv = t.libvirt("h1")
            local = await lv.forward()
            assert await lv.forward() == local  # once
            mode = os.stat(os.path.dirname(local)).st_mode
            assert stat.S_IMODE(mode) == 0o700
            assert lv.uri == unix_uri(local)
            for i in range(3):
                reader, writer = await asyncio.open_unix_connection(local)
                writer.write(f"ping{i}".encode())
                await writer.drain()
                assert await reader.read(100) == f"echo:ping{i}".encode()
                writer.close()
            assert t.stats() == {"h1": {"connections": 1, "channels": 1}}
            await t.close()
            assert not Path(local).parent.exists()
        assert sshd.connections == 1
        assert sshd.unix_forwards == [remote] * 3
        echo.close()
        await echo.wait_closed()

    asyncio.run(main())


def test_every_hosts_forward_is_in_one_private_directory(sshd: LocalSSHD, tmp_path: Path) -> None:
    """One 0700 directory per run holds each host's socket (not a directory per host); a
    forward made again (the connection was replaced) reuses its name; close removes it all."""
    remote = str(tmp_path / "remote.sock")

    async def main() -> None:
        echo = await asyncio.start_unix_server(_echo, path=remote)
        async with sshd:
            t = RealTransports(sshd.spec(hosts=3), libvirt_socket=remote)
            locals_ = [await t.libvirt(h).forward() for h in ("h1", "h2", "h3")]
            parent = os.path.dirname(locals_[0])
            assert [os.path.basename(p) for p in locals_] == ["h1.sock", "h2.sock", "h3.sock"]
            assert {os.path.dirname(p) for p in locals_} == {parent}
            assert stat.S_IMODE(os.stat(parent).st_mode) == 0o700
            lv = t.libvirt("h2")
            await lv._teardown()  # what a replaced SSH connection leads to
            assert sorted(os.listdir(parent)) == ["h1.sock", "h3.sock"]
            assert await lv.forward() == locals_[1]
            reader, writer = await asyncio.open_unix_connection(locals_[1])
            writer.write(b"again")
            await writer.drain()
            assert await reader.read(100) == b"echo:again"
            writer.close()
            await t.close()
            assert not os.path.exists(parent)
        echo.close()
        await echo.wait_closed()

    asyncio.run(main())


def test_libvirt_open_over_forward_reports_daemon_not_answering(
    sshd: LocalSSHD, tmp_path: Path
) -> None:
    missing = str(tmp_path / "no-libvirtd.sock")

    async def main() -> None:
        async with sshd, RealTransports(sshd.spec(), libvirt_socket=missing) as t:
            with pytest.raises(HostUnreachable) as exc:
                await t.libvirt("h1").connect()
            assert t.stats()["h1"]["connections"] == 1
        msg = str(exc.value)
        assert msg.startswith("h1: unreachable: libvirtd on 127.0.0.1")
        assert missing in msg
        assert "not answering" in msg

    asyncio.run(main())


def _direct(sshd: LocalSSHD, host: str = "h1", uri: str = "test:///default") -> LibvirtOverSSH:
    sshd.port = sshd.port or 2222
    return LibvirtOverSSH(SSHHost(target_for(sshd.spec(), host)), direct_uri=uri)


def test_run_maps_libvirt_errors_keeping_the_code(sshd: LocalSSHD) -> None:
    async def main() -> None:
        lv = _direct(sshd)
        conn = await lv.connect()
        assert await lv.connect() is conn
        assert await lv.run(conn.getType) == "TEST"
        names = await lv.run(conn.listDefinedDomains)
        assert isinstance(names, list)
        with pytest.raises(LibvirtError) as exc:
            await lv.run(conn.lookupByName, "no-such-domain")
        e = exc.value
        assert e.code == libvirt.VIR_ERR_NO_DOMAIN
        assert e.not_found
        assert not e.temporary
        assert e.host == "h1"
        assert str(e) == "h1: `libvirt lookupByName('no-such-domain')` failed: Domain not found"
        with pytest.raises(LibvirtError) as exc2:
            await lv.run(conn.storagePoolLookupByName, "nope")
        assert exc2.value.code == libvirt.VIR_ERR_NO_STORAGE_POOL and exc2.value.not_found
        with pytest.raises(LibvirtError) as exc3:
            await lv.run(conn.defineXML, "<domain>broken")
        assert not exc3.value.not_found
        await lv.close()

    asyncio.run(main())


def test_libvirt_stderr_handler_silenced(
    sshd: LocalSSHD, capfd: pytest.CaptureFixture[str]
) -> None:
    async def main() -> None:
        lv = _direct(sshd)
        conn = await lv.connect()
        with pytest.raises(LibvirtError):
            await lv.run(conn.lookupByName, "quiet-please")
        await lv.close()

    asyncio.run(main())
    assert "quiet-please" not in capfd.readouterr().err


def test_thread_model_per_host_pool_off_the_loop(sshd: LocalSSHD) -> None:
    async def main() -> None:
        a, b = _direct(sshd, "h1"), _direct(sshd, "h1")
        one = LibvirtOverSSH(a.ssh, direct_uri="test:///default", threads=1)
        seen: list[int] = []

        def where(i: int) -> int:
            seen.append(i)
            return threading.get_ident()

        threads_a = set(await asyncio.gather(*(a.run(where, i) for i in range(10))))
        threads_b = set(await asyncio.gather(*(b.run(where, i) for i in range(10))))
        assert 1 <= len(threads_a) <= 4 and 1 <= len(threads_b) <= 4
        assert not threads_a & threads_b  # each host its own threads
        assert threading.get_ident() not in threads_a | threads_b  # never the loop's thread
        seen.clear()
        threads_one = set(await asyncio.gather(*(one.run(where, i) for i in range(10))))
        assert len(threads_one) == 1 and seen == list(range(10))  # threads=1: serialized
        for lv in (a, b, one):
            await lv.close()

    asyncio.run(main())


def test_concurrent_calls_on_one_host_overlap(sshd: LocalSSHD) -> None:
    """Four calls are in flight at once: each waits at a barrier for all four (serialized,
    the first would wait alone; the barrier's timeout only turns that hang into a failure).
    How much they overlap in time is ``bench.transport``'s figure."""

    async def main() -> list[int]:
        lv = _direct(sshd)
        barrier = threading.Barrier(4, timeout=30)
        got = await asyncio.gather(*(lv.run(barrier.wait) for _ in range(4)))
        await lv.close()
        return sorted(got)

    assert asyncio.run(main()) == [0, 1, 2, 3]


def test_blocking_call_does_not_block_the_loop(sshd: LocalSSHD) -> None:
    """A blocking call waits for an event that only the event loop sets: it returns True
    only if the loop kept running while the call blocked."""

    async def main() -> bool:
        lv = _direct(sshd)
        await lv.connect()
        on_the_loop = threading.Event()
        started = threading.Event()

        def blocking() -> bool:
            started.set()
            return on_the_loop.wait(timeout=30)

        async def loop_side() -> None:
            while not started.is_set():
                await asyncio.sleep(0)
            on_the_loop.set()

        ok, _ = await asyncio.gather(lv.run(blocking), loop_side())
        await lv.close()
        return ok

    assert asyncio.run(main()) is True


def test_detailed_stats_count_forwards_and_libvirt_calls(sshd: LocalSSHD, tmp_path: Path) -> None:
    remote = str(tmp_path / "remote.sock")

    async def main() -> dict[str, dict[str, float]]:
        echo = await asyncio.start_unix_server(_echo, path=remote)
        async with sshd, RealTransports(sshd.spec(), libvirt_socket=remote) as t:
            await t.shell("h1").run_many([["true"], ["true"]])
            await t.libvirt("h1").forward()
            out = t.detailed_stats()
        echo.close()
        await echo.wait_closed()
        return out

    d = asyncio.run(main())["h1"]
    assert (d["connections"], d["channels"], d["forwards"], d["libvirt_calls"]) == (1, 1, 1, 0)
    assert d["connect_seconds"] > 0


def test_a_call_on_an_already_closed_connection_is_temporary() -> None:
    """After the SSH connection under libvirt drops, a call meets either "End of file while
    reading data" (a system error) or, when libvirt's client saw the EOF first, "client
    socket is closed" (an internal error by code): both are a lost connection, retried on a
    new one. Other internal errors are not."""
    from kvmstate.transport.libvirt import LibvirtError

    closed = LibvirtError("h1", "getLibVersion()", 1, "internal error: client socket is closed")
    assert closed.temporary
    eof = LibvirtError("h1", "getLibVersion()", 38, "End of file while reading data")
    assert eof.temporary
    other = LibvirtError("h1", "defineXML()", 1, "internal error: unexpected domain type")
    assert not other.temporary
