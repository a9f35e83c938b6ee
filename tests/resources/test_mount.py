"""NFS mount on the fake KVM hosts: fstab + live mount, version, FUSE client, refusals."""

from __future__ import annotations

import dataclasses

import pytest
from fakelab import LAB_SPEC, apply_change, converge, converge_upto, find, make_spec, plan, run

from kvmstate.errors import RefusedError, TransportError
from kvmstate.model import Action
from kvmstate.resources.base import RunContext
from kvmstate.spec import Spec
from kvmstate.testing.fake import FakeCluster

LINE = "10.77.0.10:/srv/images /var/lib/libvirt/images nfs vers=3,nolock,_netdev 0 0"
MP = "/var/lib/libvirt/images"


def test_converge_drift_restore(spec: Spec, cluster: FakeCluster, ctx: RunContext) -> None:
    k1 = cluster["kvm-1"]
    before = k1.read("/etc/fstab") or ""
    res = find(spec, "mount", "kvm-1")

    async def scenario() -> None:
        await converge_upto(ctx, "export")
        assert (await plan(res, ctx)).action is Action.CREATE
        assert (await converge(res, ctx)).is_noop
        noop = await plan(res, ctx)
        assert noop.reason == f"mounted 10.77.0.10:/srv/images on {MP} (nfs)"

        k1.write("/etc/fstab", before + LINE.replace("nolock,", "") + "\n")
        drift = await plan(res, ctx)
        assert [(d.field, d.drift) for d in drift.diffs] == [("fstab", "config")]
        assert (await converge(res, ctx)).is_noop

        k1.mounts.remove(k1.mount_at(MP))  # type: ignore[arg-type]
        drift = await plan(res, ctx)
        assert [(d.field, d.drift) for d in drift.diffs] == [("mounted", "runtime")]
        assert (await converge(res, ctx)).is_noop

        # remounted by hand as NFSv4.2: the kernel shows vers=4.2
        k1.mount_at(MP).super_options = ("rw", "vers=4.2")  # type: ignore[union-attr]
        drift = await plan(res, ctx)
        assert [(d.field, d.before, d.after, d.drift) for d in drift.diffs] == [
            ("nfs_version", "4.2", "3", "runtime")
        ]
        assert (await converge(res, ctx)).is_noop

    run(scenario())
    assert k1.read("/etc/fstab") == before + LINE + "\n"
    m = k1.mount_at(MP)
    assert m is not None and m.super_options[1] == "vers=3"
    # the share really is the storage host's directory
    k1.write(f"{MP}/hello", "hi")
    assert cluster["storage"].files["/srv/images/hello"].content == "hi"


def test_fuse_client_counts_as_mounted(spec: Spec, cluster: FakeCluster, ctx: RunContext) -> None:
    cluster["kvm-1"].nfs_as_fuse = True
    res = find(spec, "mount", "kvm-1")
    run(converge_upto(ctx, "export"))
    assert run(converge(res, ctx)).is_noop
    change = run(plan(res, ctx))
    assert change.is_noop and "(fuse.glusterfs)" in change.reason


def test_export_not_allowing_client_fails_clearly(cluster: FakeCluster) -> None:
    spec = make_spec(LAB_SPEC.replace("network: 10.77.0.0/24", "network: 10.99.0.0/24"))
    ctx = RunContext(spec, cluster)
    run(converge_upto(ctx, "export"))
    with pytest.raises(TransportError, match="access denied"):
        run(converge(find(spec, "mount", "kvm-1"), ctx))
    assert cluster["kvm-1"].mount_at(MP) is None


def test_option_change_under_an_active_pool_rewrites_fstab_and_defers_the_remount(
    cluster: FakeCluster, ctx: RunContext, caplog: pytest.LogCaptureFixture
) -> None:
    run(converge_upto(ctx, "pool"))
    mounted = cluster["kvm-1"].mount_at(MP)
    spec = make_spec(LAB_SPEC.replace("[nolock, _netdev]", "[nolock, _netdev, hard]"))
    res = find(spec, "mount", "kvm-1")
    nctx = RunContext(spec, cluster)
    change = run(plan(res, nctx))
    assert [d.field for d in change.diffs] == ["fstab"]
    after = run(apply_change(res, change, nctx))
    assert res.diff(after).is_noop
    assert cluster["kvm-1"].mount_at(MP) == mounted  # never unmounted under the pool
    assert ",hard" in (cluster["kvm-1"].read("/etc/fstab") or "")
    assert "remount deferred while in use by active pool images" in caplog.text


def test_wrong_live_source_under_an_active_pool_is_refused(
    cluster: FakeCluster, ctx: RunContext
) -> None:
    run(converge_upto(ctx, "pool"))
    host = cluster["kvm-1"]
    i = host.mounts.index(host.mount_at(MP))  # type: ignore[arg-type]
    host.mounts[i] = dataclasses.replace(host.mounts[i], source="10.77.0.99:/srv/images")
    fstab = host.read("/etc/fstab")
    res = find(make_spec(), "mount", "kvm-1")
    change = run(plan(res, ctx))
    assert [d.field for d in change.diffs] == ["mounted"]
    with pytest.raises(RefusedError, match="in use by active pool images"):
        run(apply_change(res, change, ctx))
    assert host.mount_at(MP).source == "10.77.0.99:/srv/images"  # type: ignore[union-attr]
    assert host.read("/etc/fstab") == fstab  # nothing half-done


def test_absent_refused_under_an_active_pool_then_done(
    cluster: FakeCluster, ctx: RunContext
) -> None:
    run(converge_upto(ctx, "pool"))
    spec = make_spec(LAB_SPEC.replace("    options: [nolock, _netdev]\n", "    state: absent\n"))
    res = find(spec, "mount", "kvm-1")
    actx = RunContext(spec, cluster)
    change = run(plan(res, actx))
    assert change.action is Action.DELETE
    with pytest.raises(RefusedError, match="active pool images"):
        run(apply_change(res, change, actx))
    assert cluster["kvm-1"].mount_at(MP) is not None
    cluster["kvm-1"].conn().storagePoolLookupByName("images").destroy()
    assert run(converge(res, actx)).is_noop
    assert cluster["kvm-1"].mount_at(MP) is None
    assert "10.77.0.10" not in (cluster["kvm-1"].read("/etc/fstab") or "")
