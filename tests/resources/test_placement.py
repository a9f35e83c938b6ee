"""Placement: MIGRATE changes, pre-flight checks and policies on the fake cluster.

The test driver cannot migrate (code 3): the fake emulates ``virt.migrate`` as define+start on
the target and undefine on the source. The progress/timeout/abort loop is tested in
``test_migration_loop.py`` through a stub libvirt seam.
"""

from __future__ import annotations

from fakelab import LAB_SPEC, converge, converge_upto, find, make_spec, plan, run

from kvmstate import virt
from kvmstate.model import Action
from kvmstate.resources.base import Event, RunContext
from kvmstate.resources.placement import reserved_memory
from kvmstate.spec import Spec
from kvmstate.testing.fake import FakeCluster

MOVED = LAB_SPEC.replace("    host: kvm-1\n", "    host: kvm-2\n")


def where(cluster: FakeCluster) -> dict[str, str]:
    out = {}
    for h in ("kvm-1", "kvm-2"):
        st = virt.observe_domain(cluster[h].conn(), "guest")
        if st is not None:
            out[h] = st.state
    return out


def moved_ctx(cluster: FakeCluster, text: str = MOVED) -> tuple[Spec, RunContext, list[Event]]:
    spec = make_spec(text)
    events: list[Event] = []
    return spec, RunContext(spec, cluster, events=events.append), events


def test_live_migration_on_spec_change(cluster: FakeCluster, ctx: RunContext) -> None:
    run(converge_upto(ctx, "placement"))
    spec, mctx, events = moved_ctx(cluster)
    res = find(spec, "placement")
    change = run(plan(res, mctx))
    assert change.action is Action.MIGRATE and change.blocked is None
    assert {k: v for k, v in change.data.items() if k != "target_memory"} == {
        "source": "kvm-1",
        "target": "kvm-2",
        "live": True,
        "memory": 128 * 2**20,
    }
    assert change.data["target_memory"].fits(128 * 2**20)
    assert [(d.field, d.before, d.after, d.drift) for d in change.diffs] == [
        ("host", "kvm-1", "kvm-2", "runtime")
    ]
    assert {c.name for c in change.checks} >= {"target libvirtd", "disk guest.qcow2", "memory"}
    assert all(c.ok for c in change.checks)
    after = run(converge(res, mctx))
    assert after.is_noop and after.reason == "domain guest running on kvm-2"
    assert where(cluster) == {"kvm-2": "running"}
    assert [e["event"] for e in events][-1:] == ["migration-done"]
    # the domain resource is content on its new host
    assert run(plan(find(spec, "domain"), mctx)).is_noop


def test_shut_off_domain_is_moved_by_definition(cluster: FakeCluster, ctx: RunContext) -> None:
    off = LAB_SPEC.replace("    state: running\n", "    state: shut-off\n")
    _, ctx0, _ = moved_ctx(cluster, off)
    run(converge_upto(ctx0, "placement"))
    assert where(cluster) == {"kvm-1": "shut-off"}
    spec, mctx, _ = moved_ctx(cluster, off.replace("    host: kvm-1\n", "    host: kvm-2\n"))
    change = run(plan(find(spec, "placement"), mctx))
    assert change.action is Action.MIGRATE and change.data["live"] is False
    assert run(converge(find(spec, "placement"), mctx)).is_noop
    assert where(cluster) == {"kvm-2": "shut-off"}


def test_migrated_by_hand_is_runtime_drift_and_moved_back(
    spec: Spec, cluster: FakeCluster, ctx: RunContext
) -> None:
    run(converge_upto(ctx, "placement"))
    c1, c2 = cluster["kvm-1"].conn(), cluster["kvm-2"].conn()
    # `virsh migrate` by hand (the fake's emulated migration, through its libvirt seam)
    run(cluster.libvirt("kvm-1").run(virt.migrate, c1, c2, "guest", {}, 0))
    assert where(cluster) == {"kvm-2": "running"}
    res = find(spec, "placement")
    drift = run(plan(res, ctx))
    assert drift.action is Action.MIGRATE
    assert [(d.before, d.after, d.drift) for d in drift.diffs] == [("kvm-2", "kvm-1", "runtime")]
    assert run(converge(res, ctx)).is_noop
    assert where(cluster) == {"kvm-1": "running"}


def test_failed_preflight_blocks(cluster: FakeCluster, ctx: RunContext) -> None:
    run(converge_upto(ctx, "placement"))
    k2 = cluster["kvm-2"]
    k2.bridges.clear()
    k2.mem_available = 64 * 2**20
    k2.conn().storagePoolLookupByName("images").destroy()
    spec, mctx, _ = moved_ctx(cluster)
    change = run(plan(find(spec, "placement"), mctx))
    failed = {c.name for c in change.checks if not c.ok}
    assert failed == {"bridges", "memory", "disk guest.qcow2"}
    assert change.blocked and change.blocked.startswith("pre-flight failed")
    assert where(cluster) == {"kvm-1": "running"}


