"""Every kind through the real engine on the fake cluster: one-run convergence, drift seen
with its class and restored in one apply, a migration by spec change."""

from __future__ import annotations

from typing import Any

from fakelab import LAB_SPEC, make_spec, prepare, run

from kvmstate import virt
from kvmstate.engine import Engine
from kvmstate.engine.graph import build_graph
from kvmstate.model import Plan
from kvmstate.resources import KINDS
from kvmstate.resources.base import Event, Options, RunContext
from kvmstate.spec import Spec
from kvmstate.testing.fake import FakeCluster


async def plan_of(spec: Spec, cluster: FakeCluster) -> Plan:
    return await Engine(build_graph(spec, KINDS), RunContext(spec, cluster, Options())).plan()


def drift_of(p: Plan) -> set[tuple[str, str, str]]:
    return {(str(c.id), d.field, d.drift) for c in p.pending for d in c.diffs}


def test_converge_in_one_run_then_drift_everywhere_then_restore() -> None:
    spec = make_spec()
    cluster = FakeCluster(spec)
    prepare(cluster)
    events: list[Event] = []

    async def scenario() -> None:
        ctx = RunContext(spec, cluster, Options(), events.append)
        report = await Engine(build_graph(spec, KINDS), ctx).apply()
        assert report.converged and report.rounds == 1, report.as_dict()
        assert not (await plan_of(spec, cluster)).has_changes

        st, k1, k2 = cluster["storage"], cluster["kvm-1"], cluster["kvm-2"]
        fstab = st.read("/etc/fstab") or ""
        st.write("/etc/fstab", fstab.replace("subvol=images,noatime", "subvol=images"))
        k2.mounts.remove(k2.mount_at("/var/lib/libvirt/images"))  # type: ignore[arg-type]
        st.exports_live.clear()  # exportfs -ua
        k2.conn().storagePoolLookupByName("images").destroy()
        k1.conn().lookupByName("guest").destroy()
        drift = await plan_of(spec, cluster)
        assert drift_of(drift) == {
            ("subvolume:storage:images", "fstab", "config"),
            ("export:storage:images", "live", "runtime"),
            ("mount:kvm-2:images", "mounted", "runtime"),
            ("pool:kvm-2:images", "active", "runtime"),
            ("domain:guest", "state", "runtime"),
        }
        # (the stopped pool on kvm-2 hides the volume there until it is restarted)
        report = await Engine(build_graph(spec, KINDS), RunContext(spec, cluster)).apply(drift)
        assert report.converged, report.as_dict()
        assert not (await plan_of(spec, cluster)).has_changes

        moved = make_spec(LAB_SPEC.replace("    host: kvm-1\n", "    host: kvm-2\n"))
        mctx = RunContext(moved, cluster, Options(), events.append)
        report = await Engine(build_graph(moved, KINDS), mctx).apply()
        assert report.converged, report.as_dict()
        assert not (await plan_of(moved, cluster)).has_changes

    run(scenario())
    assert virt.observe_domain(cluster["kvm-1"].conn(), "guest") is None
    st2 = virt.observe_domain(cluster["kvm-2"].conn(), "guest")
    assert st2 is not None and st2.state == "running"
    assert "migration-done" in [e["event"] for e in events]
    run(cluster.close())


def test_warm_up_opens_connections_and_reads_nothing() -> None:
    """What apply runs while it takes the cluster lock: every host's SSH connection and the
    libvirt connection of the hosts with libvirt resources (not the storage host), no command
    and no libvirt call; a host that fails is left for the plan to report."""
    spec = make_spec()
    cluster = FakeCluster(spec)
    prepare(cluster)
    cluster["kvm-2"].reachable = False
    opened: list[str] = []
    ssh: list[None] = []

    class Recording:
        def __init__(self, host: str) -> None:
            self.inner = cluster.libvirt(host)

        async def connect(self) -> object:
            conn = await self.inner.connect()
            opened.append(self.inner.host)
            return conn

        async def run(self, *a: object) -> object:
            raise AssertionError(f"warm_up made a libvirt call {a}")

    class Transports:
        def shell(self, host: str) -> object:
            raise AssertionError(f"warm_up ran a command on {host}")

        def libvirt(self, host: str) -> Recording:
            return Recording(host)

        async def connect_all(self) -> None:
            ssh.append(None)

        async def close(self) -> None:
            return None

    engine = Engine(build_graph(spec, KINDS), RunContext(spec, Transports()))  # type: ignore[arg-type]
    run(engine.warm_up())
    assert ssh == [None]
    assert sorted(opened) == ["kvm-1"]  # kvm-2 is unreachable, storage has no libvirt
    assert cluster.round_trips() == {"storage": 0, "kvm-1": 0, "kvm-2": 0}


