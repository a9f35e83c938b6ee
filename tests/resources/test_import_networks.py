"""``kvmstate import`` of libvirt networks on the fake cluster (libvirt's test driver keeps
networks in memory): a NAT network with DHCP defined alike on both KVM hosts comes back as one
``networks:`` entry whose plan shows no change; what the spec cannot hold is left out and
named."""

from __future__ import annotations

from fakelab import LAB_SPEC, converged_cluster, import_round_trip, run

from kvmstate import virt
from kvmstate.engine import Engine
from kvmstate.engine.graph import build_graph
from kvmstate.resources import KINDS
from kvmstate.resources.base import Options, RunContext
from kvmstate.virtxml import NetworkConfig

NETWORKS = """networks:
  nat:
    hosts: [kvm-1, kvm-2]
    bridge: virbr0
    address: 192.168.122.1/24
    dhcp:
      range: {start: 192.168.122.2, end: 192.168.122.254}
      hosts:
        - {mac: "52:54:00:aa:bb:cc", ip: 192.168.122.10, name: guest}
  iso:
    mode: isolated
    hosts: [kvm-2]
    bridge: virbr9
    autostart: false
"""
SPEC = LAB_SPEC.replace("      - bridge: br0\n", "      - bridge: br0\n      - network: nat\n")
SPEC += NETWORKS


def test_networks_are_imported_and_plan_no_change() -> None:
    spec, cluster = converged_cluster(SPEC)
    got, _notes = import_round_trip(spec, cluster)
    assert got.networks == spec.networks
    assert [i.network for i in got.domains["guest"].interfaces] == [None, "nat"]
    plan = run(Engine(build_graph(got, KINDS), RunContext(got, cluster, Options())).plan())
    assert [str(c.id) for c in plan.changes if not c.is_noop] == []


def test_what_the_spec_cannot_hold_is_left_out_and_named() -> None:
    spec, cluster = converged_cluster(SPEC)
    k1, k2 = cluster["kvm-1"].conn(), cluster["kvm-2"].conn()
    # defined differently on the two hosts: another DHCP range on kvm-2
    virt.stop_network(k2, "nat")
    virt.undefine_network(k2, "nat")
    other = NetworkConfig(
        "nat", "virbr0", "192.168.122.1/24", True, (("192.168.122.100", "192.168.122.200"),)
    )
    virt.define_network(k2, "nat", other)
    virt.start_network(k2, "nat")
    # a routed network, and one stopped by hand
    virt.define_network(k1, "routed", NetworkConfig("route", "virbr7", "10.9.0.1/24"))
    virt.start_network(k1, "routed")
    virt.stop_network(k2, "iso")
    got, notes = import_round_trip(spec, cluster)
    assert got.networks == {}
    text = "\n".join(notes)
    assert "network nat is defined differently on kvm-1, kvm-2: left out" in text
    assert "kvm-1: network routed left out: forward mode 'route'" in text
    assert "kvm-2: network iso left out: not active" in text