def test_unreachable_target_blocks(cluster: FakeCluster, ctx: RunContext) -> None:
    run(converge_upto(ctx, "placement"))
    spec, mctx, _ = moved_ctx(cluster)
    res = find(spec, "placement")
    cluster["kvm-2"].reachable = False
    # a host that does not answer is no target: the move is blocked, naming it
    change = run(plan(res, mctx))
    assert change.blocked and "kvm-2 is unreachable" in change.blocked, change
    assert where(cluster) == {"kvm-1": "running"}


def test_nfsv3_without_nolock_is_a_failed_check(cluster: FakeCluster, ctx: RunContext) -> None:
    run(converge_upto(ctx, "placement"))
    spec, mctx, _ = moved_ctx(cluster, MOVED.replace("[nolock, _netdev]", "[_netdev]"))
    change = run(plan(find(spec, "placement"), mctx))
    assert [c.name for c in change.checks if not c.ok] == ["nfs locking"]
    assert change.blocked


def test_draining_a_host_moves_its_guest(cluster: FakeCluster, ctx: RunContext) -> None:
    run(converge_upto(ctx, "placement"))
    drained = LAB_SPEC.replace(
        "  kvm-1: {address: 10.77.0.21}", "  kvm-1: {address: 10.77.0.21, drain: true}"
    )
    spec, mctx, _ = moved_ctx(cluster, drained)
    change = run(plan(find(spec, "placement"), mctx))
    assert change.action is Action.MIGRATE and change.data["target"] == "kvm-2"
    assert run(converge(find(spec, "placement"), mctx)).is_noop
    assert where(cluster) == {"kvm-2": "running"}


def test_preferred_stays_put_when_not_ready_and_floating_never_moves(
    cluster: FakeCluster, ctx: RunContext
) -> None:
    run(converge_upto(ctx, "placement"))
    cluster["kvm-2"].bridges.clear()
    pref = MOVED.replace(
        "      hosts: [kvm-1, kvm-2]\n", "      hosts: [kvm-1, kvm-2]\n      policy: preferred\n"
    )
    spec, mctx, _ = moved_ctx(cluster, pref)
    change = run(plan(find(spec, "placement"), mctx))
    assert change.is_noop and "stays on kvm-1" in change.reason and "br0" in change.reason
    floating = pref.replace("policy: preferred", "policy: floating")
    spec, mctx, _ = moved_ctx(cluster, floating)
    assert run(plan(find(spec, "placement"), mctx)).is_noop
    assert where(cluster) == {"kvm-1": "running"}


def test_apply_reads_the_targets_memory_once_under_its_lock(
    cluster: FakeCluster, ctx: RunContext
) -> None:
    """Between the approved plan and the migration, the target gets one shell round trip:
    memory and bridges read under its lock (the re-check before applying leaves them to
    it). Before, the re-check read them too: two round trips."""
    from kvmstate.engine import Engine
    from kvmstate.engine.graph import build_graph
    from kvmstate.model import Status
    from kvmstate.resources import KINDS

    run(converge_upto(ctx, "placement"))
    spec, mctx, _ = moved_ctx(cluster)
    engine = Engine(build_graph(spec, KINDS), mctx)
    approved = run(engine.plan())
    migrate = [c for c in approved.changes if c.action is Action.MIGRATE]
    assert [c.id.kind for c in migrate] == ["placement"]
    assert {c.name for c in migrate[0].checks} >= {"memory", "cpu"}
    for h in cluster.hosts.values():
        h.round_trips = 0
    n = len(cluster["kvm-2"].history)
    report = run(engine.apply(approved))
    assert report.converged
    assert [o.status for o in report.outcomes if o.id.kind == "placement"] == [Status.CHANGED]
    assert where(cluster) == {"kvm-2": "running"}
    assert cluster["kvm-2"].round_trips == 1
    assert sorted(cluster["kvm-2"].history[n:]) == [  # in that one round trip
        ("cat", "--", "/proc/meminfo"),
        ("ip", "-o", "link", "show", "type", "bridge"),
    ]


