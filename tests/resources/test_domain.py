"""Domain on the fake KVM hosts (libvirt test driver): define/start, drift classes, adoption."""

from __future__ import annotations

import pytest
from fakelab import LAB_SPEC, apply_change, converge, converge_upto, find, make_spec, plan, run

from kvmstate import virt
from kvmstate.errors import KvmstateError, RefusedError
from kvmstate.model import Action
from kvmstate.resources.base import Options, RunContext
from kvmstate.spec import Spec
from kvmstate.testing.fake import FakeCluster
from kvmstate.virtxml import build_domain_xml, parse_domain_xml


def state(cluster: FakeCluster, host: str) -> virt.DomainState | None:
    return virt.observe_domain(cluster[host].conn(), "guest")


def test_converge_drift_restore(spec: Spec, cluster: FakeCluster, ctx: RunContext) -> None:
    res = find(spec, "domain")
    conn = cluster["kvm-1"].conn()

    async def scenario() -> None:
        await converge_upto(ctx, "volume")
        assert (await plan(res, ctx)).action is Action.CREATE
        assert (await converge(res, ctx)).is_noop
        assert (await plan(res, ctx)).reason == "domain guest running on kvm-1"

        conn.lookupByName("guest").destroy()  # virsh destroy
        drift = await plan(res, ctx)
        assert [(d.field, d.before, d.drift) for d in drift.diffs] == [
            ("state", "shut-off", "runtime")
        ]
        assert (await converge(res, ctx)).is_noop

        conn.lookupByName("guest").setMemoryFlags(
            65536, 1
        )  # virsh setmem --live 64M (1 = AFFECT_LIVE)
        drift = await plan(res, ctx)
        assert [(d.field, d.before, d.after, d.drift) for d in drift.diffs] == [
            ("current_kib", 65536, 131072, "runtime")
        ]
        assert (await converge(res, ctx)).is_noop

        conn.lookupByName("guest").setAutostart(1)
        drift = await plan(res, ctx)
        assert [(d.field, d.drift) for d in drift.diffs] == [("autostart", "config")]
        assert (await converge(res, ctx)).is_noop

        # persistent XML edited by hand (virsh edit): 2 vCPUs
        inactive = conn.lookupByName("guest").XMLDesc(2)  # 2 = VIR_DOMAIN_XML_INACTIVE
        xml = inactive.replace(">1</vcpu>", ">2</vcpu>")
        conn.defineXML(xml)
        drift = await plan(res, ctx)
        assert [(d.field, d.before, d.after, d.drift) for d in drift.diffs] == [
            ("vcpus", 2, 1, "config")
        ]
        assert (await converge(res, ctx)).is_noop

    run(scenario())
    st = state(cluster, "kvm-1")
    assert st is not None and st.state == "running" and not st.autostart
    assert st.config.managed and st.config.vcpus == 1 and st.live is not None
    assert st.live.current_kib == 131072
    assert state(cluster, "kvm-2") is None


def test_memory_growth_is_pending_restart(cluster: FakeCluster, ctx: RunContext) -> None:
    run(converge_upto(ctx, "domain"))
    spec = make_spec(LAB_SPEC.replace("memory: 128MiB", "memory: 256MiB"))
    res = find(spec, "domain")
    nctx = RunContext(spec, cluster)
    change = run(plan(res, nctx))
    assert [(d.field, d.drift) for d in change.diffs] == [("memory_kib", "config")]
    after = run(converge(res, nctx))
    assert after.is_noop and "pending restart" in after.reason
    assert [(d.field, d.before, d.after) for d in after.pending] == [
        ("current_kib", 131072, 262144)
    ]
    st = state(cluster, "kvm-1")
    assert st is not None and st.state == "running"  # not restarted behind our back
    assert st.config.memory_kib == 262144 and st.live is not None and st.live.memory_kib == 131072


def test_unmarked_domain_is_adopted_only_with_adopt(
    spec: Spec, cluster: FakeCluster, ctx: RunContext
) -> None:
    run(converge_upto(ctx, "volume"))
    res = find(spec, "domain")
    want = res.want  # type: ignore[attr-defined]
    xml = build_domain_xml("guest", want).replace("<metadata><kvmstate:managed /></metadata>", "")
    assert "managed" not in xml
    cluster["kvm-1"].conn().defineXML(xml)
    change = run(plan(res, ctx))
    assert change.blocked and "--adopt" in change.blocked
    with pytest.raises(RefusedError):
        run(apply_change(res, change, ctx))
    actx = RunContext(spec, cluster, Options(adopt=True))
    change = run(plan(res, actx))
    assert change.blocked is None and ("managed", False, True) in [
        (d.field, d.before, d.after) for d in change.diffs
    ]
    assert run(converge(res, actx)).is_noop
    st = state(cluster, "kvm-1")
    assert st is not None and st.config.managed and st.state == "running"


