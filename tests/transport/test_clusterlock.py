"""The cluster lock through ``Shell.start`` over real SSH (the in-process server of
``sshd_server.py``): taken, refused while held (naming the holder), freed when closed.

The lock file is moved into the test's temp dir: the server runs commands on this machine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sshd_server import LocalSSHD

from kvmstate.ops import clusterlock
from kvmstate.ops.runlock import LockTimeout
from kvmstate.spec import Spec
from kvmstate.transport.real import RealTransports


@pytest.fixture
def private_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    lock = tmp_path / "kvmstate.lock"
    script = clusterlock.LOCK_SCRIPT.replace(clusterlock.LOCK_FILE, str(lock)).replace(
        clusterlock.HOLDER_FILE, str(tmp_path / "kvmstate.holder")
    )
    assert "/run/" not in script
    monkeypatch.setattr(clusterlock, "LOCK_SCRIPT", script)
    return lock


def test_cluster_lock_over_ssh_is_exclusive_and_freed_on_close(
    sshd: LocalSSHD, private_lock: Path
) -> None:
    async def main() -> None:
        async with sshd:
            spec = sshd.spec()
            async with RealTransports(spec) as a, RealTransports(spec) as b:
                async with clusterlock.cluster_lock(a, spec, command="kvmstate apply one") as h:
                    assert h == "h1"
                    with pytest.raises(LockTimeout) as exc:
                        async with clusterlock.cluster_lock(b, spec, command="kvmstate apply 2"):
                            pass
                    assert "`kvmstate apply one`" in exc.value.holder
                    assert "(cluster lock on h1)" in exc.value.holder
                # closed: the other run takes it now, without waiting
                async with clusterlock.cluster_lock(b, spec, command="kvmstate apply 2"):
                    pass
                # one connection per run; the lock went through the run's shell channels
                assert a.stats()["h1"] == {"connections": 1, "channels": 1}
                assert b.stats()["h1"] == {"connections": 1, "channels": 2}

    asyncio.run(main())
    assert private_lock.exists()


def test_cluster_lock_waits_for_the_holder_then_takes_it(
    sshd: LocalSSHD, private_lock: Path
) -> None:
    async def main() -> list[str]:
        waits: list[str] = []
        async with sshd:
            spec = sshd.spec()
            async with RealTransports(spec) as a, RealTransports(spec) as b:
                held = asyncio.Event()
                release = asyncio.Event()

                async def first() -> None:
                    async with clusterlock.cluster_lock(a, spec, command="kvmstate apply one"):
                        held.set()
                        await release.wait()

                task = asyncio.ensure_future(first())
                await held.wait()

                def waiting(holder: str) -> None:
                    waits.append(holder)
                    release.set()  # the holder finishes only once the second run waits

                async with clusterlock.cluster_lock(
                    b, spec, command="kvmstate apply 2", timeout=60, on_wait=waiting
                ):
                    assert task.done()
                await task
        return waits

    waits = asyncio.run(main())
    assert len(waits) == 1 and "`kvmstate apply one`" in waits[0]


def test_cluster_lock_reports_a_failing_lock_script(
    sshd: LocalSSHD, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(clusterlock, "LOCK_SCRIPT", "echo no flock here >&2; exit 3")

    async def main() -> None:
        async with sshd:
            spec = sshd.spec()
            async with RealTransports(spec) as t:
                with pytest.raises(clusterlock.KvmstateError, match="exit 3 no flock here"):
                    async with clusterlock.cluster_lock(t, spec, command="kvmstate apply"):
                        pass

    asyncio.run(main())


def test_cluster_lock_on_the_fake_cluster_is_exclusive() -> None:
    """The same contract on the fake (whose lock script emulation is its own)."""
    from kvmstate.testing.fake import FakeCluster

    spec = Spec.model_validate(
        {"version": 1, "hosts": {"s": {"address": "10.0.0.1"}, "k": {"address": "10.0.0.2"}}}
    )
    cluster = FakeCluster(spec)

    async def main() -> None:
        async with clusterlock.cluster_lock(cluster, spec, command="kvmstate apply one") as h:
            assert h == "s" and cluster["s"].lock_holder is not None
            with pytest.raises(LockTimeout, match="`kvmstate apply one`"):
                async with clusterlock.cluster_lock(cluster, spec, command="kvmstate apply 2"):
                    pass
        assert cluster["s"].lock_holder is None
        async with clusterlock.cluster_lock(cluster, spec, command="kvmstate apply 2"):
            pass
        await cluster.close()

    asyncio.run(main())
