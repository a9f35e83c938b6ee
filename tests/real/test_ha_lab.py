"""Issue 19 on the real lab: a host dies (`lab crash`: every process killed at once, its link
down), its HA guest restarts on the other host from its disk once the lab's fence agent
confirmed the power-off, and the host that comes back (`lab boot`, with its old libvirt
definitions) never starts its stale copy. An unreachable host that is not fenced never gets
its guest started elsewhere. `plan --host-down` touches nothing.

The ledger of fenced hosts and the journal go to a temporary state directory
(KVMSTATE_STATE_DIR), so the tests leave nothing on the machine."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from labkit import ROOT, cli, defined_on, variant, virsh

from kvmstate.lab.guest import CounterReading, parse_serial_reading
from kvmstate.lab.lab import Lab
from kvmstate.lab.proc import wait_for

pytestmark = pytest.mark.lab

HA_SPEC = ROOT / "specs" / "lab-ha.yaml"
GUEST = "lab-guest"
SERIAL = f"/var/log/libvirt/qemu/{GUEST}.serial.log"
QEMU_LOG = f"/var/log/libvirt/qemu/{GUEST}.log"


@pytest.fixture
def ha_lab(lab: Lab, tmp_path: Path) -> Iterator[tuple[Lab, dict[str, str]]]:
    lab.reset()
    env = {"KVMSTATE_STATE_DIR": str(tmp_path / "state")}
    r = cli("apply", HA_SPEC, "--auto-approve", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    yield lab, env
    for h in ("kvm-1", "kvm-2"):  # whatever a case did, every host is up again
        if lab.power_state(h) != "on":
            lab.boot(h)
    lab.reset()


def wait_counter_on(lab: Lab, host: str, above: int) -> CounterReading:
    """The guest's counter on ``host`` once it is past ``above`` (a hang guard, no timing)."""
    seen: list[CounterReading] = []

    def past() -> bool:
        out = lab.run(host, ["tail", "-c", "4096", SERIAL], check=False).stdout
        r = parse_serial_reading(out)
        if r is not None and r.value > above:
            seen.append(r)
            return True
        return False

    wait_for(f"the counter of {GUEST} on {host} past {above}", past, timeout=180)
    return seen[-1]


def qemu_starts(lab: Lab, host: str) -> int:
    """How many times libvirt started QEMU for the guest on ``host`` (its log's start lines)."""
    out = lab.run(host, ["cat", QEMU_LOG], check=False).stdout
    return len(re.findall(r"^\S+ starting up", out, re.M))


def test_crash_fence_restart_elsewhere_and_the_returning_host_never_starts_its_copy(
    ha_lab: tuple[Lab, dict[str, str]],
) -> None:
    lab, env = ha_lab
    assert defined_on(lab) == {"kvm-1": "running"}
    assert "Autostart:      disable" in virsh(lab, "kvm-1", "dominfo", GUEST)
    before = wait_counter_on(lab, "kvm-1", 2)
    starts_on_1 = qemu_starts(lab, "kvm-1")

    lab.crash("kvm-1")
    r = cli("plan", HA_SPEC, env=env)
    assert r.returncode in (1, 2), r.stdout + r.stderr  # kvm-1's own resources: unreachable
    assert "fence:kvm-1" in r.stdout and "fence agent fence-agent" in r.stdout, r.stdout
    assert "HA restart on kvm-2" in r.stdout and "waiting for fencing" in r.stdout, r.stdout
    assert GUEST not in virsh(lab, "kvm-2", "list", "--all", "--name")  # plan touched nothing

    r = cli("apply", HA_SPEC, "--auto-approve", env=env)
    # not converged: kvm-1 is down, and said so; the guest runs on kvm-2
    assert r.returncode == 1, r.stdout + r.stderr
    assert "on down hosts" in r.stdout, r.stdout
    assert lab.power_state("kvm-1") == "off"
    assert virsh(lab, "kvm-2", "domstate", GUEST).strip() == "running"
    after = wait_counter_on(lab, "kvm-2", before.value)
    assert after.boot != before.boot  # a restart from disk, not a migration
    serial = lab.run("kvm-2", ["cat", SERIAL]).stdout
    m = re.search(r"counter continues from (\d+)", serial)
    assert m and int(m.group(1)) >= before.value, serial  # its disk counter went on

    lab.boot("kvm-1")  # its old libvirt state: the guest's definition is still there
    assert virsh(lab, "kvm-1", "domstate", GUEST).strip() == "shut off"
    r = cli("plan", HA_SPEC, env=env)
    assert "stale" in r.stdout, r.stdout
    r = cli("apply", HA_SPEC, "--auto-approve", env=env)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    assert defined_on(lab) == {"kvm-2": "running"}  # the stale definition is gone
    assert qemu_starts(lab, "kvm-1") == starts_on_1  # kvm-1 never started its copy
    assert wait_counter_on(lab, "kvm-2", after.value).boot == after.boot
    # preferred: the next plan brings it home by a live migration
    r = cli("plan", HA_SPEC, env=env)
    assert r.returncode == 2 and "placement:lab-guest" in r.stdout, r.stdout


