"""The `networks:` kind: spec validation and cross-checks, the XML parser on real captured
`net-dumpxml` output (tests/fixtures/README.md), diff tables, and the cases only networks have
on the fake cluster (libvirt's test driver, which keeps networks in memory): DHCP changed in
place, a restart blocked while guests use the network, deletion, bridge networks, the graph
edge to domains and the migration pre-flight. The three-run contract with a `net-destroy`
behind its back is in test_conformance.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakelab import (
    LAB_SPEC,
    apply_change,
    converge,
    converge_upto,
    find,
    make_spec,
    plan,
    prepare,
    run,
)

from kvmstate import virt
from kvmstate.engine import Engine
from kvmstate.errors import RefusedError, SpecError
from kvmstate.ids import ResourceId
from kvmstate.loader import parse_spec_text
from kvmstate.model import Action, Plan
from kvmstate.resources import REGISTRY
from kvmstate.resources.base import Options, RunContext
from kvmstate.resources.network import compare, desired, dhcp_edits
from kvmstate.spec import Spec, VirtualNetwork
from kvmstate.testing.fake import FakeCluster
from kvmstate.virtxml import DhcpHostConfig, NetworkConfig, network_xml, parse_network_xml

FIX = Path(__file__).resolve().parent.parent / "fixtures"

NETWORKS = """networks:
  nat:
    hosts: [kvm-1, kvm-2]
    bridge: virbr0
    address: 192.168.122.1/24
    dhcp:
      range: {start: 192.168.122.2, end: 192.168.122.254}
      hosts:
        - {mac: "52:54:00:aa:bb:cc", ip: 192.168.122.10, name: guest}
