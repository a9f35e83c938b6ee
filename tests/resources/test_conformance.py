"""The contract every registered kind keeps, checked over ``KINDS`` (a new kind is covered by
registering it): its home is complete (spec section, docs, prerequisites, import mapping or
the reason it has none), and on the fake cluster it passes the three-run contract: plan says
change -> apply -> plan says nothing -> a change behind its back -> drift seen -> one apply
restores it -> plan says nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import pytest
from fakelab import LAB_SPEC, make_spec, prepare, run

from kvmstate.engine import Engine
from kvmstate.ids import ResourceId
from kvmstate.model import Plan
from kvmstate.resources import KINDS, REGISTRY
from kvmstate.resources.base import Options, Resource, RunContext
from kvmstate.spec import Spec
from kvmstate.testing.fake import FakeCluster

ROOT = Path(__file__).resolve().parents[2]
Kind = type[Resource[Any]]
IDS = [k.kind for k in KINDS]

# the lab spec, with a host that lists packages, a NAT network the guest is also on, and a
# guest with cloud_init (so every kind has resources)
SPEC_TEXT = LAB_SPEC.replace(
    "kvm-2: {address: 10.77.0.22}", "kvm-2: {address: 10.77.0.22, packages: [qemu-utils]}"
).replace("      - bridge: br0\n", "      - bridge: br0\n      - network: nat\n").replace(
    "    state: running\n",
    "    cloud_init: {hostname: guest-1}\n    state: running\n",
) + (
    "networks:\n"
    "  nat:\n"
    "    hosts: [kvm-1, kvm-2]\n"
    "    bridge: virbr0\n"
    "    address: 192.168.122.1/24\n"
    "    dhcp: {range: {start: 192.168.122.2, end: 192.168.122.254}}\n"
)


def test_every_kind_is_registered_once() -> None:
    assert len(set(IDS)) == len(IDS)


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_its_spec_section_and_docs(kind: Kind) -> None:
    fields = REGISTRY.spec_model.model_fields
    assert kind.section in fields, f"{kind.kind}: no spec section {kind.section!r}"
    if kind.section_model is not None:
        entry = get_args(fields[kind.section].annotation)[1]
        assert entry is kind.section_model
    else:  # it shares a section another kind (or the base spec) owns and documents
        owners = [k for k in KINDS if k.section == kind.section and k.section_model is not None]
        assert owners or kind.section == "hosts"
    reference = (ROOT / "docs" / "spec-reference.md").read_text()
    for d in kind.docs:
        assert f"## `{d.where}` — {d.model.__name__}" in reference
    documented = [d.where for k in KINDS if k.section == kind.section for d in k.docs]
    assert documented or kind.section == "hosts", f"{kind.kind}: its section has no docs"


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_its_prerequisites(kind: Kind) -> None:
    for req in kind.requires:
        assert req.kind in ("command", "device", "daemon")
        assert req.package or req.kind == "device", f"{req.name}: which package provides it?"
        assert req.purpose
    named = {r.name: r for k in KINDS for r in k.requires}
    assert all(named[r.name] == r for r in kind.requires), "one requirement, one definition"
    spec = make_spec(SPEC_TEXT)
    for r in kind.expand(spec):
        for host, needs in r.needs().items():
            assert {n.name for n in needs} <= REGISTRY.needs_for_host(spec, host)


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_its_import_mapping_or_why_not(kind: Kind) -> None:
    has_mapping = kind.import_into.__func__ is not Resource.import_into.__func__  # type: ignore[attr-defined]
    assert has_mapping != (kind.cannot_import is not None), (
        f"{kind.kind}: import_into, or cannot_import saying why not (not both)"
    )


# --- the three-run contract on the fake ---------------------------------------------------------

# A change behind kvmstate's back, per kind: what a person or another tool might do. A kind
# added to KINDS without an entry here fails test_every_kind_has_a_change_behind_its_back.
BehindItsBack = Callable[[FakeCluster], None]


def _uninstall(c: FakeCluster) -> None:
    c["kvm-2"].packages.discard("qemu-utils")


def _fstab_options(c: FakeCluster) -> None:
    st = c["storage"]
    st.write(
        "/etc/fstab",
        (st.read("/etc/fstab") or "").replace("subvol=images,noatime", "subvol=images"),
    )


def _exportfs_ua(c: FakeCluster) -> None:
    c["storage"].exports_live.clear()


def _umount(c: FakeCluster) -> None:
    k2 = c["kvm-2"]
    k2.mounts.remove(k2.mount_at("/var/lib/libvirt/images"))  # type: ignore[arg-type]


def _pool_destroy(c: FakeCluster) -> None:
    c["kvm-2"].conn().storagePoolLookupByName("images").destroy()


def _chown(c: FakeCluster) -> None:
    c["kvm-1"].execute(["chown", "root:root", "--", "/var/lib/libvirt/images/guest.qcow2"])


def _seed_chmod(c: FakeCluster) -> None:
    c["kvm-1"].execute(["chmod", "0644", "--", "/var/lib/libvirt/images/guest-cidata.iso"])


def _domain_destroy(c: FakeCluster) -> None:
    c["kvm-1"].conn().lookupByName("guest").destroy()


def _net_destroy(c: FakeCluster) -> None:
    c["kvm-2"].conn().networkLookupByName("nat").destroy()  # virsh net-destroy nat


def _migrate_by_hand(c: FakeCluster) -> None:
    src, dst = c["kvm-1"].conn(), c["kvm-2"].conn()
    dom = src.lookupByName("guest")
    xml = dom.XMLDesc(2)  # VIR_DOMAIN_XML_INACTIVE
    dom.destroy()
    dom.undefine()
    dst.defineXML(xml).create()


BEHIND_ITS_BACK: dict[str, BehindItsBack] = {
    "packages": _uninstall,
    "subvolume": _fstab_options,
    "export": _exportfs_ua,
    "mount": _umount,
    "pool": _pool_destroy,
    "volume": _chown,
    "network": _net_destroy,
    "domain": _domain_destroy,
    "seed": _seed_chmod,
    "placement": _migrate_by_hand,
}


# Kinds whose change is not a drift one apply restores on a healthy cluster, each with the
# test that covers its contract instead.
OWN_CONTRACT = {
    # its change is a host's death (or return): after a death the cluster is not converged
    # by design (the dead host's resources are down) -- tests/resources/test_ha.py
    "fence": "tests/resources/test_ha.py",
}


def test_every_kind_has_a_change_behind_its_back() -> None:
    assert sorted([*BEHIND_ITS_BACK, *OWN_CONTRACT]) == sorted(IDS)
    for path in OWN_CONTRACT.values():
        assert (ROOT / path).is_file(), path


def _plan(spec: Spec, cluster: FakeCluster) -> Plan:
    return run(Engine(REGISTRY.graph(spec), RunContext(spec, cluster, Options())).plan())


def _apply(spec: Spec, cluster: FakeCluster, plan: Plan) -> None:
    report = run(Engine(REGISTRY.graph(spec), RunContext(spec, cluster, Options())).apply(plan))
    assert report.converged, report.as_dict()


def _of(kind: Kind, plan: Plan) -> set[ResourceId]:
    return {c.id for c in plan.changes if c.id.kind == kind.kind and not c.is_noop}


THREE_RUN_KINDS = [k for k in KINDS if k.kind not in OWN_CONTRACT]


@pytest.mark.parametrize("kind", THREE_RUN_KINDS, ids=[k.kind for k in THREE_RUN_KINDS])
def test_three_runs_and_drift_behind_its_back(kind: Kind) -> None:
    spec = make_spec(SPEC_TEXT)
    cluster = FakeCluster(spec)
    prepare(cluster)
    first = _plan(spec, cluster)
    assert not first.errors, first.errors
    if kind.kind != "placement":  # a domain is created where it belongs: nothing to move
        assert _of(kind, first), f"{kind.kind}: the first plan must say change"
    _apply(spec, cluster, first)
    assert not _plan(spec, cluster).has_changes

    BEHIND_ITS_BACK[kind.kind](cluster)
    drift = _plan(spec, cluster)
    assert _of(kind, drift), f"{kind.kind}: a change behind its back must show as drift"
    _apply(spec, cluster, drift)
    assert not _plan(spec, cluster).has_changes
    run(cluster.close())