def test_defined_on_two_hosts_is_an_error_and_nothing_starts(
    spec: Spec, cluster: FakeCluster, ctx: RunContext
) -> None:
    run(converge_upto(ctx, "volume"))
    xml = build_domain_xml("guest", find(spec, "domain").want)  # type: ignore[attr-defined]
    for h in ("kvm-1", "kvm-2"):
        cluster[h].conn().defineXML(xml)
    with pytest.raises(KvmstateError, match=r"defined on 2 hosts \(kvm-1, kvm-2\)"):
        run(converge(find(spec, "domain"), ctx))
    assert all(state(cluster, h).state == "shut-off" for h in ("kvm-1", "kvm-2"))  # type: ignore[union-attr]


def test_shut_off_and_absent(cluster: FakeCluster, ctx: RunContext) -> None:
    run(converge_upto(ctx, "domain"))
    off = make_spec(LAB_SPEC.replace("    state: running\n", "    state: shut-off\n"))
    assert run(converge(find(off, "domain"), RunContext(off, cluster))).is_noop
    assert state(cluster, "kvm-1").state == "shut-off"  # type: ignore[union-attr]
    gone = make_spec(LAB_SPEC.replace("    state: running\n", "    state: absent\n"))
    res = find(gone, "domain")
    gctx = RunContext(gone, cluster, Options(allow_destroy=True))
    assert run(plan(res, gctx)).action is Action.DELETE
    assert run(converge(res, gctx)).is_noop
    assert state(cluster, "kvm-1") is None


def test_generated_xml_parses_back_to_the_spec(spec: Spec) -> None:
    want = find(spec, "domain").want  # type: ignore[attr-defined]
    assert parse_domain_xml(build_domain_xml("guest", want)) == want


def test_virt_error_codes_match_the_libvirt_module() -> None:
    """``kvmstate.virt`` knows these codes without importing libvirt (imported on first use)."""
    import libvirt

    assert virt.NO_SUPPORT == libvirt.VIR_ERR_NO_SUPPORT
    assert virt.NO_DOMAIN == libvirt.VIR_ERR_NO_DOMAIN
    assert virt.NO_POOL == libvirt.VIR_ERR_NO_STORAGE_POOL
    assert virt.NO_VOLUME == libvirt.VIR_ERR_NO_STORAGE_VOL
    assert virt.OPERATION_INVALID == libvirt.VIR_ERR_OPERATION_INVALID
    assert virt.domain_state_name(libvirt.VIR_DOMAIN_SHUTOFF) == "shut-off"
    assert virt.domain_state_name(libvirt.VIR_DOMAIN_BLOCKED) == "running"


def test_a_paused_domain_is_resumed_and_the_reason_said(
    cluster: FakeCluster, ctx: RunContext, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 19: paused (by hand here; libvirt also pauses a migration's source it cannot
    resolve, or a guest whose disk fails) is a state kvmstate understands: found on exactly
    one host with the spec saying running, apply resumes it and says why it was paused."""
    res = find(make_spec(), "domain")

    async def scenario() -> None:
        await converge_upto(ctx, "domain")
        dom = cluster["kvm-1"].conn().lookupByName("guest")
        dom.suspend()  # virsh suspend
        drift = await plan(res, ctx)
        assert [(d.field, d.before, d.after) for d in drift.diffs] == [
            ("state", "paused (user)", "running")
        ]
        assert (await converge(res, ctx)).is_noop
        assert virt.domain_state_name(dom.state()[0]) == "running"

    caplog.set_level("INFO")
    run(scenario())
    assert "resuming domain guest (it was paused: user)" in caplog.text


def test_a_domain_paused_on_one_host_and_defined_on_another_is_left_alone(
    cluster: FakeCluster, ctx: RunContext
) -> None:
    res = find(make_spec(), "domain")
    run(converge_upto(ctx, "domain"))
    k1 = cluster["kvm-1"].conn()
    k1.lookupByName("guest").suspend()
    cluster["kvm-2"].conn().defineXML(k1.lookupByName("guest").XMLDesc(2))
    with pytest.raises(KvmstateError, match="defined on 2 hosts"):
        run(plan(res, ctx))
    assert virt.domain_state_name(k1.lookupByName("guest").state()[0]) == "paused"


def test_a_running_guest_s_leased_addresses_are_shown_and_in_json() -> None:
    """Issue 17: `show` (and --json, under "observed") lists a running guest's addresses."""
    from kvmstate.resources.domain import DomainObs

    res = find(make_spec(), "domain")
    want = res.want  # type: ignore[attr-defined]
    obs = DomainObs("kvm-1", want, want, "running", False, addresses=("192.168.150.10",))
    change = res.diff(obs)
    assert change.is_noop
    assert change.reason == "domain guest running on kvm-1, addresses 192.168.150.10"
    assert change.as_dict()["observed"] == {"addresses": ("192.168.150.10",)}
    quiet = res.diff(DomainObs("kvm-1", want, want, "running", False))
    assert "observed" not in quiet.as_dict()
