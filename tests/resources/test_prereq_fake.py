"""Host prerequisites checked by plan in the same batched read (no extra round trip): a host
without a tool gets a clear error naming the host, the command and the Debian package, on the
resources that need it, and nothing is changed on it."""

from __future__ import annotations

from fakelab import make_spec, prepare, run

from kvmstate.engine import Engine
from kvmstate.engine.graph import build_graph
from kvmstate.resources import KINDS
from kvmstate.resources.base import Options, RunContext
from kvmstate.testing.fake import FakeCluster


def engine(cluster: FakeCluster) -> Engine:
    spec = make_spec()
    return Engine(build_graph(spec, KINDS), RunContext(spec, cluster, Options()))


def test_a_missing_tool_is_named_with_its_package_and_nothing_is_touched() -> None:
    spec = make_spec()
    cluster = FakeCluster(spec)
    prepare(cluster)
    cluster["storage"].missing.add("cmd:btrfs")
    cluster["kvm-2"].missing.add("cmd:qemu-system-x86_64")
    fstab = cluster["storage"].read("/etc/fstab")

    plan = run(engine(cluster).plan())
    errors = {str(rid): msg for rid, msg in plan.errors.items()}
    assert errors["subvolume:storage:images"] == (
        "storage: command `btrfs` not found (needed for btrfs subvolumes) "
        "(install the Debian package btrfs-progs)"
    )
    # the guest may run on kvm-2 (placement): it needs QEMU there too
    assert "kvm-2: command `qemu-system-x86_64` not found" in errors["domain:guest"]
    assert "qemu-system-x86" in errors["domain:guest"]
    assert "export:storage:images" not in errors  # exportfs is there
    assert set(cluster.round_trips().values()) == {1}  # checked in the one batched read

    report = run(engine(cluster).apply())
    assert not report.converged
    assert cluster["storage"].read("/etc/fstab") == fstab  # nothing written on the host

    cluster["storage"].missing.clear()
    cluster["kvm-2"].missing.clear()
    assert run(engine(cluster).apply()).converged


def test_the_registry_graph_probes_each_host_once_and_blames_only_who_needs_it() -> None:
    """Through ``REGISTRY.graph`` (what the CLI uses) every resource on a host reads ONE probe
    of the union of what they need there: one command in the host's batch, not one per
    resource. What is missing is still said only on the resources that need it."""
    from kvmstate.resources import REGISTRY

    spec = make_spec()
    cluster = FakeCluster(spec)
    prepare(cluster)
    cluster["storage"].missing.add("cmd:btrfs")
    cluster["kvm-2"].missing.add("cmd:qemu-system-x86_64")
    plan = run(Engine(REGISTRY.graph(spec), RunContext(spec, cluster, Options())).plan())
    for host in ("storage", "kvm-1", "kvm-2"):
        probes = [a for a in cluster[host].history if a[3:4] == ("kvmstate-prereq",)]
        assert len(probes) == 1, (host, probes)
    errors = {str(rid) for rid in plan.errors}
    assert errors == {"subvolume:storage:images", "domain:guest"}, plan.errors