def test_an_unreachable_host_that_is_not_fenced_keeps_its_guest(
    ha_lab: tuple[Lab, dict[str, str]], tmp_path: Path
) -> None:
    lab, env = ha_lab
    no_agent = no_agent_on_kvm1(tmp_path)
    before = wait_counter_on(lab, "kvm-1", 2)
    lab.isolate("kvm-1")  # its link down, every process alive: a partition, not a death
    try:
        r = cli("plan", str(no_agent), env=env)
        said = " ".join(r.stdout.split())
        assert "waiting for fencing" in said and "no fence agent" in said, r.stdout
        assert "kvmstate fence kvm-1 SPEC --confirm-off" in said, r.stdout
        r = cli("apply", str(no_agent), "--auto-approve", env=env)
        assert r.returncode == 1, r.stdout + r.stderr
        assert GUEST not in virsh(lab, "kvm-2", "list", "--all", "--name")
        # still there on kvm-1 all along (the lab reads it from inside the host; its disk
        # writes wait for the NFS server it cannot reach, as on a real partition)
        assert virsh(lab, "kvm-1", "domstate", GUEST).strip() in ("running", "paused")
    finally:
        lab.reconnect("kvm-1")
    r = cli("apply", str(no_agent), "--auto-approve", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert defined_on(lab) == {"kvm-1": "running"}
    assert wait_counter_on(lab, "kvm-1", before.value).boot == before.boot  # never restarted


def no_agent_on_kvm1(tmp_path: Path) -> Path:
    return variant(
        tmp_path,
        "no-agent",
        lambda t: re.sub(
            r"  kvm-1:\n    address: (\S+)\n    fence:\n(      .*\n)+",
            r"  kvm-1: {address: \1}\n",
            t,
        ),
        base=HA_SPEC,
    )


def test_a_person_confirms_a_dead_host_off_and_it_is_journaled(
    ha_lab: tuple[Lab, dict[str, str]], tmp_path: Path
) -> None:
    """No fence agent: the restart waits for a person; `kvmstate fence --confirm-off` is
    refused while the host answers, recorded (and journaled) once it does not."""
    lab, env = ha_lab
    spec = no_agent_on_kvm1(tmp_path)
    r = cli("fence", "kvm-1", spec, "--confirm-off", env=env)
    assert r.returncode == 1 and "answers over SSH" in r.stderr, r.stdout + r.stderr
    lab.crash("kvm-1")
    r = cli("apply", spec, "--auto-approve", env=env)
    assert r.returncode == 1 and GUEST not in virsh(lab, "kvm-2", "list", "--all", "--name")
    r = cli("fence", "kvm-1", spec, "--confirm-off", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "confirmed off by" in r.stdout, r.stdout
    journal = (Path(env["KVMSTATE_STATE_DIR"]) / "journal.jsonl").read_text().splitlines()
    entry = json.loads(journal[-1])
    assert entry["event"] == "fence" and entry["host"] == "kvm-1" and entry["how"] == "person"
    r = cli("apply", spec, "--auto-approve", env=env)
    assert r.returncode == 1, r.stdout + r.stderr  # kvm-1 is down: not converged
    assert virsh(lab, "kvm-2", "domstate", GUEST).strip() == "running"


def test_what_if_a_host_died_now_touches_nothing(ha_lab: tuple[Lab, dict[str, str]]) -> None:
    lab, env = ha_lab
    for down, restart in (("kvm-2", False), ("kvm-1", True)):
        r = cli("plan", HA_SPEC, "--host-down", down, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"what if {down} died now" in r.stdout, r.stdout
        assert ("HA restart on kvm-2" in r.stdout) is restart, r.stdout
        r = cli("plan", HA_SPEC, "--host-down", down, "--json", env=env)
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        assert data["what_if"] == {"hosts_down": [down]}
        assert defined_on(lab) == {"kvm-1": "running"}
    assert not (Path(env["KVMSTATE_STATE_DIR"]) / "fenced").exists()  # nothing recorded
    # the lab's NFS client keeps locks per client: the probe says so
    r = cli("plan", HA_SPEC, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "storage locks: NOT enforced" in r.stdout, r.stdout
