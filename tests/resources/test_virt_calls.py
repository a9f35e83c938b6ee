"""How many libvirt calls each observation makes (each one is a round trip to the host's
libvirtd, over SSH), and that the cheaper forms still tell the same states apart.

Counted on the libvirt test driver through a proxy that counts every method call on the
connection and on the objects it hands out, except the few that libvirt answers locally.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import libvirt
import pytest
from fakelab import converge_upto, run

from kvmstate import virt
from kvmstate.resources.base import RunContext
from kvmstate.testing.fake import FakeCluster

LOCAL = {"name", "UUIDString", "UUID", "ID", "connect"}  # no RPC: libvirt keeps these


class Counting:
    """A libvirt object whose remote calls are counted in ``calls`` (shared)."""

    def __init__(self, obj: Any, calls: list[str]) -> None:
        self._obj, self._calls = obj, calls

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._obj, attr)
        if not callable(value):
            return value

        def call(*a: Any, **kw: Any) -> Any:
            if attr not in LOCAL:
                self._calls.append(attr)
            return _wrap(value(*a, **kw), self._calls)

        return call


def _wrap(result: Any, calls: list[str]) -> Any:
    kinds = (libvirt.virDomain, libvirt.virStoragePool, libvirt.virStorageVol)
    if isinstance(result, kinds):
        return Counting(result, calls)
    if isinstance(result, list) and result and isinstance(result[0], kinds):
        return [Counting(x, calls) for x in result]
    return result


@pytest.fixture
def counted(cluster: FakeCluster, ctx: RunContext) -> Iterator[tuple[Any, list[str]]]:
    run(converge_upto(ctx, "domain"))  # pool, volume and the running guest on kvm-1
    calls: list[str] = []
    yield Counting(cluster["kvm-1"].conn(), calls), calls


def test_pool_observation_calls(counted: tuple[Any, list[str]]) -> None:
    conn, calls = counted
    st = virt.observe_pool(conn, "images")
    assert st is not None and st.active and "guest.qcow2" in st.volumes
    assert calls == [
        "storagePoolLookupByName",
        "isActive",
        "listAllVolumes",  # one call; listVolumes would be two (count, then names)
        "XMLDesc",
        "autostart",
    ]


def test_volume_observation_calls_and_the_inactive_pool(
    counted: tuple[Any, list[str]], cluster: FakeCluster
) -> None:
    conn, calls = counted
    assert virt.observe_volume(conn, "images", "guest.qcow2") is not None
    assert calls == ["storagePoolLookupByName", "storageVolLookupByName", "XMLDesc"]
    assert virt.observe_volume(conn, "images", "nope.qcow2") is None
    assert virt.observe_volume(conn, "nope", "guest.qcow2") is None
    cluster["kvm-1"].conn().storagePoolLookupByName("images").destroy()
    # the lookup itself says the pool is not active: no separate isActive call
    assert virt.observe_volume(conn, "images", "guest.qcow2") is None


def test_domain_observation_calls_running_and_shut_off(
    counted: tuple[Any, list[str]], cluster: FakeCluster
) -> None:
    conn, calls = counted
    running = virt.observe_domain(conn, "guest")
    assert running is not None and running.state == "running" and running.live is not None
    assert calls == [
        "lookupByName",
        "state",
        "XMLDesc",  # the current (running) definition: it has an id
        "XMLDesc",  # the persistent one
        "autostart",
        "isPersistent",
    ]
    assert running.config.disks == running.live.disks

    cluster["kvm-1"].conn().lookupByName("guest").destroy()
    calls.clear()
    off = virt.observe_domain(conn, "guest")
    assert off is not None and off.state == "shut-off" and off.live is None
    assert off.config == running.config
    assert calls == ["lookupByName", "state", "XMLDesc", "autostart", "isPersistent"]
    assert virt.observe_domain(conn, "nope") is None


def test_only_an_active_definition_counts_as_live() -> None:
    assert virt._LIVE_XML.match("<domain type='kvm' id='3'>\n  <name>a</name>")
    assert virt._LIVE_XML.match('  <domain type="qemu" id="12">')
    assert not virt._LIVE_XML.match("<domain type='kvm'>\n  <name>id='3'</name>")
    assert not virt._LIVE_XML.match("<domain type='kvm' xmlns:kid='x'>")


def test_a_pool_refresh_waits_for_the_pool_s_running_upload() -> None:
    """libvirt refuses `refresh` while an upload stream into the pool runs ("pool 'images' has
    asynchronous jobs running", seen on the lab): refresh_pool waits for it instead of failing
    the resource."""
    import libvirt

    class Pool:
        calls = 0

        def isActive(self) -> bool:
            return True

        def refresh(self, flags: int) -> None:
            Pool.calls += 1
            if Pool.calls < 3:
                raise libvirt.libvirtError("pool 'images' has asynchronous jobs running.")

    class Conn:
        def storagePoolLookupByName(self, name: str) -> Pool:
            return Pool()

    assert virt.refresh_pool(Conn(), "images") is True
    assert Pool.calls == 3

    class Broken(Pool):
        def refresh(self, flags: int) -> None:
            raise libvirt.libvirtError("cannot open directory")

    class Conn2:
        def storagePoolLookupByName(self, name: str) -> Pool:
            return Broken()

    with pytest.raises(libvirt.libvirtError, match="cannot open"):
        virt.refresh_pool(Conn2(), "images")
