"""The network kind against a REAL libvirtd 9.0: a private one, started by this module in its
own mount + network namespaces (``kvmstate.lab.private_libvirtd``; not the lab, nothing of the
machine's libvirt is touched). The resource's observe/diff/apply run through a plain libvirt
connection to it (no SSH: the kind reads no host command for NAT or isolated networks).

Seen on libvirt 9.0 (Debian 12): an isolated network with no address starts without dnsmasq;
one with an address needs dnsmasq even without DHCP (for DNS). A NAT network with DHCP needs
dnsmasq (and iptables): that part is skipped when ``dnsmasq`` is not installed.

Every network this module starts is destroyed before the daemon stops: libvirtd daemonizes
dnsmasq, which would otherwise outlive it."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from fakelab import LAB_SPEC, converge, find, make_spec, plan, run

from kvmstate import virt
from kvmstate.lab.private_libvirtd import private_libvirtd, unavailable
from kvmstate.model import Action
from kvmstate.resources.base import Options, RunContext
from kvmstate.transport.libvirt import libvirt_module

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))
T = TypeVar("T")
HAVE_DNSMASQ = os.path.exists("/usr/sbin/dnsmasq") or shutil.which("dnsmasq") is not None


class Direct:
    """Transports with only libvirt, on one connection to the private daemon."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def libvirt(self, host: str) -> Direct:
        return self

    def shell(self, host: str) -> Any:
        raise AssertionError(f"no shell here ({host})")

    async def connect(self) -> Any:
        return self.conn

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)


@pytest.fixture(scope="module")
def conn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with private_libvirtd(tmp_path_factory.mktemp("libvirtd")) as (sock, _pid):
        c = libvirt_module().open(f"qemu+unix:///system?socket={sock}")
        for n in c.listAllNetworks(0):  # Debian's stock `default` (copied /etc/libvirt)
            virt.undefine_network(c, n.name())
        try:
            yield c
        finally:
            for n in c.listAllNetworks(0):
                virt.undefine_network(c, n.name())
            c.close()


def ctx_for(text: str, conn: Any) -> tuple[Any, RunContext]:
    spec = make_spec(LAB_SPEC + text)
    return spec, RunContext(spec, Direct(conn), Options())  # type: ignore[arg-type]


def test_isolated_network_without_dnsmasq(conn: Any) -> None:
    spec, ctx = ctx_for(
        "networks:\n  iso: {mode: isolated, bridge: virbr8, hosts: [kvm-1]}\n", conn
    )
    res = find(spec, "network")
    assert run(plan(res, ctx)).action is Action.CREATE
    assert run(converge(res, ctx)).is_noop
    st = virt.observe_network(conn, "iso")
    assert st is not None and st.active and st.autostart and st.persistent
    assert (st.config.mode, st.config.bridge, st.config.address) == ("isolated", "virbr8", None)
    conn.networkLookupByName("iso").destroy()  # virsh net-destroy iso
    drift = run(plan(res, ctx))
    assert [(d.field, d.drift) for d in drift.diffs] == [("active", "runtime")]
    assert run(converge(res, ctx)).is_noop
    virt.undefine_network(conn, "iso")


NAT = """networks:
  nat:
    hosts: [kvm-1]
    bridge: virbr0
    address: 192.168.122.1/24
    dhcp:
      range: {start: 192.168.122.2, end: 192.168.122.254}
      hosts:
        - {mac: "52:54:00:aa:bb:cc", ip: 192.168.122.10, name: guest}
"""


@pytest.mark.skipif(not HAVE_DNSMASQ, reason="needs dnsmasq (Debian package dnsmasq-base)")
def test_nat_network_with_dhcp_three_runs_and_live_dhcp_edit(conn: Any) -> None:
    spec, ctx = ctx_for(NAT, conn)
    res = find(spec, "network")
    assert run(plan(res, ctx)).action is Action.CREATE
    assert run(converge(res, ctx)).is_noop
    net = conn.networkLookupByName("nat")
    uuid = net.UUIDString()
    st = virt.observe_network(conn, "nat")
    assert st is not None and st.live is not None and st.live == st.config
    assert st.config.dhcp_ranges == (("192.168.122.2", "192.168.122.254"),)
    # a static host and a smaller range: changed in place (live and persistent), no restart
    more = NAT.replace("2, end: 192.168.122.254", "100, end: 192.168.122.200").replace(
        "        - {mac:",
        '        - {mac: "52:54:00:00:00:02", ip: 192.168.122.20}\n        - {mac:',
    )
    spec2, ctx2 = ctx_for(more, conn)
    res2 = find(spec2, "network")
    change = run(plan(res2, ctx2))
    assert {d.field for d in change.diffs} == {"dhcp.range", "dhcp.hosts"}
    assert run(converge(res2, ctx2)).is_noop
    st2 = virt.observe_network(conn, "nat")
    assert st2 is not None and st2.live == st2.config and len(st2.config.dhcp_hosts) == 2
    assert conn.networkLookupByName("nat").UUIDString() == uuid
    # net-destroy by hand: runtime drift, one apply restores it
    conn.networkLookupByName("nat").destroy()
    assert [d.field for d in run(plan(res2, ctx2)).diffs] == ["active"]
    assert run(converge(res2, ctx2)).is_noop
    # a new address with no guest on it: stop, define, start
    moved, mctx = ctx_for(more.replace("192.168.122.", "192.168.100."), conn)
    assert run(converge(find(moved, "network"), mctx)).is_noop
    st3 = virt.observe_network(conn, "nat")
    assert st3 is not None and st3.live is not None and st3.live.address == "192.168.100.1/24"
    assert conn.networkLookupByName("nat").UUIDString() == uuid
    virt.undefine_network(conn, "nat")
    assert virt.observe_network(conn, "nat") is None
