"""Volume in the shared pool: create, visible on every host, owner drift, grow, refusals."""

from __future__ import annotations

import pytest
from fakelab import LAB_SPEC, apply_change, converge, converge_upto, find, make_spec, plan, run

from kvmstate import virt
from kvmstate.errors import RefusedError
from kvmstate.model import Action
from kvmstate.resources.base import Options, RunContext
from kvmstate.spec import Spec
from kvmstate.testing.fake import FakeCluster

PATH = "/var/lib/libvirt/images/guest.qcow2"


def test_converge_drift_restore(spec: Spec, cluster: FakeCluster, ctx: RunContext) -> None:
    res = find(spec, "volume")
    assert res.id.host == "kvm-1"
    st = cluster["storage"]

    async def scenario() -> None:
        await converge_upto(ctx, "pool")
        assert (await plan(res, ctx)).action is Action.CREATE
        assert (await converge(res, ctx)).is_noop
        assert (await plan(res, ctx)).reason == f"volume guest.qcow2: qcow2 64MiB at {PATH}"

        st.files["/srv/images/guest.qcow2"].owner = "root"  # chown root by hand
        drift = await plan(res, ctx)
        assert [(d.field, d.before, d.after, d.drift) for d in drift.diffs] == [
            ("owner", "root", "libvirt-qemu", "config")
        ]
        assert (await converge(res, ctx)).is_noop

    run(scenario())
    f = st.files["/srv/images/guest.qcow2"]
    assert (f.owner, f.group, f.size) == ("libvirt-qemu", "kvm", 64 * 2**20)
    # refreshed on the other host of the pool: the volume is visible there too
    assert virt.volume_visible(cluster["kvm-2"].conn(), "images", "guest.qcow2")


def test_grow_in_place_and_shrink_refused(cluster: FakeCluster, ctx: RunContext) -> None:
    run(converge_upto(ctx, "volume"))
    bigger = make_spec(LAB_SPEC.replace("capacity: 64MiB", "capacity: 96MiB"))
    res = find(bigger, "volume")
    bctx = RunContext(bigger, cluster)
    change = run(plan(res, bctx))
    assert (change.action, [(d.field, d.before, d.after) for d in change.diffs]) == (
        Action.UPDATE,
        [("capacity", "64MiB", "96MiB")],
    )
    assert run(converge(res, bctx)).is_noop
    vol = virt.observe_volume(cluster["kvm-1"].conn(), "images", "guest.qcow2")
    assert vol is not None and vol.capacity == 96 * 2**20

    smaller = make_spec(LAB_SPEC.replace("capacity: 64MiB", "capacity: 32MiB"))
    change = run(plan(find(smaller, "volume"), RunContext(smaller, cluster)))
    assert change.blocked and "shrinking" in change.blocked
    with pytest.raises(RefusedError):
        run(apply_change(find(smaller, "volume"), change, RunContext(smaller, cluster)))
    vol = virt.observe_volume(cluster["kvm-1"].conn(), "images", "guest.qcow2")
    assert vol is not None and vol.capacity == 96 * 2**20


def test_grow_refused_under_a_running_guest(cluster: FakeCluster, ctx: RunContext) -> None:
    run(converge_upto(ctx, "domain"))
    bigger = make_spec(LAB_SPEC.replace("capacity: 64MiB", "capacity: 96MiB"))
    with pytest.raises(RefusedError, match="running domain guest on kvm-1"):
        run(converge(find(bigger, "volume"), RunContext(bigger, cluster)))


def test_format_change_is_blocked(cluster: FakeCluster, ctx: RunContext) -> None:
    run(converge_upto(ctx, "volume"))
    raw = make_spec(LAB_SPEC.replace("format: qcow2", "format: raw"))
    change = run(plan(find(raw, "volume"), RunContext(raw, cluster)))
    assert change.blocked and "does not convert" in change.blocked


def test_inactive_pool_never_plans_a_create(cluster: FakeCluster, ctx: RunContext) -> None:
    run(converge_upto(ctx, "volume"))
    cluster["kvm-1"].conn().storagePoolLookupByName("images").destroy()
    change = run(plan(find(ctx.spec, "volume"), ctx))
    assert change.is_noop and "pool images is not active on kvm-1" in change.reason
    assert run(converge(find(ctx.spec, "pool", "kvm-1"), ctx)).is_noop
    assert run(plan(find(ctx.spec, "volume"), ctx)).reason.startswith("volume guest.qcow2: qcow2")


@pytest.mark.parametrize("force", [False, True])
def test_delete_needs_force_destroy(cluster: FakeCluster, ctx: RunContext, force: bool) -> None:
    run(converge_upto(ctx, "volume"))
    extra = "    state: absent\n" + ("    force_destroy: true\n" if force else "")
    text = LAB_SPEC.replace("    group: kvm\n", "    group: kvm\n" + extra)
    text = text[: text.index("domains:")]
    spec = make_spec(text)
    res = find(spec, "volume")
    actx = RunContext(spec, cluster, Options(allow_destroy=True))
    change = run(plan(res, actx))
    assert change.action is Action.DELETE
    assert (change.blocked is None) is force
    if force:
        assert run(converge(res, actx)).is_noop
    assert ("/srv/images/guest.qcow2" in cluster["storage"].files) is not force