"""
# the lab's guest, also on the NAT network
SPEC = LAB_SPEC.replace("      - bridge: br0\n", "      - bridge: br0\n      - network: nat\n")
SPEC += NETWORKS
NAT1 = ResourceId("network", "nat", "kvm-1")
NAT2 = ResourceId("network", "nat", "kvm-2")


def net(**kw: Any) -> VirtualNetwork:
    return VirtualNetwork.model_validate({"hosts": ["kvm-1"], **kw})


# --- the spec ------------------------------------------------------------------------------------


def test_a_nat_network_with_dhcp() -> None:
    n = make_spec(SPEC).networks["nat"]
    assert (n.mode, n.bridge, n.address, n.autostart, n.state) == (
        "nat",
        "virbr0",
        "192.168.122.1/24",
        True,
        "present",
    )
    assert n.dhcp is not None and n.dhcp.range is not None
    assert (n.dhcp.range.start, n.dhcp.hosts[0].name) == ("192.168.122.2", "guest")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"mode": "nat"}, "a nat network needs address"),
        ({"mode": "bridge"}, "a bridge network needs bridge"),
        ({"mode": "bridge", "bridge": "br0", "address": "10.0.0.1/24"}, "takes no address"),
        ({"mode": "isolated", "dhcp": {}}, "dhcp needs address"),
        ({"address": "192.168.122.1"}, "needs a prefix length"),
        ({"address": "192.168.122.0/24"}, "network's own or its broadcast"),
        ({"address": "192.168.122.300/24"}, "invalid address"),
        (
            {
                "address": "192.168.122.1/24",
                "dhcp": {"range": {"start": "192.168.122.9", "end": "192.168.122.2"}},
            },
            "starts after it ends",
        ),
        (
            {
                "address": "192.168.122.1/24",
                "dhcp": {"range": {"start": "192.168.122.2", "end": "192.168.123.9"}},
            },
            "192.168.123.9 is outside the network 192.168.122.0/24",
        ),
        (
            {
                "address": "192.168.122.1/24",
                "dhcp": {"hosts": [{"mac": "52:54:00:00:00:01", "ip": "192.168.122.1"}]},
            },
            "is the host's own address",
        ),
        (
            {
                "address": "192.168.122.1/24",
                "dhcp": {
                    "hosts": [
                        {"mac": "52:54:00:00:00:01", "ip": "192.168.122.5"},
                        {"mac": "52:54:00:00:00:01", "ip": "192.168.122.6"},
                    ]
                },
            },
            "mac '52:54:00:00:00:01' is listed twice",
        ),
        (
            {
                "address": "10.0.0.1/24",
                "dhcp": {"hosts": [{"mac": "01:00:00:00:00:01", "ip": "10.0.0.5"}]},
            },
            "multicast",
        ),
        ({"bridge": "a-much-too-long-bridge-name"}, "invalid interface name"),
    ],
)
def test_invalid_networks(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        net(**entry)


def test_cross_checks_with_file_and_line() -> None:
    bad = SPEC.replace(
        "    hosts: [kvm-1, kvm-2]\n    bridge: virbr0", "    hosts: [kvm-1]\n    bridge: virbr0"
    )
    with pytest.raises(SpecError) as e:
        parse_spec_text(bad, "spec.yaml", REGISTRY.spec_model, REGISTRY.check)
    assert (
        "domains.guest.interfaces.1.network: network 'nat' is not on 'kvm-2', where domain"
        in str(e.value)
    )
    assert "add to networks.nat.hosts" in str(e.value)
    extra = SPEC + (
        "  other:\n    hosts: [kvm-1, kvm-9]\n    bridge: virbr0\n    address: 192.168.0.1/16\n"
    )
    with pytest.raises(SpecError) as e:
        REGISTRY.parse(extra, "spec.yaml")
    text = str(e.value)
    assert "networks.other.hosts.1: unknown host 'kvm-9'" in text
    assert "bridge 'virbr0' on host 'kvm-1' is already the bridge of network 'nat'" in text
    assert "192.168.0.0/16 overlaps network 'nat' (192.168.122.0/24) on host 'kvm-1'" in text
    gone = SPEC.replace(
        "    address: 192.168.122.1/24\n", "    address: 192.168.122.1/24\n    state: absent\n"
    )
    with pytest.raises(SpecError, match="network 'nat' is state: absent"):
        REGISTRY.parse(gone)


def test_an_interface_on_a_network_the_spec_does_not_manage_is_fine() -> None:
    # libvirt's own `default`, made by hand: nothing to check, and no edge
    spec = make_spec(LAB_SPEC.replace("      - bridge: br0\n", "      - network: default\n"))
    graph = REGISTRY.graph(spec)
    assert not [r for r in graph.resources if r.kind == "network"]


# --- the parser, on real net-dumpxml output -------------------------------------------------------


def fixture(name: str) -> NetworkConfig:
    return parse_network_xml((FIX / f"libvirt-9.0-net-{name}.xml").read_text())


def test_parse_real_network_xml() -> None:
    assert fixture("nat-active") == NetworkConfig(
        "nat",
        "virbr0",
        "192.168.122.1/24",
        True,
        (("192.168.122.2", "192.168.122.254"),),
        frozenset({DhcpHostConfig("52:54:00:aa:bb:cc", "192.168.122.10", "guest")}),
    )
    assert fixture("debian-default") == NetworkConfig(
        "nat", "virbr0", "192.168.122.1/24", True, (("192.168.122.2", "192.168.122.254"),)
    )
    assert fixture("isolated-dhcp") == NetworkConfig(
        "isolated", "virbr9", "10.99.0.1/24", True, (("10.99.0.100", "10.99.0.199"),)
    )
    assert fixture("isolated-noip") == NetworkConfig("isolated", "virbr8")
    assert fixture("bridge") == NetworkConfig("bridge", "br0")


def test_parse_ignores_ipv6_and_takes_the_first_ipv4_address() -> None:
    xml = """<network><name>n</name><forward mode='route'/>
      <ip family='ipv6' address='fd00::1' prefix='64'/>
      <ip address='10.1.0.1' prefix='16'/><ip address='10.2.0.1' prefix='16'/></network>"""
    assert parse_network_xml(xml) == NetworkConfig("route", None, "10.1.0.1/16")
    with pytest.raises(ValueError, match="not a network definition"):
        parse_network_xml("<pool type='dir'/>")


@pytest.mark.parametrize("name", ["nat-active", "isolated-dhcp", "isolated-noip", "bridge"])
def test_what_kvmstate_writes_parses_back_the_same(name: str) -> None:
    cfg = fixture(name)
    assert parse_network_xml(network_xml("n", cfg, "4648aa50-1265-4562-b57d-6d33b51b4015")) == cfg


# --- diff tables ---------------------------------------------------------------------------------

HAVE = NetworkConfig(
    "nat",
    "virbr0",
    "192.168.122.1/24",
    True,
    (("192.168.122.2", "192.168.122.254"),),
    frozenset({DhcpHostConfig("52:54:00:aa:bb:cc", "192.168.122.10", "guest")}),
)
SEED = {
    "address": "192.168.122.1/24",
    "dhcp": {"range": {"start": "192.168.122.2", "end": "192.168.122.254"}},
}


@pytest.mark.parametrize(
    ("entry", "fields"),
    [
        ({"address": "192.168.122.1/24"}, []),  # DHCP not in the spec: not compared
        ({**SEED, "bridge": "virbr0"}, ["dhcp.hosts"]),
        ({**SEED, "bridge": "virbr1"}, ["bridge", "dhcp.hosts"]),
        ({"address": "192.168.123.1/24"}, ["address"]),
        ({"mode": "isolated", "address": "192.168.122.1/24"}, ["mode"]),
        (
            {
                "address": "192.168.122.1/24",
                "dhcp": {
                    "hosts": [{"mac": "52:54:00:AA:BB:CC", "ip": "192.168.122.10", "name": "guest"}]
                },
            },
            [],  # no range in the spec: only the hosts are compared (MACs in any case)
        ),
        ({"address": "192.168.122.1/24", "dhcp": {}}, ["dhcp.hosts"]),
    ],
)
def test_only_the_fields_the_spec_sets_are_compared(
    entry: dict[str, Any], fields: list[str]
) -> None:
    assert [d.field for d in compare(net(**entry), HAVE, "config")] == fields


def test_dhcp_edits_delete_first_then_add() -> None:
    n = net(
        address="192.168.122.1/24",
        dhcp={
            "range": {"start": "192.168.122.100", "end": "192.168.122.200"},
            "hosts": [
                {"mac": "52:54:00:aa:bb:cc", "ip": "192.168.122.11", "name": "guest"},
                {"mac": "52:54:00:00:00:02", "ip": "192.168.122.12"},
            ],
        },
    )
    edits = [(e.command, e.section, e.xml) for e in dhcp_edits(n, HAVE)]
    assert edits == [
        ("delete", "range", '<range start="192.168.122.2" end="192.168.122.254" />'),
        ("delete", "host", '<host mac="52:54:00:aa:bb:cc" name="guest" ip="192.168.122.10" />'),
        ("add", "host", '<host mac="52:54:00:00:00:02" ip="192.168.122.12" />'),
        ("add", "host", '<host mac="52:54:00:aa:bb:cc" name="guest" ip="192.168.122.11" />'),
        ("add", "range", '<range start="192.168.122.100" end="192.168.122.200" />'),
    ]
    assert dhcp_edits(net(address="192.168.122.1/24"), HAVE) == []


def test_a_redefinition_keeps_what_the_spec_does_not_set() -> None:
    # the bridge libvirt picked and a DHCP the spec does not manage stay as they are
    got = desired(net(mode="isolated", address="192.168.122.1/24"), HAVE)
    assert got == NetworkConfig(
        "isolated", "virbr0", "192.168.122.1/24", True, HAVE.dhcp_ranges, HAVE.dhcp_hosts
    )
    # a new address drops the old DHCP (it would be outside the network)
    assert desired(net(address="10.0.0.1/24"), HAVE) == NetworkConfig(
        "nat", "virbr0", "10.0.0.1/24"
    )
    assert desired(net(mode="bridge", bridge="br0"), HAVE) == NetworkConfig("bridge", "br0")


# --- on the fake cluster -------------------------------------------------------------------------


@pytest.fixture
def nspec() -> Spec:
    return make_spec(SPEC)


@pytest.fixture
def ncluster(nspec: Spec) -> Iterator[FakeCluster]:
    c = FakeCluster(nspec)
    prepare(c)
    yield c
    run(c.close())


def whole_plan(spec: Spec, cluster: FakeCluster, **opts: Any) -> Plan:
    return run(Engine(REGISTRY.graph(spec), RunContext(spec, cluster, Options(**opts))).plan())


def whole_apply(spec: Spec, cluster: FakeCluster, plan_: Plan, **opts: Any) -> None:
    engine = Engine(REGISTRY.graph(spec), RunContext(spec, cluster, Options(**opts)))
    report = run(engine.apply(plan_))
    assert report.converged, report.as_dict()


def state(cluster: FakeCluster, host: str, name: str = "nat") -> virt.NetworkState | None:
    return virt.observe_network(cluster[host].conn(), name)


def converged(spec: Spec, cluster: FakeCluster) -> None:
    whole_apply(spec, cluster, whole_plan(spec, cluster))
    assert not whole_plan(spec, cluster).has_changes


def test_created_on_every_host_before_the_domains_on_it(nspec: Spec, ncluster: FakeCluster) -> None:
    graph = REGISTRY.graph(nspec)
    assert {NAT1, NAT2} <= set(graph.dependencies(ResourceId("domain", "guest")))
    first = whole_plan(nspec, ncluster)
    ch = {c.id: c for c in first.changes}
    assert ch[NAT1].action is Action.CREATE
    assert ch[NAT1].reason == (
        "nat network nat on virbr0 192.168.122.1/24, DHCP 192.168.122.2-192.168.122.254 + 1 "
        "static on kvm-1"
    )
    converged(nspec, ncluster)
    for h in ("kvm-1", "kvm-2"):
        st = state(ncluster, h)
        assert st is not None and st.active and st.autostart and st.persistent
        assert st.config == HAVE
    noop = {c.id: c for c in whole_plan(nspec, ncluster).changes}[NAT1]
    assert noop.reason == (
        "nat network nat on virbr0 192.168.122.1/24, DHCP 192.168.122.2-192.168.122.254 + 1 "
        "static active on kvm-1 (autostart)"
    )


def test_destroyed_by_hand_is_runtime_drift(nspec: Spec, ncluster: FakeCluster) -> None:
    converged(nspec, ncluster)
    ncluster["kvm-1"].conn().networkLookupByName("nat").destroy()  # virsh net-destroy nat
    drift = whole_plan(nspec, ncluster)
    assert [(str(c.id), [(d.field, d.drift) for d in c.diffs]) for c in drift.pending] == [
        (str(NAT1), [("active", "runtime")])
    ]
    converged(nspec, ncluster)


def test_dhcp_hosts_change_in_place_while_guests_use_it(nspec: Spec, ncluster: FakeCluster) -> None:
    converged(nspec, ncluster)
    uuid = ncluster["kvm-1"].conn().networkLookupByName("nat").UUIDString()
    more = make_spec(
        SPEC.replace(
            "        - {mac:",
            '        - {mac: "52:54:00:00:00:02", ip: 192.168.122.20}\n        - {mac:',
        )
    )
    change = whole_plan(more, ncluster)
    nat1 = {c.id: c for c in change.changes}[NAT1]
    assert nat1.action is Action.UPDATE and not nat1.blocked
    assert [(d.field, d.after) for d in nat1.diffs] == [
        (
            "dhcp.hosts",
            ["52:54:00:aa:bb:cc=192.168.122.10 (guest)", "52:54:00:00:00:02=192.168.122.20"],
        )
    ]
    converged(more, ncluster)
    st = ncluster["kvm-1"].conn().networkLookupByName("nat")
    assert st.UUIDString() == uuid and st.isActive()  # updated, not redefined


def test_a_restart_is_blocked_while_running_domains_use_it(
    nspec: Spec, ncluster: FakeCluster
) -> None:
    converged(nspec, ncluster)
    moved = make_spec(SPEC.replace("192.168.122.", "192.168.100."))
    nat1 = {c.id: c for c in whole_plan(moved, ncluster).changes}[NAT1]
    assert {d.field for d in nat1.diffs} >= {"address"}
    assert nat1.blocked == (
        "network nat on kvm-1: changing address restarts the network, which would cut off "
        "running domains guest; stop or move them first"
    )
    # kvm-2 runs no guest on it: changed there
    nat2 = {c.id: c for c in whole_plan(moved, ncluster).changes}[NAT2]
    assert not nat2.blocked


def test_a_restart_when_nobody_uses_it(nspec: Spec, ncluster: FakeCluster) -> None:
    ctx = RunContext(nspec, ncluster, Options())
    res = find(nspec, "network", "kvm-2")
    assert run(converge(res, ctx)).is_noop
    moved = make_spec(SPEC.replace("192.168.122.", "192.168.100.").replace("virbr0", "virbr5"))
    mctx = RunContext(moved, ncluster, Options())
    mres = find(moved, "network", "kvm-2")
    change = run(plan(mres, mctx))
    assert {d.field for d in change.diffs} == {"address", "bridge", "dhcp.range", "dhcp.hosts"}
    assert run(converge(mres, mctx)).is_noop
    st = state(ncluster, "kvm-2")
    assert st is not None and st.active and st.config.address == "192.168.100.1/24"
    assert st.config.bridge == "virbr5"


def test_absent_deletes_it_but_not_while_it_is_used(nspec: Spec, ncluster: FakeCluster) -> None:
    converged(nspec, ncluster)
    gone_text = SPEC.replace(
        "    address: 192.168.122.1/24\n", "    address: 192.168.122.1/24\n    state: absent\n"
    ).replace("      - network: nat\n", "")
    gone = make_spec(gone_text)
    ctx = RunContext(gone, ncluster, Options())
    # the guest still runs on it on kvm-1 (its live definition names the network)
    on1 = run(plan(find(gone, "network", "kvm-1"), ctx))
    assert on1.action is Action.DELETE
    assert on1.blocked == (
        "network nat on kvm-1 is in use by running domains guest: stop or move them first"
    )
    on2 = run(plan(find(gone, "network", "kvm-2"), ctx))
    assert on2.action is Action.DELETE and not on2.blocked
    run(apply_change(find(gone, "network", "kvm-2"), on2, ctx))
    assert state(ncluster, "kvm-2") is None
    with pytest.raises(RefusedError, match="in use by running domains guest"):
        run(apply_change(find(gone, "network", "kvm-1"), on1, ctx))


def test_bridge_network_needs_the_host_bridge(ncluster: FakeCluster) -> None:
    spec = make_spec(LAB_SPEC + "networks:\n  lan: {mode: bridge, bridge: br0, hosts: [kvm-1]}\n")
    ctx = RunContext(spec, ncluster, Options())
    res = find(spec, "network")
    assert {r.name for reqs in res.needs().values() for r in reqs} == {
        "libvirtd",
        "libvirtd-binary",
    }  # no dnsmasq for a bridge network
    assert run(converge(res, ctx)).is_noop
    assert state(ncluster, "kvm-1", "lan") is not None
    run(ncluster.libvirt("kvm-1").run(virt.undefine_network, ncluster["kvm-1"].conn(), "lan"))
    ncluster["kvm-1"].bridges.clear()
    change = run(plan(res, ctx))
    assert change.action is Action.CREATE
    with pytest.raises(RefusedError, match="host bridge br0 does not exist on kvm-1"):
        run(apply_change(res, change, ctx))


def test_dnsmasq_is_a_prerequisite(nspec: Spec, ncluster: FakeCluster) -> None:
    assert "dnsmasq" in REGISTRY.needs_for_host(nspec, "kvm-1")
    assert "dnsmasq" not in REGISTRY.needs_for_host(nspec, "storage")
    ncluster["kvm-1"].missing.add("cmd:dnsmasq")
    errors = {str(rid): msg for rid, msg in whole_plan(nspec, ncluster).errors.items()}
    assert (
        "kvm-1: command `dnsmasq` not found (needed for libvirt networks with an address)"
        in (errors[str(NAT1)])
    )
    assert "(install the Debian package dnsmasq-base)" in errors[str(NAT1)]


def test_migration_preflight_checks_the_network_on_the_target(
    nspec: Spec, ncluster: FakeCluster
) -> None:
    converged(nspec, ncluster)
    moved = make_spec(SPEC.replace("    host: kvm-1\n", "    host: kvm-2\n"))
    ctx = RunContext(moved, ncluster, Options())
    res = find(moved, "placement")
    ok = run(plan(res, ctx))
    check = {c.name: c for c in ok.checks}["network nat"]
    assert check.ok and check.detail == "network nat active on kvm-2"
    ncluster["kvm-2"].conn().networkLookupByName("nat").destroy()
    # a spec without the network: a stopped network on the target blocks the move
    unmanaged = make_spec(
        LAB_SPEC.replace(
            "      - bridge: br0\n", "      - bridge: br0\n      - network: nat\n"
        ).replace("    host: kvm-1\n", "    host: kvm-2\n")
    )
    uctx = RunContext(unmanaged, ncluster, Options())
    blocked = run(plan(find(unmanaged, "placement"), uctx))
    assert blocked.action is Action.MIGRATE
    assert blocked.blocked is not None
    assert "network nat: network nat defined but not active on kvm-2" in blocked.blocked
    ncluster["kvm-2"].conn().networkLookupByName("nat").undefine()
    gone = run(plan(find(unmanaged, "placement"), uctx))
    assert gone.blocked is not None and "network nat not defined on kvm-2" in gone.blocked
    # the spec manages it there: the network node (a dependency) starts it before the move
    managed = run(plan(res, ctx))
    assert not managed.blocked
    assert {c.name: c.detail for c in managed.checks}["network nat"] == (
        "network nat not active on kvm-2 yet: networks.nat starts it first"
    )
    whole_apply(moved, ncluster, whole_plan(moved, ncluster))
    assert virt.observe_domain(ncluster["kvm-2"].conn(), "guest") is not None
    assert not whole_plan(moved, ncluster).has_changes


def test_converge_upto_networks(nspec: Spec, ncluster: FakeCluster) -> None:
    ctx = RunContext(nspec, ncluster, Options())
    run(converge_upto(ctx, "network"))
    assert all(state(ncluster, h) is not None for h in ("kvm-1", "kvm-2"))
