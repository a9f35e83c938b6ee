"""Issue 17 on the real lab: the domain's CPU. ``cpu: {mode: baseline}`` gives the lab guest a
named model computed from both KVM hosts' capabilities (libvirt's baselineHypervisorCPU), that
the migration pre-flight (compareHypervisorCPU) accepts on each of them, that the guest boots
with (its live definition names the model) and live-migrates with both ways; a named model
with a feature the target cannot provide (``vmx``: QEMU's TCG never provides VMX) is blocked
in the plan with the feature named.

The lab guest is specs/lab.yaml's direct-kernel-boot guest (no image; it counts on its serial
log), TCG (type: qemu)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from labkit import (
    GUEST,
    LAB_SPEC,
    apply,
    cli,
    converge,
    defined_on,
    home,
    plan,
    variant,
    virsh,
    wait_counter,
)

from kvmstate.lab.lab import Lab
from kvmstate.lab.proc import wait_for
from kvmstate.model import Action, Change

pytestmark = pytest.mark.lab

# both KVM hosts allowed; a restart (needed for a new CPU) powers the kernel-boot guest off
# at once (it has no ACPI handler)
ALLOWED = (
    "    placement: {hosts: [kvm-1, kvm-2]}\n    restart: on-change\n    shutdown_timeout: 0s\n"
)


def with_cpu(tmp_path: Path, name: str, cpu: str, host: str = "kvm-1") -> Path:
    return variant(
        tmp_path,
        name,
        lambda t: t.replace("    vcpus: 1\n", f"    vcpus: 1\n    cpu: {cpu}\n{ALLOWED}").replace(
            "    host: kvm-1\n", f"    host: {host}\n"
        ),
    )


@pytest.fixture(scope="module")
def on_kvm1(lab: Lab) -> Iterator[Lab]:
    lab.reset()
    yield home(lab)
    lab.reset()  # the guest's definition keeps the CPU it was given


def change_of(p: object, kind: str) -> Change:
    [c] = [c for c in p.changes if c.id.kind == kind]  # type: ignore[attr-defined]
    return c


def test_baseline_cpu_boots_passes_the_preflight_on_both_hosts_and_migrates(
    on_kvm1: Lab, tmp_path: Path
) -> None:
    lab = on_kvm1
    before = lab.guest_reading(GUEST)
    base = with_cpu(tmp_path, "baseline", "{mode: baseline}")
    # the plan says which CPU: a named model (not "baseline"), read from both hosts
    dom = change_of(plan(base), "domain")
    # (listed twice: the definition's, and the running guest's that the restart applies)
    cpus = [d for d in dom.diffs if d.field == "cpu"]
    model = str(cpus[0].after).split(" ")[0]
    assert model and model != "baseline", cpus
    r = cli("apply", base, "--auto-approve")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "restarted to apply cpu" in r.stdout, r.stdout
    # the guest boots with it: a new boot counts (the serial log keeps the old boot's last
    # lines until the new kernel prints: wait for a new boot id), its live definition has
    # the model
    wait_for(
        "a new boot of the guest after the restart",
        lambda: lab.guest_reading(GUEST).boot not in (None, before.boot),
        timeout=120,
    )
    after = lab.guest_reading(GUEST)
    assert after.boot is not None and after.boot != before.boot
    live = virsh(lab, "kvm-1", "dumpxml", GUEST)
    assert f">{model}</model>" in live, live
    assert not plan(base).has_changes
    # the pre-flight accepts it on kvm-2, and the guest live-migrates there...
    there = with_cpu(tmp_path, "baseline-kvm2", "{mode: baseline}", host="kvm-2")
    move = change_of(plan(there), "placement")
    assert move.action is Action.MIGRATE and move.blocked is None
    [check] = [c for c in move.checks if c.name == "cpu"]
    assert check.ok and model in check.detail and "kvm-2" in check.detail, check
    last = wait_counter(lab)
    converge(there)
    assert defined_on(lab) == {"kvm-2": "running"}
    last = wait_counter(lab, above=last)
    # ...and on kvm-1, and back
    move = change_of(plan(base), "placement")
    [check] = [c for c in move.checks if c.name == "cpu"]
    assert move.blocked is None and check.ok and "kvm-1" in check.detail, check
    converge(base)
    assert defined_on(lab) == {"kvm-1": "running"}
    wait_counter(lab, above=last)


def test_a_feature_the_target_lacks_is_blocked_and_named(on_kvm1: Lab, tmp_path: Path) -> None:
    lab = on_kvm1
    if defined_on(lab) != {"kvm-1": "running"}:
        converge(LAB_SPEC)
    bad = with_cpu(tmp_path, "vmx", "{model: qemu64, features: {vmx: require}}", host="kvm-2")
    p = plan(bad)
    move = change_of(p, "placement")
    assert move.action is Action.MIGRATE and move.blocked
    assert "vmx" in move.blocked and "cpu" in move.blocked, move.blocked
    [check] = [c for c in move.checks if c.name == "cpu"]
    assert not check.ok and "vmx" in check.detail and "kvm-2" in check.detail
    r = cli("plan", bad)
    assert r.returncode == 2 and "vmx" in r.stdout, r.stdout
    # nothing moved: a plan changes nothing
    assert defined_on(lab) == {"kvm-1": "running"}
    assert apply(LAB_SPEC).converged
