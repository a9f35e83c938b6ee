"""Subvolume on the fake storage host: converge, drift (config/runtime), restore, destroy rules."""

from __future__ import annotations

import pytest
from fakelab import LAB_SPEC, converge, converge_upto, find, make_spec, plan, prepare, run

from kvmstate.errors import KvmstateError
from kvmstate.model import Action
from kvmstate.resources.base import Options, RunContext
from kvmstate.spec import Spec
from kvmstate.testing.fake import FakeCluster

FSTAB_LINE = "LABEL=labpool /srv/images btrfs subvol=images,noatime 0 0"


def test_device_by_path_is_resolved(cluster: FakeCluster) -> None:
    spec = make_spec(LAB_SPEC.replace("LABEL=labpool", "/dev/loop0"))
    ctx = RunContext(spec, cluster)
    assert run(converge(find(spec, "subvolume"), ctx)).is_noop
    assert run(plan(find(spec, "subvolume"), ctx)).is_noop


def test_converge_drift_restore(spec: Spec, cluster: FakeCluster, ctx: RunContext) -> None:
    st = cluster["storage"]
    before = st.read("/etc/fstab") or ""
    res = find(spec, "subvolume")

    async def scenario() -> None:
        first = await plan(res, ctx)
        assert first.action is Action.CREATE
        assert {d.field for d in first.diffs} == {"subvolume", "fstab", "mounted"}
        assert (await converge(res, ctx)).is_noop
        again = await plan(res, ctx)
        assert again.is_noop and "mounted from LABEL=labpool:/images" in again.reason

        # config drift: someone edits the fstab entry
        st.write("/etc/fstab", before + "LABEL=labpool /srv/images btrfs subvol=images 0 0\n")
        drift = await plan(res, ctx)
        assert [(d.field, d.drift) for d in drift.diffs] == [("fstab", "config")]
        assert (await converge(res, ctx)).is_noop

        # runtime drift: unmounted by hand
        st.mounts.remove(st.mount_at("/srv/images"))  # type: ignore[arg-type]
        drift = await plan(res, ctx)
        assert [(d.field, d.drift) for d in drift.diffs] == [("mounted", "runtime")]
        assert (await converge(res, ctx)).is_noop

        # runtime drift: remounted without noatime
        st.mount_at("/srv/images").options = ("rw", "relatime")  # type: ignore[union-attr]
        drift = await plan(res, ctx)
        assert [(d.field, d.drift) for d in drift.diffs] == [("mount_options", "runtime")]
        assert (await converge(res, ctx)).is_noop

    run(scenario())
    assert st.read("/etc/fstab") == before + FSTAB_LINE + "\n"
    assert st.btrfs["/dev/loop0"].subvolumes == {"images": 256}
    mount = st.mount_at("/srv/images")
    assert mount is not None and mount.root == "/images" and "noatime" in mount.options


def test_changed_options_remount(cluster: FakeCluster, ctx: RunContext) -> None:
    run(converge_upto(ctx, "subvolume"))
    spec = make_spec(LAB_SPEC.replace("[noatime]", "[noatime, compress=zstd]"))
    res = find(spec, "subvolume")
    change = run(plan(res, RunContext(spec, cluster)))
    assert [(d.field, d.drift) for d in change.diffs] == [("fstab", "config")]
    assert run(converge(res, RunContext(spec, cluster))).is_noop
    m = cluster["storage"].mount_at("/srv/images")
    assert m is not None and "compress=zstd" in m.super_options and "noatime" in m.options
    assert "subvol=images,noatime,compress=zstd 0 0" in (
        cluster["storage"].read("/etc/fstab") or ""
    )


def test_without_toplevel_uses_a_temporary_top_level_mount() -> None:
    spec = make_spec(LAB_SPEC.replace("    toplevel: /srv/btrfs\n", ""))
    cluster = FakeCluster(spec)
    prepare(cluster)
    st = cluster["storage"]
    st.mounts = [m for m in st.mounts if m.mountpoint != "/srv/btrfs"]
    ctx = RunContext(spec, cluster)
    res = find(spec, "subvolume")

    async def scenario() -> None:
        first = await plan(res, ctx)
        assert [d.before for d in first.diffs if d.field == "subvolume"] == ["unknown"]
        assert (await converge(res, ctx)).is_noop
        assert (await plan(res, ctx)).is_noop
        await cluster.close()

    run(scenario())
    assert "images" in st.btrfs["/dev/loop0"].subvolumes
    assert [m.mountpoint for m in st.mounts if m.fstype == "btrfs"] == ["/srv/images"]
    assert not st.is_dir("/run/kvmstate/btrfs/images")


def test_existing_subvolume_is_not_recreated(cluster: FakeCluster, ctx: RunContext) -> None:
    fs = cluster["storage"].btrfs["/dev/loop0"]
    fs.subvolumes["images"] = 300
    cluster["storage"].dirs.add("/srv/btrfs/images")
    res = find(ctx.spec, "subvolume")
    change = run(plan(res, ctx))
    assert "subvolume" not in {d.field for d in change.diffs}
    assert run(converge(res, ctx)).is_noop
    assert fs.subvolumes == {"images": 300}


@pytest.mark.parametrize("device", ["LABEL=nosuchfs", "/dev/nosuchdisk"])
def test_missing_device_is_a_clear_error(cluster: FakeCluster, device: str) -> None:
    spec = make_spec(LAB_SPEC.replace("LABEL=labpool", device))
    ctx = RunContext(spec, cluster)
    with pytest.raises(KvmstateError, match=f"btrfs device {device} not found"):
        run(plan(find(spec, "subvolume"), ctx))


def test_another_filesystem_on_the_mountpoint_is_refused(
    cluster: FakeCluster, ctx: RunContext
) -> None:
    st = cluster["storage"]
    st.dirs.add("/srv/images")
    run(st_mount_tmpfs(st))
    with pytest.raises(KvmstateError, match="unmount it first"):
        run(converge(find(ctx.spec, "subvolume"), ctx))
    assert st.mount_at("/srv/images").fstype == "tmpfs"  # type: ignore[union-attr]


async def st_mount_tmpfs(st: object) -> None:
    from kvmstate.testing.fake import FakeMount

    st.mounts.append(FakeMount("tmpfs", "/srv/images", "tmpfs", ("rw",)))  # type: ignore[attr-defined]


def absent_spec(force: bool) -> Spec:
    extra = "    state: absent\n" + ("    force_destroy: true\n" if force else "")
    return make_spec(LAB_SPEC.replace("    mount_options: [noatime]\n", extra, 1))


@pytest.mark.parametrize("force", [False, True])
def test_absent_with_data_needs_force_destroy(force: bool) -> None:
    present = make_spec()
    cluster = FakeCluster(present)
    prepare(cluster)
    st = cluster["storage"]

    async def scenario() -> None:
        assert (await converge(find(present, "subvolume"), RunContext(present, cluster))).is_noop
        st.write("/srv/images/disk.img", "data")
        spec = absent_spec(force)
        ctx = RunContext(spec, cluster, Options(allow_destroy=True))
        res = find(spec, "subvolume")
        change = await plan(res, ctx)
        assert change.action is Action.DELETE
        if not force:
            assert change.blocked and "force_destroy" in change.blocked
            return
        assert change.blocked is None
        assert (await converge(res, ctx)).is_noop

    run(scenario())
    run(cluster.close())
    gone = "images" not in st.btrfs["/dev/loop0"].subvolumes
    assert gone is force
    assert (st.mount_at("/srv/images") is None) is force
    assert ("subvol=images" in (st.read("/etc/fstab") or "")) is not force
