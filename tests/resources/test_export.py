"""Export on the fake storage host: /etc/exports line + live table, drift and restore."""

from __future__ import annotations

import pytest
from fakelab import LAB_SPEC, converge, converge_upto, find, make_spec, plan, run

from kvmstate.errors import RefusedError
from kvmstate.model import Action
from kvmstate.resources.base import RunContext
from kvmstate.spec import Spec
from kvmstate.testing.fake import FakeCluster, FakeFile

OTHER = "# exports managed by hand\n/srv/other 10.0.0.5(ro,sync,no_subtree_check)\n"
LINE = "/srv/images 10.77.0.0/24(rw,sync,no_root_squash,no_subtree_check)\n"


def test_converge_drift_restore(spec: Spec, cluster: FakeCluster, ctx: RunContext) -> None:
    st = cluster["storage"]
    st.files["/etc/exports"] = FakeFile(OTHER)
    st.dirs.add("/srv/other")
    res = find(spec, "export")

    async def scenario() -> None:
        await converge_upto(ctx, "subvolume")
        first = await plan(res, ctx)
        assert first.action is Action.CREATE
        assert (await converge(res, ctx)).is_noop
        assert "exported /srv/images to 10.77.0.0/24" in (await plan(res, ctx)).reason

        # runtime drift: `exportfs -u` by hand (the live table loses the entry)
        st.exports_live.pop(("/srv/images", "10.77.0.0/24"))
        drift = await plan(res, ctx)
        assert [(d.field, d.drift) for d in drift.diffs] == [("live", "runtime")]
        assert (await converge(res, ctx)).is_noop

        # config drift: options edited in /etc/exports (not yet exported)
        st.write("/etc/exports", OTHER + LINE.replace("no_root_squash", "root_squash"))
        drift = await plan(res, ctx)
        assert [(d.field, d.drift) for d in drift.diffs] == [("/etc/exports", "config")]
        assert (await converge(res, ctx)).is_noop

        # an extra client in the live table (exported by hand) is drift too
        st.exports_live[("/srv/images", "*")] = frozenset({"rw"})
        assert [d.field for d in (await plan(res, ctx)).diffs] == ["live"]
        assert (await converge(res, ctx)).is_noop

    run(scenario())
    assert st.read("/etc/exports") == OTHER + LINE
    assert set(st.exports_live) == {("/srv/images", "10.77.0.0/24"), ("/srv/other", "10.0.0.5")}


def test_option_order_and_live_defaults_are_not_drift(
    spec: Spec, cluster: FakeCluster, ctx: RunContext
) -> None:
    st = cluster["storage"]
    res = find(spec, "export")
    run(converge_upto(ctx, "export"))
    st.write("/etc/exports", "/srv/images 10.77.0.0/24(no_subtree_check,no_root_squash,sync,rw)\n")
    change = run(plan(res, ctx))
    assert change.is_noop, change.diffs


def test_same_path_in_exports_d_is_blocked(
    spec: Spec, cluster: FakeCluster, ctx: RunContext
) -> None:
    st = cluster["storage"]
    st.files["/etc/exports.d/local.exports"] = FakeFile("/srv/images *(rw)\n")
    run(converge_upto(ctx, "subvolume"))
    change = run(plan(find(spec, "export"), ctx))
    assert change.blocked and "/etc/exports.d/local.exports" in change.blocked


def test_missing_export_path_is_refused(cluster: FakeCluster) -> None:
    spec = make_spec(LAB_SPEC.replace("    path: /srv/images\n", "    path: /srv/nowhere\n"))
    ctx = RunContext(spec, cluster)
    with pytest.raises(RefusedError, match="export path /srv/nowhere does not exist"):
        run(converge(find(spec, "export"), ctx))
    assert cluster["storage"].read("/etc/exports") is None


def test_absent_removes_only_its_line(cluster: FakeCluster, ctx: RunContext) -> None:
    st = cluster["storage"]
    st.files["/etc/exports"] = FakeFile(OTHER)
    st.dirs.add("/srv/other")
    run(converge_upto(ctx, "export"))
    spec = make_spec(
        LAB_SPEC.replace(
            "        options: [rw, sync, no_root_squash, no_subtree_check]\n",
            "        options: [rw, sync, no_root_squash, no_subtree_check]\n    state: absent\n",
        )
    )
    res = find(spec, "export")
    actx = RunContext(spec, cluster)
    assert run(plan(res, actx)).action is Action.DELETE
    assert run(converge(res, actx)).is_noop
    assert st.read("/etc/exports") == OTHER
    assert ("/srv/images", "10.77.0.0/24") not in st.exports_live