def test_target_that_changed_after_the_plan_is_refused_at_apply(
    cluster: FakeCluster, ctx: RunContext
) -> None:
    """Memory and bridges are left out of the re-check, so apply's own check under the
    target's lock is what stops a migration onto a target that lost them since the plan."""
    from kvmstate.engine import Engine
    from kvmstate.engine.graph import build_graph
    from kvmstate.model import Status
    from kvmstate.resources import KINDS

    run(converge_upto(ctx, "placement"))
    spec, mctx, _ = moved_ctx(cluster)
    engine = Engine(build_graph(spec, KINDS), mctx)
    approved = run(engine.plan())
    assert any(c.action is Action.MIGRATE and not c.blocked for c in approved.changes)
    k2 = cluster["kvm-2"]
    k2.bridges.clear()
    k2.mem_available = 64 * 2**20
    report = run(engine.apply(approved))
    [out] = [o for o in report.outcomes if o.id.kind == "placement"]
    assert out.status is Status.FAILED and not report.converged
    assert out.error is not None
    assert "refused: memory:" in out.error and "; bridges: missing on kvm-2: br0" in out.error
    assert "the domain stays where it is" in out.error
    assert where(cluster) == {"kvm-1": "running"}
    assert not reserved_memory(mctx).get("kvm-2")


def test_the_plan_says_what_the_migration_policy_will_do() -> None:
    from kvmstate.resources.placement.migrate import describe_policy
    from kvmstate.spec import MigrationPolicy

    p = MigrationPolicy.model_validate(
        {
            "max_downtime": "300ms",
            "downtime_steps": [{"after": "20s", "max_downtime": "1s"}],
            "auto_converge": True,
            "postcopy": "60s",
            "bandwidth": "100MiB",
            "timeout": "10m",
        }
    )
    assert describe_policy(p) == (
        "max downtime 300ms, raised to 1s after 20s, bandwidth 100MiB/s, "
        "auto-converge (vCPUs throttled while not converging), post-copy after 1m, "
        "abort after 10m if post-copy did not start"
    )
    assert describe_policy(MigrationPolicy()) == ""
    steps_only = MigrationPolicy.model_validate(
        {"downtime_steps": [{"after": "5s", "max_downtime": "2s"}], "timeout": "1m"}
    )
    assert describe_policy(steps_only) == (
        "max downtime QEMU's default (300ms), raised to 2s after 5s, abort after 1m"
    )
    on_timeout = MigrationPolicy.model_validate({"timeout": "45s", "on_timeout": "postcopy"})
    assert describe_policy(on_timeout) == "post-copy after 45s (timeout)"
    both = MigrationPolicy.model_validate(
        {"postcopy": "10s", "timeout": "45s", "on_timeout": "postcopy"}
    )
    assert describe_policy(both) == "post-copy after 10s"


def test_policy_checks_name_what_the_targets_qemu_cannot_do() -> None:
    from kvmstate.resources.placement.migrate import policy_checks
    from kvmstate.spec import MigrationPolicy

    def checks(qemu: int, **policy: object) -> list[tuple[bool, str]]:
        p = MigrationPolicy.model_validate(policy)
        return [(c.ok, c.detail) for c in policy_checks(p, qemu)]

    assert checks(7_002_000, postcopy="30s", parallel_connections=4) == [
        (
            False,
            "post-copy with parallel connections: not on QEMU 7.2.0 (before 10.0; 7.2 "
            "accepts both, then its destination crashes at the switch and the guest is "
            "lost); use one or the other",
        )
    ]
    [(ok, _)] = checks(7_002_000, timeout="1m", on_timeout="postcopy", parallel_connections=2)
    assert not ok
    assert checks(10_000_000, postcopy="30s", parallel_connections=4) == []
    assert checks(7_002_000, postcopy="30s") == []
    assert checks(7_002_000, parallel_connections=2) == []
    [(ok, detail)] = checks(7_002_000, compressed=True, parallel_connections=2)
    assert ok and detail.startswith("warning: compressed is XBZRLE")
    assert checks(7_002_000, compressed=True) == []


def test_the_plan_blocks_post_copy_with_parallel_connections(
    cluster: FakeCluster, ctx: RunContext
) -> None:
    """libvirt's test driver reports hypervisor version 2.0.0: before QEMU 10.0."""
    run(converge_upto(ctx, "placement"))
    moved = make_spec(
        LAB_SPEC.replace("    host: kvm-1\n", "    host: kvm-2\n")
        + "migration: {postcopy: 30s, parallel_connections: 4}\n"
    )
    change = run(plan(find(moved, "placement"), RunContext(moved, cluster)))
    assert change.blocked and "post-copy with parallel connections" in change.blocked
    assert [c.name for c in change.checks if not c.ok] == ["migration policy"]


def test_a_live_migration_in_the_plan_names_its_policy(
    cluster: FakeCluster, ctx: RunContext
) -> None:
    run(converge_upto(ctx, "placement"))
    moved = make_spec(
        LAB_SPEC.replace("    host: kvm-1\n", "    host: kvm-2\n")
        + "migration: {max_downtime: 300ms, postcopy: 1m}\n"
    )
    change = run(plan(find(moved, "placement"), RunContext(moved, cluster)))
    assert change.reason == (
        "live-migrate guest kvm-1 -> kvm-2 (max downtime 300ms, post-copy after 1m)"
    )
