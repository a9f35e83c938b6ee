"""The domain's CPU against REAL libvirt daemons: two private libvirtd 9.0 (one per "host",
``kvmstate.lab.private_libvirtd``: their own mount + network namespaces, not the lab, nothing
of the machine's libvirt touched), with QEMU's real capabilities. libvirt's test driver has
no ``getDomainCapabilities``, ``baselineHypervisorCPU`` or ``compareHypervisorCPU``.

Seen on libvirt 9.0 + QEMU 7.2 (TCG): the baseline of two identical hosts is their host-model
CPU (``EPYC`` on this AMD machine, with the features TCG differs in); ``compareHypervisorCPU``
with FAIL_INCOMPATIBLE names what a host lacks ("Host CPU does not provide required features:
vmx": TCG never provides VMX)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, TypeVar

import pytest
from fakelab import LAB_SPEC, converge, find, make_spec, plan, run

from kvmstate import virt
from kvmstate.lab.private_libvirtd import private_libvirtd, unavailable
from kvmstate.model import Action
from kvmstate.resources import cpu
from kvmstate.resources.base import Options, RunContext
from kvmstate.resources.domain import config_diffs
from kvmstate.spec import Domain
from kvmstate.transport.libvirt import libvirt_module
from kvmstate.virtxml import CpuConfig, build_domain_xml, desired_config

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))
T = TypeVar("T")


class Direct:
    """A host's libvirt, one connection to its private daemon (no SSH)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def connect(self) -> Any:
        return self.conn

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)


class Hosts:
    """Transports: kvm-1 and kvm-2 are two daemons; every other host is out of reach."""

    def __init__(self, conns: dict[str, Any]) -> None:
        self.hosts = {h: Direct(c) for h, c in conns.items()}
        self.calls: list[str] = []

    def libvirt(self, host: str) -> Direct:
        return self.hosts[host]

    def shell(self, host: str) -> Any:
        raise AssertionError(f"no shell here ({host})")


@pytest.fixture(scope="module")
def conns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with (
        private_libvirtd(tmp_path_factory.mktemp("kvm1")) as (s1, _p1),
        private_libvirtd(tmp_path_factory.mktemp("kvm2")) as (s2, _p2),
    ):
        lv = libvirt_module()
        out = {
            h: lv.open(f"qemu+unix:///system?socket={s}") for h, s in (("kvm-1", s1), ("kvm-2", s2))
        }
        try:
            yield out
        finally:
            for c in out.values():
                for d in c.listAllDomains(0):
                    virt.undefine_domain(c, d.name())
                c.close()


# the lab's guest, shut off, without its bridge (the bridge check reads a shell)
SPEC = LAB_SPEC.replace("    interfaces:\n      - bridge: br0\n", "").replace(
    "    state: running\n", "    state: shut-off\n"
)


def ctx_for(block: str, conns: dict[str, Any], host: str = "kvm-1") -> tuple[Any, RunContext]:
    text = SPEC.replace("    vcpus: 1\n", "    vcpus: 1\n" + block).replace(
        "    host: kvm-1\n", f"    host: {host}\n"
    )
    spec = make_spec(text)
    return spec, RunContext(spec, Hosts(conns), Options())  # type: ignore[arg-type]


def test_baseline_is_computed_from_both_hosts_and_defined(conns: dict[str, Any]) -> None:
    spec, ctx = ctx_for("    cpu: {mode: baseline, features: {svm: disable}}\n", conns)
    got = run(cpu.resolve_cpu(ctx, spec.domains["guest"]))
    assert got is not None and got.mode == "custom" and got.model
    assert ("svm", "disable") in got.features  # the spec's features on top
    # the baseline of these hosts is one each of them accepts
    for h in ("kvm-1", "kvm-2"):
        ok, detail = run(cpu.check_cpu(ctx, spec.domains["guest"], h))
        assert ok is True, detail
    res = find(spec, "domain")
    change = run(plan(res, ctx))
    assert change.action is Action.CREATE
    assert ("cpu", got.describe()) in [(d.field, d.after) for d in change.diffs]
    assert run(converge(res, ctx)).is_noop
    st = virt.observe_domain(conns["kvm-1"], "guest")
    assert st is not None and st.config.cpu is not None
    assert st.config.cpu.model == got.model and ("svm", "disable") in st.config.cpu.features
    # a plan later: the same baseline, nothing to do
    spec2, ctx2 = ctx_for("    cpu: {mode: baseline, features: {svm: disable}}\n", conns)
    assert run(plan(find(spec2, "domain"), ctx2)).is_noop
    virt.undefine_domain(conns["kvm-1"], "guest")


def test_a_feature_the_target_lacks_blocks_the_move_and_is_named(conns: dict[str, Any]) -> None:
    block = "    cpu: {model: qemu64, features: {vmx: require}}\n"
    spec, ctx = ctx_for(block, conns)
    assert run(converge(find(spec, "domain"), ctx)).is_noop  # defined (not started) on kvm-1
    moved, mctx = ctx_for(block, conns, host="kvm-2")
    placement = find(moved, "placement")
    # target_facts=False: the target's memory and bridges are read from its shell (none here)
    change = placement.diff(run(placement.observe(mctx, target_facts=False)))  # type: ignore[call-arg]
    assert change.action is Action.MIGRATE and change.blocked
    cpu_check = next(c for c in change.checks if c.name == "cpu")
    assert not cpu_check.ok and "vmx" in cpu_check.detail and "kvm-2" in cpu_check.detail
    assert "vmx" in change.blocked
    # a named model the target can run passes the same check
    fine, fctx = ctx_for("    cpu: {model: qemu64}\n", conns, host="kvm-2")
    ok, detail = run(cpu.check_cpu(fctx, fine.domains["guest"], "kvm-2"))
    assert ok is True, detail
    virt.undefine_domain(conns["kvm-1"], "guest")


def test_a_tcg_guest_starts_with_the_baseline_and_its_live_cpu_compares_equal(
    conns: dict[str, Any],
) -> None:
    """QEMU really starts with the resolved CPU (no disk: it waits in its firmware), and the
    running definition, which libvirt rewrites, shows no CPU difference (no false pending
    restart)."""
    spec, ctx = ctx_for("    cpu: {mode: baseline}\n", conns)
    got = run(cpu.resolve_cpu(ctx, spec.domains["guest"]))
    conn = conns["kvm-1"]
    for want_cpu in (got, CpuConfig("custom", "qemu64", (("svm", "disable"),))):
        d = Domain(memory=64 * 1024**2, host="kvm-1", type="qemu")
        want = replace(desired_config(d, []), cpu=want_cpu)
        virt.define_domain(conn, build_domain_xml("cpu-boot", want))
        try:
            virt.start_domain(conn, "cpu-boot")
            st = virt.observe_domain(conn, "cpu-boot")
            assert st is not None and st.state == "running" and st.live is not None
            assert config_diffs(want, st.live, d, "pending-restart") == []
            assert st.live.cpu is not None and st.live.cpu.projected(want_cpu) == want_cpu
        finally:
            virt.undefine_domain(conn, "cpu-boot")
