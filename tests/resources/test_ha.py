"""Issue 19 on the fake cluster: a dead host is fenced before its HA domains restart
elsewhere; never on a timeout alone; a returning host's stale definitions are removed first;
``--host-down`` what-if plans touch nothing.

The fence agent is a real program run by kvmstate on this machine (a small script over a
state file); a crash is the fake host made unreachable with its guest killed, its
definitions kept (a power loss)."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest
from fakelab import LAB_SPEC, make_spec, prepare, run

from kvmstate import virt
from kvmstate.engine import Engine
from kvmstate.ids import ResourceId
from kvmstate.loader import SpecError
from kvmstate.model import Action, Plan, Report, Status
from kvmstate.resources import REGISTRY
from kvmstate.resources.base import Options, RunContext
from kvmstate.resources.liveness import FenceLedger, FenceRecord, stamp
from kvmstate.spec import Spec
from kvmstate.testing.fake import FakeCluster

AGENT = """\
import sys
state = sys.argv[1]
action = sys.argv[2]
if action == "off":
    mode = open(state).read().strip()
    if mode != "stuck":
        open(state, "w").write("off")
    print("Success: Powered OFF")
elif action == "status":
    mode = open(state).read().strip()
    print("Status: OFF" if mode == "off" else "Status: ON")
    sys.exit(2 if mode == "off" else 0)
