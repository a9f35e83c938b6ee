"""Dir pool on the fake KVM hosts (libvirt test driver): converge, drift, restore, refusals."""

from __future__ import annotations

import pytest
from fakelab import LAB_SPEC, converge, converge_upto, find, make_spec, plan, run

from kvmstate import virt
from kvmstate.errors import RefusedError
from kvmstate.model import Action
from kvmstate.resources.base import RunContext
from kvmstate.spec import Spec
from kvmstate.testing.fake import FakeCluster


def test_converge_drift_restore(spec: Spec, cluster: FakeCluster, ctx: RunContext) -> None:
    res = find(spec, "pool", "kvm-1")
    conn = cluster["kvm-1"].conn()

    async def scenario() -> None:
        await converge_upto(ctx, "mount")
        assert (await plan(res, ctx)).action is Action.CREATE
        assert (await converge(res, ctx)).is_noop
        noop = await plan(res, ctx)
        assert noop.reason == "pool images active at /var/lib/libvirt/images (autostart), 0 volumes"

        conn.storagePoolLookupByName("images").destroy()  # virsh pool-destroy
        drift = await plan(res, ctx)
        assert [(d.field, d.drift) for d in drift.diffs] == [("active", "runtime")]
        assert (await converge(res, ctx)).is_noop

        conn.storagePoolLookupByName("images").setAutostart(0)  # virsh pool-autostart --disable
        drift = await plan(res, ctx)
        assert [(d.field, d.drift) for d in drift.diffs] == [("autostart", "config")]
        assert (await converge(res, ctx)).is_noop

    run(scenario())
    st = virt.observe_pool(conn, "images")
    assert st is not None and st.active and st.autostart
    assert st.path == "/var/lib/libvirt/images"


def test_not_started_when_its_mount_is_missing(cluster: FakeCluster, ctx: RunContext) -> None:
    run(converge_upto(ctx, "export"))  # exported, but the KVM host has not mounted it
    cluster["kvm-1"].dirs.add("/var/lib/libvirt/images")  # the bare local directory exists
    res = find(ctx.spec, "pool", "kvm-1")
    with pytest.raises(RefusedError, match=r"must be on mount images .* not mounted"):
        run(converge(res, ctx))
    st = virt.observe_pool(cluster["kvm-1"].conn(), "images")
    assert st is None or not st.active


def test_a_volume_made_through_one_host_is_listed_by_the_other_hosts_pool(
    cluster: FakeCluster, ctx: RunContext
) -> None:
    """kvmstate's behaviour (not the fake's): the volume is created through the pool's first
    host, on the share; kvmstate refreshes the pool on the other host, so its libvirt lists
    it without anyone refreshing by hand."""
    run(converge_upto(ctx, "pool"))
    before = virt.observe_pool(cluster["kvm-2"].conn(), "images")
    assert before is not None and before.volumes == frozenset()
    assert (run(converge(find(ctx.spec, "volume"), ctx))).is_noop
    st = virt.observe_pool(cluster["kvm-2"].conn(), "images")
    assert st is not None and st.volumes == {"guest.qcow2"}


def test_path_change_is_redefined(cluster: FakeCluster, ctx: RunContext) -> None:
    run(converge_upto(ctx, "pool"))
    spec = make_spec(
        LAB_SPEC.replace(
            "    path: /var/lib/libvirt/images\n", "    path: /var/lib/libvirt/images/vm\n"
        )
    )
    res = find(spec, "pool", "kvm-1")
    nctx = RunContext(spec, cluster)
    change = run(plan(res, nctx))
    assert [(d.field, d.after) for d in change.diffs] == [("path", "/var/lib/libvirt/images/vm")]
    assert run(converge(res, nctx)).is_noop
    st = virt.observe_pool(cluster["kvm-1"].conn(), "images")
    assert st is not None and st.path == "/var/lib/libvirt/images/vm" and st.active


def test_path_change_refused_while_a_guest_uses_it(cluster: FakeCluster, ctx: RunContext) -> None:
    run(converge_upto(ctx, "domain"))
    spec = make_spec(
        LAB_SPEC.replace(
            "    path: /var/lib/libvirt/images\n", "    path: /var/lib/libvirt/images/vm\n"
        )
    )
    change = run(plan(find(spec, "pool", "kvm-1"), RunContext(spec, cluster)))
    assert change.blocked and "running domain guest" in change.blocked


def test_absent_undefines(cluster: FakeCluster, ctx: RunContext) -> None:
    run(converge_upto(ctx, "pool"))
    spec = make_spec(
        LAB_SPEC.replace(
            "    hosts: [kvm-1, kvm-2]\nvolumes:",
            "    hosts: [kvm-1, kvm-2]\n    state: absent\nvolumes:",
        )
    )
    res = find(spec, "pool", "kvm-2")
    actx = RunContext(spec, cluster)
    assert run(plan(res, actx)).action is Action.DELETE
    assert run(converge(res, actx)).is_noop
    assert virt.observe_pool(cluster["kvm-2"].conn(), "images") is None
