"""Issue 5 on the real lab: a changed `host:` live-migrates the running guest, safely."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from labkit import (
    LAB_SPEC,
    MIGRATED_SPEC,
    apply,
    cli,
    converge,
    defined_on,
    home,
    pending,
    plan,
    variant,
    virsh,
    wait_counter,
)

from kvmstate.lab.lab import Lab
from kvmstate.model import Action, Status

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def on_kvm1(lab: Lab) -> Iterator[Lab]:
    lab.reset()
    yield home(lab)


@pytest.fixture
def guest_home(on_kvm1: Lab) -> Iterator[Lab]:
    """Each test starts and ends with the guest running on kvm-1, converged."""
    if defined_on(on_kvm1) != {"kvm-1": "running"} or plan(LAB_SPEC).has_changes:
        assert apply(LAB_SPEC).converged
    yield on_kvm1
    if defined_on(on_kvm1) != {"kvm-1": "running"} or plan(LAB_SPEC).has_changes:
        assert apply(LAB_SPEC).converged


def test_placement_change_live_migrates_and_back_three_times(guest_home: Lab) -> None:
    lab = guest_home
    last = wait_counter(lab)
    for _ in range(3):
        for spec, host in ((MIGRATED_SPEC, "kvm-2"), (LAB_SPEC, "kvm-1")):
            p = plan(spec)
            [move] = [c for c in p.pending]
            assert move.action is Action.MIGRATE
            assert move.data["live"] is True
            assert all(c.ok for c in move.checks), move.checks
            r = cli("apply", spec, "--auto-approve")
            assert r.returncode == 0, r.stdout + r.stderr
            assert "migrated" in r.stdout and "downtime" in r.stdout, r.stdout
            assert defined_on(lab) == {host: "running"}  # one host runs it, one defines it
            assert pending(plan(spec)) == {}
            now = wait_counter(lab, above=last)  # memory carried over: it never restarts
            assert now > last
            last = now


def test_json_events_report_progress_and_the_completed_job(guest_home: Lab) -> None:
    import json

    r = cli("apply", MIGRATED_SPEC, "--auto-approve", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    done = [e for e in events if e.get("event") == "migration-done"]
    assert len(done) == 1
    assert done[0]["source"] == "kvm-1" and done[0]["target"] == "kvm-2"
    assert done[0]["time_elapsed"] > 0
    assert done[0]["downtime"] is not None
    assert events[-1]["event"] == "report" and events[-1]["report"]["converged"]


def test_blocked_preflight_leaves_the_domain_untouched(guest_home: Lab, tmp_path: Path) -> None:
    """The target cannot hold the guest (64 GiB asked, this machine has less): the plan shows
    the failed check, apply refuses the move and exits 1, the guest keeps running where it is.
    (A stopped pool on the target is no block: apply starts it first, then migrates.)"""
    lab = guest_home
    huge = variant(
        tmp_path,
        "huge",
        lambda t: t.replace("memory: 128MiB", "memory: 64GiB"),
        base=MIGRATED_SPEC,
    )
    before = wait_counter(lab)
    p = plan(huge)
    move = next(c for c in p.pending if c.id.kind == "placement")
    assert move.blocked and "pre-flight failed" in move.blocked
    assert any(c.name == "memory" and not c.ok for c in move.checks), move.checks
    r = cli("apply", huge, "--auto-approve")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "pre-flight failed" in r.stdout + r.stderr
    assert defined_on(lab) == {"kvm-1": "running"}
    wait_counter(lab, above=before)


def test_stopped_pool_on_the_target_is_started_before_the_migration(guest_home: Lab) -> None:
    lab = guest_home
    virsh(lab, "kvm-2", "pool-destroy", "images")
    p = plan(MIGRATED_SPEC)
    move = next(c for c in p.pending if c.id.kind == "placement")
    assert move.id in p.deferred  # blocked now, checked again once the pool is started
    r = cli("apply", MIGRATED_SPEC, "--auto-approve")
    assert r.returncode == 0, r.stdout + r.stderr
    assert defined_on(lab) == {"kvm-2": "running"}


def test_migration_timeout_aborts_and_leaves_the_guest_running_on_the_source(
    guest_home: Lab, tmp_path: Path
) -> None:
    lab = guest_home
    slow = variant(
        tmp_path,
        "slow",
        lambda t: t.replace(
            "migration: {max_downtime: 300ms, timeout: 2m}",
            "migration: {max_downtime: 1ms, bandwidth: 1MiB, timeout: 4s}",
        ).replace("host: kvm-1", "host: kvm-2"),
    )
    before = wait_counter(lab)
    events: list[dict[str, Any]] = []
    report = apply(slow, events=events.append)
    [outcome] = [o for o in report.outcomes if o.id.kind == "placement"]
    assert outcome.status is Status.FAILED
    assert "timed out" in (outcome.error or "") and "still running on kvm-1" in (
        outcome.error or ""
    )
    assert any(e.get("event") == "migration-progress" for e in events)
    assert defined_on(lab) == {"kvm-1": "running"}
    wait_counter(lab, above=before)
    assert "running" in virsh(lab, "kvm-1", "domstate", "lab-guest")


def test_evacuate_moves_every_domain_off_a_host(guest_home: Lab, tmp_path: Path) -> None:
    lab = guest_home
    spec = variant(
        tmp_path,
        "floating",
        lambda t: t.replace(
            "    host: kvm-1\n", "    host: kvm-1\n    placement: {hosts: [kvm-1, kvm-2]}\n"
        ),
    )
    before = plan(spec)
    assert not before.has_changes, [c.as_dict() for c in before.pending]
    r = cli("evacuate", "kvm-1", spec, "--auto-approve")
    assert r.returncode == 0, r.stdout + r.stderr
    assert defined_on(lab) == {"kvm-2": "running"}
    r = cli("apply", spec, "--auto-approve")  # pinned to kvm-1 again once not draining
    assert r.returncode == 0, r.stdout + r.stderr
    assert defined_on(lab) == {"kvm-1": "running"}


def _two_guests(tmp_path: Path, name: str, a_on: str, b_on: str, caps: dict[str, str]) -> Path:
    """specs/lab.yaml plus a second guest (its own volume) and per-host memory caps."""
    import yaml
    from specedit import add_second_guest

    data = yaml.safe_load(LAB_SPEC.read_text())
    add_second_guest(data, "lab-guest", "lab-guest-2", a_on, b_on, caps)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_two_guests_swap_hosts_without_overcommitting_either(
    guest_home: Lab, tmp_path: Path
) -> None:
    """kvm-2 may hold 200 MiB of guests and has lab-guest-2 (128 MiB): lab-guest can only
    arrive once lab-guest-2 has left. The plan says so, and the apply moves them in that
    order; two full hosts (200 MiB each) cannot swap at all and nothing moves."""
    lab = guest_home
    caps = {"kvm-1": "300MiB", "kvm-2": "200MiB"}
    start = _two_guests(tmp_path, "start", "kvm-1", "kvm-2", caps)
    swapped = _two_guests(tmp_path, "swapped", "kvm-2", "kvm-1", caps)
    full = _two_guests(tmp_path, "full", "kvm-2", "kvm-1", {"kvm-1": "200MiB", "kvm-2": "200MiB"})
    try:
        assert apply(start).converged
        wait_counter(lab, domain="lab-guest-2")
        assert defined_on(lab, "lab-guest-2") == {"kvm-2": "running"}

        # both full: blocked with the reason, nothing touched
        r = cli("apply", full, "--auto-approve")
        assert r.returncode == 1, r.stdout + r.stderr
        said = " ".join((r.stdout + r.stderr).split())
        assert "no order of this apply's migrations makes room" in said, r.stdout + r.stderr
        assert defined_on(lab) == {"kvm-1": "running"}
        assert defined_on(lab, "lab-guest-2") == {"kvm-2": "running"}

        r = cli("plan", swapped)
        assert r.returncode == 2, r.stdout + r.stderr
        said = " ".join(r.stdout.split())  # however the terminal wraps it
        assert "after lab-guest-2 leaves kvm-2" in said, r.stdout
        assert "room once lab-guest-2 leaves kvm-2" in said, r.stdout
        counters = {d: wait_counter(lab, domain=d) for d in ("lab-guest", "lab-guest-2")}
        events: list[dict[str, Any]] = []
        converge(swapped, events=events.append)
        done = [e["domain"] for e in events if e.get("event") == "migration-done"]
        assert done == ["lab-guest-2", "lab-guest"], done
        assert defined_on(lab) == {"kvm-2": "running"}
        assert defined_on(lab, "lab-guest-2") == {"kvm-1": "running"}
        for d, n in counters.items():
            wait_counter(lab, above=n, domain=d)  # neither guest restarted
        assert not plan(swapped).has_changes
    finally:
        for host in ("kvm-1", "kvm-2"):
            virsh(lab, host, "destroy", "lab-guest-2", check=False)
            virsh(lab, host, "undefine", "lab-guest-2", check=False)
        virsh(lab, "kvm-1", "vol-delete", "--pool", "images", "lab-guest-2.qcow2", check=False)
