"""Every kind through the real engine on the fake cluster: one-run convergence, drift seen
with its class and restored in one apply, a migration by spec change."""

from __future__ import annotations

from fakelab import LAB_SPEC, make_spec, prepare, run

from kvmstate import virt
from kvmstate.engine import Engine
from kvmstate.graph import build_graph
from kvmstate.model import Plan
from kvmstate.resources import KINDS
from kvmstate.resources.base import Event, Options, RunContext
from kvmstate.spec import Spec
from kvmstate.transport.fake import FakeCluster


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
