"""Issue 6 on the real lab: drift from cron (exit codes, classes, metrics) and the run lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from labkit import GUEST, LAB_SPEC, ROOT, apply, cli, defined_on, wait_counter
from prometheus_client.parser import text_string_to_metric_families

from kvmstate.lab.lab import Lab

pytestmark = pytest.mark.lab


@pytest.fixture
def converged(lab: Lab) -> Iterator[Lab]:
    if defined_on(lab) != {"kvm-1": "running"} or cli("drift", LAB_SPEC).returncode != 0:
        lab.reset()
        assert apply(LAB_SPEC).converged
    wait_counter(lab)
    yield lab


def drift_json(env: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    r = cli("drift", LAB_SPEC, "--json", env=env)
    return r.returncode, json.loads(r.stdout)


def classes(report: dict[str, object]) -> set[tuple[str, str]]:
    return {(str(e["id"]), str(e["class"])) for e in report["drift"]}  # type: ignore[attr-defined]


def test_drift_is_quiet_when_converged_then_reports_each_hand_change(
    converged: Lab, tmp_path: Path
) -> None:
    lab = converged
    r = cli("drift", LAB_SPEC)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")

    cfg = lab.cfg

    def migrate_by_hand() -> None:
        subprocess.run(
            [
                "virsh",
                "-c",
                cfg.ssh_uri(cfg.host("kvm-1")),
                "migrate",
                "--live",
                "--persistent",
                "--undefinesource",
                GUEST,
                cfg.ssh_uri(cfg.host("kvm-2")),
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert defined_on(lab) == {"kvm-2": "running"}

    # Each change by hand, and the drift it must show up as. The guest moves first (kvm-1's
    # share is then free to unmount); it is shut off before its export goes away.
    by_hand: list[tuple[str, object, tuple[str, str]]] = [
        ("", migrate_by_hand, ("placement:lab-guest", "runtime")),
        (
            "kvm-2",
            ["virsh", "-c", "qemu:///system", "destroy", GUEST],
            ("domain:lab-guest", "runtime"),
        ),
        (
            "storage",
            ["sed", "-i", "/subvol=images/d", "/etc/fstab"],
            ("subvolume:storage:images", "config"),
        ),
        (
            "storage",
            ["exportfs", "-u", "10.77.0.0/24:/srv/images"],
            ("export:storage:images", "runtime"),
        ),
        ("kvm-1", ["umount", "/var/lib/libvirt/images"], ("mount:kvm-1:images", "runtime")),
        (
            "kvm-1",
            ["virsh", "-c", "qemu:///system", "pool-destroy", "images"],
            ("pool:kvm-1:images", "runtime"),
        ),
    ]
    for host, action, expected in by_hand:
        if callable(action):
            action()
        else:
            lab.run(host, action)  # type: ignore[arg-type]
        code, report = drift_json()
        assert code == 2, report
        assert expected in classes(report), (expected, report)

    text = cli("drift", LAB_SPEC).stdout
    assert "drift (runtime): placement:lab-guest" in text, text

    metrics = tmp_path / "kvmstate.prom"
    r = cli("drift", LAB_SPEC, "--textfile", metrics)
    assert r.returncode == 2
    families = {f.name: f for f in text_string_to_metric_families(metrics.read_text())}
    drifted = {
        (s.labels["kind"], s.labels["class"]) for s in families["kvmstate_drift_resources"].samples
    }
    assert {("subvolume", "config"), ("export", "runtime"), ("mount", "runtime")} <= drifted
    assert families["kvmstate_last_run_success"].samples[0].value == 1

    # one apply restores all of it (the guest started where it is, then moved home), and
    # drift is clean again
    r = cli("apply", LAB_SPEC, "--auto-approve")
    assert r.returncode == 0, r.stdout + r.stderr
    assert defined_on(lab) == {"kvm-1": "running"}
    wait_counter(lab)
    r = cli("drift", LAB_SPEC)
    assert (r.returncode, r.stdout) == (0, ""), r.stdout + r.stderr


def test_drift_exits_1_when_it_cannot_tell(converged: Lab, tmp_path: Path) -> None:
    spec = tmp_path / "ghost.yaml"
    spec.write_text(
        LAB_SPEC.read_text()
        .replace("10.77.0.12", "10.77.0.98")
        .replace(
            "identity: /var/lib/kvmstate-lab/id_ed25519",
            "identity: /var/lib/kvmstate-lab/id_ed25519\n  connect_timeout: 2s",
        )
    )
    r = cli("drift", spec)
    assert r.returncode == 1
    assert "10.77.0.98" in r.stderr


HOLD_LOCK = """
import sys, time
from kvmstate.runlock import cluster_key, local_lock
from kvmstate.loader import load_spec
spec = load_spec(sys.argv[1]).spec
key = cluster_key({n: h.address for n, h in spec.hosts.items()})
with local_lock(key, command="kvmstate apply " + sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_second_apply_names_the_holder_and_a_killed_holder_frees_the_lock(
    converged: Lab, tmp_path: Path
) -> None:
    env = {**os.environ, "KVMSTATE_STATE_DIR": str(tmp_path)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(LAB_SPEC)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        r = cli(
            "apply",
            LAB_SPEC,
            "--auto-approve",
            "--lock-timeout",
            "1",
            env={"KVMSTATE_STATE_DIR": str(tmp_path)},
        )
        assert r.returncode == 1
        assert time.monotonic() - started >= 1
        assert f"pid {holder.pid}" in r.stderr and "kvmstate apply" in r.stderr
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        r = cli(
            "apply",
            LAB_SPEC,
            "--auto-approve",
            "--lock-timeout",
            "1",
            env={"KVMSTATE_STATE_DIR": str(tmp_path)},
        )
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_two_concurrent_applies_one_waits_for_the_other(converged: Lab, tmp_path: Path) -> None:
    """A slow apply (a bandwidth-limited migration that times out after 6 s) holds the lock;
    a second apply started meanwhile waits for it, then finds nothing to do."""
    slow = tmp_path / "slow.yaml"
    slow.write_text(
        LAB_SPEC.read_text()
        .replace(
            "migration: {max_downtime: 300ms, timeout: 2m}",
            "migration: {max_downtime: 1ms, bandwidth: 1MiB, timeout: 6s}",
        )
        .replace("host: kvm-1", "host: kvm-2")
    )
    state = tmp_path / "state"
    other = tmp_path / "other-machine"  # a second machine: its own local lock, same cluster
    env = {**os.environ, "KVMSTATE_STATE_DIR": str(state), "NO_COLOR": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "kvmstate.cli", "apply", str(slow), "--auto-approve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    holder = next((state / "locks").glob("*.holder"), None) if (state / "locks").exists() else None
    deadline = time.monotonic() + 30
    while holder is None and time.monotonic() < deadline:  # readiness: the lock is held
        time.sleep(0.05)
        if (state / "locks").exists():
            holder = next((state / "locks").glob("*.holder"), None)
    assert holder is not None
    second = cli(
        "apply",
        LAB_SPEC,
        "--auto-approve",
        "--lock-timeout",
        "120",
        env={"KVMSTATE_STATE_DIR": str(other)},
    )
    out, err = first.communicate(timeout=120)
    assert first.returncode == 1, out + err  # the slow migration timed out and was aborted
    assert second.returncode == 0, second.stdout + second.stderr
    assert "waiting up to 120s for the run lock held by `kvmstate apply" in second.stderr
    assert "(cluster lock on storage)" in second.stderr
    assert "No changes" in second.stdout
    assert defined_on(converged) == {"kvm-1": "running"}


HOLD_CLUSTER_LOCK = """
import asyncio, sys
from kvmstate.clusterlock import cluster_lock
from kvmstate.loader import load_spec
from kvmstate.transport.real import RealTransports

async def main():
    spec = load_spec(sys.argv[1]).spec
    async with RealTransports(spec) as t:
        async with cluster_lock(t, spec, command="kvmstate apply elsewhere.yaml"):
            print("held", flush=True)
            await asyncio.sleep(120)

asyncio.run(main())
"""


def test_cluster_lock_holder_killed_frees_the_cluster(converged: Lab, tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_CLUSTER_LOCK, str(LAB_SPEC)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        r = cli(
            "apply",
            LAB_SPEC,
            "--auto-approve",
            "--lock-timeout",
            "1",
            env={"KVMSTATE_STATE_DIR": str(tmp_path)},
        )
        assert r.returncode == 1
        assert "kvmstate apply elsewhere.yaml" in r.stderr
        assert "cluster lock on storage" in r.stderr
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        r = cli(
            "apply",
            LAB_SPEC,
            "--auto-approve",
            "--lock-timeout",
            "30",
            env={"KVMSTATE_STATE_DIR": str(tmp_path)},
        )
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
