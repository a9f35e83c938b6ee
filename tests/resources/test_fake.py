"""The fake cluster itself: strictness, round trips, unreachable hosts, injected failures."""

from __future__ import annotations

import pytest
from fakelab import converge, converge_upto, find, plan, resources, run

from kvmstate.engine import Engine
from kvmstate.engine.graph import build_graph
from kvmstate.errors import HostUnreachable, ParseError, TransportError
from kvmstate.resources import KINDS
from kvmstate.resources.base import RunContext
from kvmstate.spec import Spec
from kvmstate.testing.fake import FakeCluster, FakeCommandError
from kvmstate.transport.base import write_file


def test_unknown_commands_are_rejected_loudly(cluster: FakeCluster) -> None:
    with pytest.raises(FakeCommandError, match="does not emulate"):
        run(cluster.shell("kvm-1").run(["rm", "-rf", "/"]))
    with pytest.raises(FakeCommandError):
        run(cluster.shell("kvm-1").run(["sh", "-c", "echo hi"]))


def test_atomic_write_keeps_mode_and_needs_the_directory(cluster: FakeCluster) -> None:
    h = cluster["storage"]
    run(write_file(cluster.shell("storage"), "/etc/exports", "x\n", "0600"))
    assert h.files["/etc/exports"].content == "x\n" and h.files["/etc/exports"].mode == "0600"
    with pytest.raises(TransportError):
        run(write_file(cluster.shell("storage"), "/nonexistent/dir/file", "x"))


def test_run_many_is_one_round_trip(cluster: FakeCluster) -> None:
    res = run(cluster.shell("kvm-1").run_many([["cat", "--", "/etc/fstab"]] * 3))
    assert len(res) == 3 and cluster["kvm-1"].round_trips == 1


def test_observing_a_converged_cluster_is_one_round_trip_per_host(
    spec: Spec, cluster: FakeCluster, ctx: RunContext
) -> None:
    run(converge_upto(ctx, "placement"))
    fresh = RunContext(spec, cluster)
    for h in cluster.hosts.values():
        h.round_trips = 0

    async def observe_all() -> None:
        # the engine's own plan of the shell-read kinds: one batched read per host, then
        # every resource observed
        kinds = [k for k in KINDS if k.kind in ("subvolume", "export", "mount", "pool")]
        plan = await Engine(build_graph(spec, kinds), fresh).plan()
        assert not plan.errors
        assert len(plan.changes) == 6 and all(c.is_noop for c in plan.changes)

    run(observe_all())
    assert cluster.round_trips() == {"storage": 1, "kvm-1": 1, "kvm-2": 1}


def test_unreachable_host(spec: Spec, cluster: FakeCluster, ctx: RunContext) -> None:
    cluster["kvm-2"].reachable = False
    run(converge_upto(ctx, "export"))
    with pytest.raises(HostUnreachable, match="kvm-2"):
        run(plan(find(spec, "mount", "kvm-2"), ctx))
    assert run(converge(find(spec, "mount", "kvm-1"), ctx)).is_noop  # others go on


def test_injected_failure_surfaces_with_host_and_command(
    spec: Spec, cluster: FakeCluster, ctx: RunContext
) -> None:
    run(converge_upto(ctx, "subvolume"))
    cluster["storage"].fail(["exportfs", "-ra"], "exportfs: could not open /var/lib/nfs/.etab.lock")
    with pytest.raises(
        TransportError, match=r"storage: `exportfs -ra` exit 1: exportfs: could not"
    ):
        run(converge(find(spec, "export"), ctx))


@pytest.mark.parametrize(
    ("argv", "kind", "what"),
    [
        (["exportfs", "-v"], "export", "exportfs -v"),
        (["cat", "--", "/proc/self/mountinfo"], "mount", "/proc/self/mountinfo"),
        (["cat", "--", "/etc/fstab"], "mount", "/etc/fstab"),
        (["btrfs", "subvolume", "list"], "subvolume", "btrfs subvolume list /srv/btrfs"),
    ],
)
def test_output_that_does_not_parse_is_an_error_never_absent(
    spec: Spec, cluster: FakeCluster, ctx: RunContext, argv: list[str], kind: str, what: str
) -> None:
    host = "storage" if kind != "mount" else "kvm-1"
    cluster[host].respond(argv, "<html>surprise</html>\n")
    with pytest.raises(ParseError, match=f"{host}: cannot parse output of {what}: "):
        run(plan(find(spec, kind, host), ctx))


def test_expand_and_dependencies(spec: Spec) -> None:
    ids = {str(r.id): sorted(str(d) for d in r.depends_on()) for k in KINDS for r in k.expand(spec)}
    assert ids == {
        "subvolume:storage:images": [],
        "export:storage:images": ["subvolume:storage:images"],
        "mount:kvm-1:images": ["export:storage:images"],
        "mount:kvm-2:images": ["export:storage:images"],
        "pool:kvm-1:images": ["mount:kvm-1:images"],
        "pool:kvm-2:images": ["mount:kvm-2:images"],
        "volume:kvm-1:guest.qcow2": ["pool:kvm-1:images"],
        "domain:guest": ["pool:kvm-1:images", "volume:kvm-1:guest.qcow2"],
        "placement:guest": ["domain:guest", "pool:kvm-1:images"],
    }
    assert [k.kind for k in KINDS] == [
        "fence",
        "packages",
        "subvolume",
        "export",
        "mount",
        "pool",
        "volume",
        "network",
        "domain",
        "seed",
        "placement",
    ]
    assert set(find(spec, "domain").hosts()) == {"kvm-1", "kvm-2"}
    assert not any(r.absent for k in KINDS for r in k.expand(spec))
    assert len(resources(spec, "mount")) == 2
