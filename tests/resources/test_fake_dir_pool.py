"""The fake cluster's dir pool (not kvmstate): moved from test_pool.py, where it tested the
fake's rescan of the share rather than anything kvmstate does."""

from __future__ import annotations

from fakelab import converge_upto, run

from kvmstate import virt
from kvmstate.resources.base import RunContext
from kvmstate.testing.fake import FakeCluster


def test_the_fakes_refresh_pool_rescans_the_share(cluster: FakeCluster, ctx: RunContext) -> None:
    run(converge_upto(ctx, "pool"))
    # a file appears on the share (written on the storage host); a refresh shows it
    cluster["storage"].write("/srv/images/extra.raw", "x")
    run(cluster.libvirt("kvm-2").run(virt.refresh_pool, cluster["kvm-2"].conn(), "images"))
    st = virt.observe_pool(cluster["kvm-2"].conn(), "images")
    assert st is not None and st.volumes == {"extra.raw"}