def test_a_slow_host_holds_up_only_its_own_resources() -> None:
    """The storage host's read is let through only once a resource on a KVM host has been
    observed: an engine that waited for every host's read before observing anything would
    never get there (and fail the 10 s bound here)."""
    import asyncio

    spec = make_spec()
    cluster = FakeCluster(spec)
    prepare(cluster)
    events: list[Event] = []
    kvm_seen = asyncio.Event()
    storage_read_done = asyncio.Event()

    def emit(e: Event) -> None:
        events.append(e)
        if e.get("event") == "observed" and ":kvm-" in str(e.get("id")):
            kvm_seen.set()

    class SlowStorage:
        def __init__(self) -> None:
            self.inner = cluster.shell("storage")
            self.host = "storage"

        async def run(self, *a: object, **kw: object) -> object:
            return await self.inner.run(*a, **kw)  # type: ignore[arg-type]

        async def run_many(self, argvs: object) -> object:
            await kvm_seen.wait()
            try:
                return await self.inner.run_many(argvs)  # type: ignore[arg-type]
            finally:
                storage_read_done.set()

    class Transports:
        def shell(self, host: str) -> object:
            return SlowStorage() if host == "storage" else cluster.shell(host)

        def libvirt(self, host: str) -> object:
            return cluster.libvirt(host)

        async def close(self) -> None:
            return None

    async def scenario() -> None:
        ctx = RunContext(spec, Transports(), Options(), emit)  # type: ignore[arg-type]
        plan = await asyncio.wait_for(Engine(build_graph(spec, KINDS), ctx).plan(), 10)
        assert storage_read_done.is_set()
        assert not plan.errors, plan.errors
        assert {str(c.id) for c in plan.changes} == {str(rid) for rid in plan.order}

    run(scenario())
    observed = [str(e["id"]) for e in events if e.get("event") == "observed"]
    first_storage = min(i for i, x in enumerate(observed) if ":storage:" in x)
    assert any(":kvm-" in x for x in observed[:first_storage])


def test_two_observations_per_mutated_node() -> None:
    """Issue 15: apply works from the engine's re-check. Each node the apply mutates is
    observed exactly twice after the plan: the re-check right before it mutates, and the
    result apply returns; covering a create of every kind, drift repairs, and a migration."""
    spec = make_spec()
    cluster = FakeCluster(spec)
    prepare(cluster)
    counts: dict[str, int] = {}
    originals = {k: k.__dict__["observe"] for k in KINDS}

    def counting(kind: type, original: Any) -> Any:
        async def observe(self: Any, ctx: RunContext, *args: Any, **kw: Any) -> Any:
            counts[str(self.id)] = counts.get(str(self.id), 0) + 1
            return await original(self, ctx, *args, **kw)

        return observe

    async def applied(s: Spec) -> dict[str, int]:
        engine = Engine(build_graph(s, KINDS), RunContext(s, cluster, Options()))
        plan = await engine.plan()
        counts.clear()
        report = await engine.apply(plan)
        assert report.converged and report.rounds == 1, report.as_dict()
        changed = {str(o.id) for o in report.outcomes if o.status.value == "changed"}
        assert changed
        return {rid: counts.get(rid, 0) for rid in changed}

    async def scenario() -> None:
        created = await applied(spec)
        assert set(created.values()) == {2}, created
        assert {rid.split(":")[0] for rid in created} >= {
            "subvolume", "export", "mount", "pool", "volume", "domain",
        }  # fmt: skip
        cluster["kvm-2"].conn().storagePoolLookupByName("images").destroy()
        cluster["kvm-1"].conn().lookupByName("guest").destroy()
        repaired = await applied(spec)
        assert repaired == {"pool:kvm-2:images": 2, "domain:guest": 2}
        moved = make_spec(LAB_SPEC.replace("    host: kvm-1\n", "    host: kvm-2\n"))
        assert await applied(moved) == {"placement:guest": 2}

    for k in KINDS:
        k.observe = counting(k, originals[k])  # type: ignore[method-assign]
    try:
        run(scenario())
    finally:
        for k in KINDS:
            k.observe = originals[k]  # type: ignore[method-assign]