"""


def ha_spec(agent: Path | None, *, grace: str = "0s", **extra: str) -> str:
    text = LAB_SPEC.replace(
        "    placement:\n      hosts: [kvm-1, kvm-2]\n",
        "    placement:\n      hosts: [kvm-1, kvm-2]\n      policy: preferred\n"
        "    autostart: true\n    ha: {priority: 10}\n",
    )
    if agent is not None:
        state = agent.parent / "power-kvm-1"
        argv = f"[{sys.executable}, {agent}, {state}"
        text = text.replace(
            "kvm-1: {address: 10.77.0.21}",
            "kvm-1:\n    address: 10.77.0.21\n    fence:\n"
            f'      power_off: {argv}, "off"]\n'
            f"      status: {argv}, status]\n      grace: {grace}\n",
        )
    return text


@pytest.fixture
def agent(tmp_path: Path) -> Path:
    script = tmp_path / "fence-agent.py"
    script.write_text(AGENT)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "power-kvm-1").write_text("on")
    return script


class Run:
    """One cluster and one ledger across runs, as the CLI has (the ledger on disk)."""

    def __init__(self, text: str, tmp: Path) -> None:
        self.spec: Spec = make_spec(text)
        self.cluster = FakeCluster(self.spec)
        prepare(self.cluster)
        self.ledger = FenceLedger(tmp / "fenced.json")

    def ctx(self, **opts: object) -> RunContext:
        return RunContext(self.spec, self.cluster, Options(fence_ledger=self.ledger, **opts))  # type: ignore[arg-type]

    def plan(self, **opts: object) -> Plan:
        return run(Engine(REGISTRY.graph(self.spec), self.ctx(**opts)).plan())

    def apply(self) -> Report:
        return run(Engine(REGISTRY.graph(self.spec), self.ctx()).apply())

    def where(self, name: str = "guest") -> dict[str, str]:
        out = {}
        for h in ("kvm-1", "kvm-2"):
            st = virt.observe_domain(self.cluster[h].conn(), name)
            if st is not None:
                out[h] = st.state
        return out

    def crash(self, host: str = "kvm-1") -> None:
        """A power loss: its guests die, its definitions stay, it answers nothing."""
        conn = self.cluster[host].conn()
        for dom in conn.listAllDomains():
            if dom.isActive():
                dom.destroy()
        self.cluster[host].reachable = False


def change(p: Plan, rid: str) -> object:
    [c] = [c for c in p.changes if str(c.id) == rid]
    return c


@pytest.fixture
def converged(agent: Path, tmp_path: Path) -> Run:
    r = Run(ha_spec(agent), tmp_path)
    assert r.apply().converged
    assert r.where() == {"kvm-1": "running"}
    # an HA domain never has libvirt's autostart: kvmstate starts it
    assert not virt.observe_domain(r.cluster["kvm-1"].conn(), "guest").autostart  # type: ignore[union-attr]
    return r


def test_crash_fence_restart_then_return_cleans_the_stale_copy(converged: Run) -> None:
    r = converged
    r.crash()
    p = r.plan()
    fence = change(p, "fence:kvm-1")
    assert fence.action is Action.UPDATE and "fence agent" in fence.reason  # type: ignore[attr-defined]
    dom = change(p, "domain:guest")
    assert dom.action is Action.CREATE and not dom.blocked  # type: ignore[attr-defined]
    assert "waiting for fencing" in dom.reason and "kvm-2" in dom.reason  # type: ignore[attr-defined]
    assert r.where() == {"kvm-1": "shut-off"}  # the plan touched nothing

    report = r.apply()
    status = {str(o.id): o.status for o in report.outcomes}
    assert status["fence:kvm-1"] is Status.CHANGED
    assert status["domain:guest"] is Status.CHANGED
    assert status["pool:kvm-1:images"] is Status.DOWN
    assert not report.converged  # kvm-1 is down: not converged, and said so
    assert r.where() == {"kvm-1": "shut-off", "kvm-2": "running"}
    rec = r.ledger.get("kvm-1")
    assert rec is not None and rec.how == "agent" and rec.restarted == {"guest": "kvm-2"}

    # a second run while kvm-1 stays down: nothing more to do for the guest
    again = r.plan()
    assert change(again, "domain:guest").is_noop  # type: ignore[attr-defined]
    assert "stays" in change(again, "placement:guest").reason  # type: ignore[attr-defined]

    # kvm-1 comes back (its stale definition, never autostarted): cleaned up first
    r.cluster["kvm-1"].reachable = True
    back = r.plan()
    fence = change(back, "fence:kvm-1")
    assert fence.action is Action.UPDATE and "stale" in fence.reason  # type: ignore[attr-defined]
    report = r.apply()
    assert r.where() == {"kvm-2": "running"}  # never two copies
    assert r.ledger.get("kvm-1") is None
    # preferred: it goes home by a (planned) live migration afterwards
    home = r.plan()
    assert change(home, "placement:guest").action is Action.MIGRATE  # type: ignore[attr-defined]


def test_unreachable_without_fence_agent_never_restarts_elsewhere(tmp_path: Path) -> None:
    r = Run(ha_spec(None), tmp_path)
    assert r.apply().converged
    r.crash()
    p = r.plan()
    dom = change(p, "domain:guest")
    assert dom.blocked and "no fence agent" in dom.blocked  # type: ignore[attr-defined]
    assert "--confirm-off" in dom.blocked  # type: ignore[attr-defined]
    r.apply()
    assert r.where() == {"kvm-1": "shut-off"}
    # a person confirms it is off (what `kvmstate fence kvm-1 --confirm-off` records)
    r.ledger.put(FenceRecord("kvm-1", "10.77.0.21", "person", stamp(), "root"))
    p = r.plan()
    assert not change(p, "domain:guest").blocked  # type: ignore[attr-defined]
    r.apply()
    assert r.where() == {"kvm-1": "shut-off", "kvm-2": "running"}


def test_an_agent_that_does_not_confirm_off_restarts_nothing(agent: Path, tmp_path: Path) -> None:
    r = Run(ha_spec(agent).replace("grace: 0s", "grace: 0s\n      timeout: 2s"), tmp_path)
    assert r.apply().converged
    r.crash()
    (agent.parent / "power-kvm-1").write_text("stuck")  # its BMC ignores the off
    report = r.apply()
    status = {str(o.id): o for o in report.outcomes}
    assert status["fence:kvm-1"].status is Status.FAILED
    assert "did not confirm" in (status["fence:kvm-1"].error or "")
    assert status["domain:guest"].status is Status.SKIPPED
    assert r.where() == {"kvm-1": "shut-off"}
    assert r.ledger.get("kvm-1") is None


def test_a_partition_is_not_a_death(agent: Path, tmp_path: Path) -> None:
    """Unreachable but still running (no crash): with a grace period, a host that answers
    again within it is not fenced."""
    r = Run(ha_spec(agent), tmp_path)
    assert r.apply().converged
    r.cluster["kvm-1"].reachable = False
    p = r.plan()
    # the guest may be running there: nothing is decided from a timeout; the domain waits
    dom = change(p, "domain:guest")
    assert dom.is_noop or dom.blocked or "waiting for fencing" in dom.reason  # type: ignore[attr-defined]
    assert r.where() == {"kvm-1": "running"}


def test_what_if_host_down_touches_nothing(converged: Run) -> None:
    r = converged
    before = dict(r.cluster.round_trips())
    p = r.plan(assume_down=frozenset({"kvm-1"}))
    assert r.cluster.round_trips()["kvm-1"] == before["kvm-1"]  # never contacted
    dom = change(p, "domain:guest")
    assert dom.action is Action.CREATE and not dom.blocked  # type: ignore[attr-defined]
    assert "HA restart on kvm-2" in dom.reason  # type: ignore[attr-defined]
    assert "kvm-1 is down (what-if" in p.down[ResourceId("pool", "images", "kvm-1")]
    assert r.where() == {"kvm-1": "running"}
    assert r.ledger.get("kvm-1") is None


def test_what_if_names_what_cannot_restart(tmp_path: Path) -> None:
    # no fence agent on kvm-2, and a pinned, non-HA domain there
    text = ha_spec(None).replace("    host: kvm-1\n", "    host: kvm-2\n")
    r = Run(text, tmp_path)
    assert r.apply().converged
    p = r.plan(assume_down=frozenset({"kvm-2"}))
    dom = change(p, "domain:guest")
    assert dom.blocked and "no fence agent" in dom.blocked  # type: ignore[attr-defined]


def test_priority_decides_who_gets_the_room(agent: Path, tmp_path: Path) -> None:
    text = ha_spec(agent).replace("    ha: {priority: 10}\n", "    ha: {priority: 1}\n")
    second = text[text.index("  guest:\n") :].replace("  guest:\n", "  vip:\n", 1)
    second = second.replace("guest.qcow2", "vip.qcow2").replace(
        "ha: {priority: 1}", "ha: {priority: 5}"
    )
    second = second.replace("guest-serial.log", "vip-serial.log")
    text = (
        text.replace(
            "\nvolumes:\n",
            "\nvolumes:\n  vip.qcow2: {pool: images, format: qcow2, capacity: 64MiB}\n",
        )
        + second
    )
    r = Run(text, tmp_path)
    assert r.apply().converged
    r.crash()
    r.cluster["kvm-2"].mem_available = 200 * 2**20  # room for one 128 MiB guest
    p = r.plan()
    assert not change(p, "domain:vip").blocked  # type: ignore[attr-defined]
    guest = change(p, "domain:guest")
    assert guest.blocked and "no HA host has room" in guest.blocked  # type: ignore[attr-defined]


def test_ha_on_a_pinned_domain_is_a_spec_error(tmp_path: Path) -> None:
    text = ha_spec(None).replace("      policy: preferred\n", "")
    with pytest.raises(SpecError, match="pinned"):
        REGISTRY.parse(text)


def test_plan_shows_fencing_and_whether_storage_enforces_locks(converged: Run) -> None:
    r = converged
    dom = change(r.plan(), "domain:guest")
    assert dom.is_noop  # type: ignore[attr-defined]
    # the lab-shaped spec mounts NFSv3 with nolock: a lock stays on the client that took it
    assert "storage locks: NOT enforced" in dom.reason  # type: ignore[attr-defined]
    assert "kvm-2 took the lock kvm-1 held" in dom.reason  # type: ignore[attr-defined]
    assert "fence agents on kvm-1" in dom.reason  # type: ignore[attr-defined]
    # and no person-only HA: kvm-2 has no agent, so that is named as the problem
    assert "rests on a person alone: kvm-2 has no fence agent" in dom.reason  # type: ignore[attr-defined]
    assert not r.cluster.flocks  # the probe let go of its lock


def test_locks_are_enforced_over_nfs4(agent: Path, tmp_path: Path) -> None:
    text = ha_spec(agent).replace("    nfs_version: 3\n    options: [nolock, _netdev]\n", "")
    r = Run(text, tmp_path)
    assert r.apply().converged
    dom = change(r.plan(), "domain:guest")
    assert "storage locks: enforced between hosts" in dom.reason  # type: ignore[attr-defined]
    assert "rests on a person" not in dom.reason  # type: ignore[attr-defined]
