"""hosts.NAME.packages on the fake cluster: install only what is missing, in the host's one
batched read; everything on the host stands on them; a tool a kind needs installed and the
resource that needed it applied in the same apply."""

from __future__ import annotations

import pytest
from fakelab import LAB_SPEC, make_spec, prepare, run

from kvmstate.engine import Engine
from kvmstate.engine.graph import build_graph
from kvmstate.errors import ParseError
from kvmstate.ids import ResourceId
from kvmstate.model import Action, Status
from kvmstate.resources import KINDS
from kvmstate.resources import packages as prereq
from kvmstate.resources.base import Options, RunContext
from kvmstate.testing.fake import FakeCluster
from kvmstate.transport.base import CommandResult

WITH_PACKAGES = LAB_SPEC.replace(
    "  storage: {address: 10.77.0.10}\n",
    "  storage: {address: 10.77.0.10, packages: [btrfs-progs, nfs-kernel-server]}\n",
).replace(
    "  kvm-1: {address: 10.77.0.21}\n",
    "  kvm-1: {address: 10.77.0.21, packages: [qemu-utils, qemu-system-x86, qemu-utils]}\n",
)


def engine(cluster: FakeCluster) -> Engine:
    spec = make_spec(WITH_PACKAGES)
    return Engine(build_graph(spec, KINDS), RunContext(spec, cluster, Options()))


def test_everything_on_a_host_stands_on_its_packages() -> None:
    g = build_graph(make_spec(WITH_PACKAGES), KINDS)
    st, k1 = ResourceId("packages", "storage", "storage"), ResourceId("packages", "kvm-1", "kvm-1")
    assert {str(r) for r in g.dependents(st)} == {
        "subvolume:storage:images",
        "export:storage:images",
    }
    assert {str(r) for r in g.dependents(k1)} == {
        "mount:kvm-1:images",
        "pool:kvm-1:images",
        "volume:kvm-1:guest.qcow2",
        "domain:guest",
        "placement:guest",
    }
    assert ResourceId("packages", "kvm-2", "kvm-2") not in g.resources  # lists none
    assert g.order()[:2] == [st, k1]  # before everything else
    assert "packages" not in [r.kind for r in build_graph(make_spec(), KINDS).resources]


def test_install_only_the_missing_ones_then_nothing() -> None:
    spec = make_spec(WITH_PACKAGES)
    cluster = FakeCluster(spec)
    prepare(cluster)
    cluster["kvm-1"].install(["qemu-utils"])
    cluster["kvm-1"].apt_lists_fresh = False  # a fresh host: apt needs its lists first
    e = engine(cluster)
    plan = run(e.plan())
    assert cluster.round_trips() == {"storage": 1, "kvm-1": 1, "kvm-2": 1}  # dpkg in the batch
    ch = {str(c.id): c for c in plan.changes}
    k1 = ch["packages:kvm-1:kvm-1"]
    assert (k1.action, k1.reason) == (Action.UPDATE, "apt-get install qemu-system-x86")
    assert [(d.field, d.before, d.after) for d in k1.diffs] == [
        ("installed", "qemu-utils", "qemu-utils qemu-system-x86")
    ]
    assert ch["packages:storage:storage"].reason == "apt-get install btrfs-progs nfs-kernel-server"
    report = run(e.apply(plan))
    assert report.converged, report.as_dict()
    installs = [a for a in cluster["kvm-1"].history if "install" in a]
    assert installs == [
        (*prereq._APT_ENV, "apt-get", "install", "-y", "--no-install-recommends", "--", p)
        for p in ("qemu-system-x86", "qemu-system-x86")  # failed once, then after the update
    ]
    assert (*prereq._APT_ENV, "apt-get", "update") in cluster["kvm-1"].history
    assert cluster["kvm-1"].packages == {"qemu-utils", "qemu-system-x86"}
    # dpkg asked by the plan, the re-check right before installing, and the check after it;
    # the install itself does not ask again
    assert sum(a[0] == "dpkg-query" for a in cluster["kvm-1"].history) == 3
    again = run(engine(cluster).plan())
    assert not again.has_changes and not again.errors
    assert {str(c.id): c.reason for c in again.changes}["packages:kvm-1:kvm-1"] == (
        "installed: qemu-utils qemu-system-x86"
    )


def test_a_missing_tool_from_the_hosts_packages_is_installed_and_used_in_one_apply() -> None:
    """The storage host lacks btrfs and exportfs: the plan cannot observe its subvolume and
    export (and says which package provides each); apply installs them from the host's
    packages, observes both again and creates them, and everything after them, in the same
    run."""
    spec = make_spec(WITH_PACKAGES)
    cluster = FakeCluster(spec)
    prepare(cluster)
    cluster["kvm-1"].install(["qemu-utils", "qemu-system-x86"])
    cluster["storage"].missing = {"cmd:btrfs", "cmd:exportfs"}
    e = engine(cluster)
    plan = run(e.plan())
    errs = {str(k): v for k, v in plan.errors.items()}
    assert set(errs) == {"subvolume:storage:images", "export:storage:images"}
    assert "install the Debian package btrfs-progs" in errs["subvolume:storage:images"]
    assert "packages:storage installs it first" in errs["subvolume:storage:images"]
    report = run(e.apply(plan))
    assert report.converged, report.as_dict()
    status = {str(o.id): o.status for o in report.outcomes}
    assert status["packages:storage:storage"] is Status.CHANGED
    assert status["subvolume:storage:images"] is Status.CHANGED
    assert status["export:storage:images"] is Status.CHANGED
    assert status["domain:guest"] is Status.CHANGED
    assert not cluster["storage"].missing
    assert not run(engine(cluster).plan()).has_changes


def test_a_missing_tool_not_in_the_packages_is_only_reported() -> None:
    spec = make_spec(LAB_SPEC)
    cluster = FakeCluster(spec)
    prepare(cluster)
    cluster["storage"].missing = {"cmd:btrfs"}
    plan = run(Engine(build_graph(spec, KINDS), RunContext(spec, cluster)).plan())
    err = plan.errors[ResourceId("subvolume", "images", "storage")]
    assert "install the Debian package btrfs-progs" in err
    assert "installs it first" not in err


def test_dpkg_query_answers() -> None:
    def res(status: int, out: str, err: str = "") -> CommandResult:
        return CommandResult("h", ("dpkg-query",), status, out, err)

    # exit 1: a name dpkg never saw (real dpkg-query says so on stderr); still an answer
    out = "btrfs-progs\tii \nqemu-utils:amd64\tii \nnfs-common\trc \n"
    assert prereq.parse_installed(res(1, out, "dpkg-query: no packages found matching x\n")) == {
        "btrfs-progs",
        "qemu-utils",
    }
    with pytest.raises(ParseError, match="exit 2"):
        prereq.parse_installed(res(2, "", "dpkg-query: error: something else"))
    with pytest.raises(ValueError, match="invalid Debian package"):
        prereq.installed_fact(["ok", "bad;rm -rf /"])
