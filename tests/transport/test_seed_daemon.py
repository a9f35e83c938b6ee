"""The cloud-init seed and the graceful shutdown against a REAL libvirtd (a private one, started
here in its own mount and network namespaces: not the lab), reached the way kvmstate reaches
hosts: over the SSH connection (an in-process sshd that runs commands on this machine) with
libvirt's RPC forwarded through it. What libvirt's test driver cannot do is proven here: the
seed ISO goes up through virStorageVolUpload + virStream, and a QEMU guest that does not
answer the ACPI power button is powered off after ``shutdown_timeout``.

Skipped unless root with ``unshare``, ``libvirtd`` and ``qemu-system-x86_64``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sshd_server import LocalSSHD

from kvmstate import virt
from kvmstate.cloudinit import build_seed, read_iso
from kvmstate.engine import Engine
from kvmstate.model import Event, Message, Plan, Report
from kvmstate.resources import REGISTRY
from kvmstate.resources.base import Options, RunContext
from kvmstate.spec import Spec
from kvmstate.transport.real import RealTransports

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0
    or not shutil.which("unshare")
    or not os.path.exists("/usr/sbin/libvirtd")
    or not shutil.which("qemu-system-x86_64"),
    reason="needs root, unshare, libvirtd and qemu-system-x86_64",
)

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtZ9Ek8oXFZc2w9r8c1F7M3Tq1Jm4aQdNqgqT0sYv0H t@x"
HASH = "$6$kvmstate$0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ"


@pytest.fixture(scope="module")
def libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from kvmstate.lab.private_libvirtd import private_libvirtd

    with private_libvirtd(tmp_path_factory.mktemp("libvirtd")) as (sock, _pid):
        yield Path(sock)


def _spec(sshd: LocalSSHD, pool: Path, **domain: Any) -> Spec:
    data = sshd.spec().model_dump(mode="json", exclude_none=True)
    data["pools"] = {"seeds": {"path": str(pool), "hosts": ["h1"]}}
    vm: dict[str, Any] = {
        "type": "qemu",
        "memory": "64MiB",
        "host": "h1",
        "state": "shut-off",
        "cloud_init": {
            "pool": "seeds",
            "hostname": "vm-one",
            "users": [{"name": "debian", "ssh_authorized_keys": [KEY], "password_hash": HASH}],
        },
    }
    vm.update(domain)
    data["domains"] = {"vm": vm}
    return REGISTRY.spec_model.model_validate(data)


async def _run(
    spec: Spec, t: RealTransports, events: list[Event] | None = None, **opts: Any
) -> tuple[Plan, Report | None, Plan]:
    sink = events.append if events is not None else None
    ctx = RunContext(spec, t, Options(allow_destroy=True, **opts), sink)
    engine = Engine(REGISTRY.graph(spec), ctx)
    plan = await engine.plan()
    assert not plan.errors, plan.errors
    report = await engine.apply(plan) if plan.has_changes else None
    if report is not None:
        assert report.converged, report.as_dict()
    ctx2 = RunContext(spec, t, Options(), None)
    return plan, report, await Engine(REGISTRY.graph(spec), ctx2).plan()


def test_seed_uploaded_over_the_ssh_connection_and_rewritten_in_place(
    sshd: LocalSSHD, libvirtd: Path, tmp_path: Path
) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    iso = pool / "vm-cidata.iso"
    changed_identity = {"pool": "seeds", "hostname": "vm-two", "users": [{"name": "a"}]}
    specs: list[Spec] = []

    async def main() -> tuple[Plan, Plan, Plan, Plan, int, int]:
        async with sshd:
            spec = _spec(sshd, pool)
            changed = _spec(sshd, pool, cloud_init=changed_identity)
            specs.append(changed)
            async with RealTransports(spec, libvirt_socket=str(libvirtd)) as t:
                return await body(t, spec, changed)

    async def body(
        t: RealTransports, spec: Spec, changed: Spec
    ) -> tuple[Plan, Plan, Plan, Plan, int, int]:
        if True:
            first, _, after = await _run(spec, t)
            inode = iso.stat().st_ino
            second, _, after2 = await _run(changed, t)
            lv = t.libvirt("h1")
            conn = await lv.connect()
            try:
                xml = await lv.run(virt.inactive_xml, conn, "vm")
            finally:
                await lv.run(virt.undefine_domain, conn, "vm")
                await lv.run(virt.undefine_pool, conn, "seeds")
            cdroms = virt.parse_domain_xml(xml).cdroms
            assert [(c.path, c.readonly) for c in cdroms] == [(str(iso), True)]
            return first, after, second, after2, inode, iso.stat().st_ino

    first, after, second, after2, inode_before, inode_after = asyncio.run(main())
    seed_change = next(c for c in first.changes if c.id.kind == "seed")
    assert seed_change.action.value == "create"
    assert not after.has_changes and not after2.has_changes
    image = iso.read_bytes()
    ci = specs[0].domains["vm"].cloud_init
    assert ci is not None
    assert hashlib.sha256(image).hexdigest() == build_seed("vm", ci).sha256
    assert b"local-hostname: vm-two" in read_iso(image)["meta-data"]
    assert oct(iso.stat().st_mode & 0o777) == "0o600"
    assert inode_before == inode_after  # the same file, written in place
    update = next(c for c in second.changes if c.id.kind == "seed")
    assert update.action.value == "update" and "next boot" in update.reason
    text = str([c.as_dict() for c in (*first.changes, *second.changes)])
    assert HASH not in text and KEY.split()[1] not in text


def test_a_guest_that_ignores_the_power_button_is_powered_off_after_the_timeout(
    sshd: LocalSSHD, libvirtd: Path, tmp_path: Path
) -> None:
    """A QEMU guest with no operating system (SeaBIOS finds nothing to boot) never answers
    the ACPI power button: kvmstate asks, waits shutdown_timeout, then powers it off."""
    pool = tmp_path / "pool"
    pool.mkdir()
    events: list[Event] = []

    async def main() -> str | None:
        async with sshd:
            running = _spec(sshd, pool, state="running")
            off = _spec(sshd, pool, state="shut-off", shutdown_timeout="2s")
            async with RealTransports(running, libvirt_socket=str(libvirtd)) as t:
                return await body(t, running, off)

    async def body(t: RealTransports, running: Spec, off: Spec) -> str | None:
        if True:
            lv = t.libvirt("h1")
            conn = await lv.connect()
            try:
                await _run(running, t)
                assert await lv.run(virt.domain_state, conn, "vm") == "running"
                _, report, after = await _run(off, t, events)
                assert report is not None and not after.has_changes
                return await lv.run(virt.domain_state, conn, "vm")
            finally:
                await lv.run(virt.undefine_domain, conn, "vm")
                await lv.run(virt.undefine_pool, conn, "seeds")

    assert asyncio.run(main()) == "shut-off"
    texts = [e.text for e in events if isinstance(e, Message)]
    assert any("did not shut down within 2s" in x and "powering it off" in x for x in texts), texts
