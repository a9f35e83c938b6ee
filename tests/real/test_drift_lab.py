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
from labkit import GUEST, LAB_SPEC, ROOT, apply, cli, defined_on, spawn, variant, wait_counter
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


def test_cron_run_of_drift_on_a_converged_lab_prints_nothing(converged: Lab) -> None:
    """Issue 14: the installed `kvmstate` script, started the way cron starts it (a fresh
    process, a bare environment: no PYTHONWARNINGS, no terminal, no stdin), on a converged
    lab: `drift` exits 0 with empty stdout AND stderr (cron mails any output), and `plan`
    prints no warning line of anyone's."""
    kvmstate = Path(sys.executable).parent / "kvmstate"
    cron_env = {
        "HOME": os.environ.get("HOME", "/root"),
        "LOGNAME": "root",
        "SHELL": "/bin/sh",
        "PATH": "/usr/bin:/bin",
    }

    def as_cron(*args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(kvmstate), *map(str, args)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=cron_env,
            stdin=subprocess.DEVNULL,
            timeout=120,
        )

    r = as_cron("drift", LAB_SPEC)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    r = as_cron("plan", LAB_SPEC)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == ""
    assert "No changes" in r.stdout
    assert not [line for line in r.stdout.splitlines() if "Warning" in line], r.stdout


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
    spec = variant(
        tmp_path,
        "ghost",
        lambda t: t.replace("10.77.0.12", "10.77.0.98").replace(
            "identity: /var/lib/kvmstate-lab/id_ed25519",
            "identity: /var/lib/kvmstate-lab/id_ed25519\n  connect_timeout: 2s",
        ),
    )
    r = cli("drift", spec)
    assert r.returncode == 1
    assert "10.77.0.98" in r.stderr


HOLD_LOCK = """
import sys, time
from kvmstate.ops.runlock import cluster_key, local_lock
from kvmstate.loader import load_spec
spec = load_spec(sys.argv[1]).spec
key = cluster_key({n: h.address for n, h in spec.hosts.items()})
with local_lock(key, command="kvmstate apply " + sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def _refused_while_held_then_free_once_killed(
    script: str, state: Path, *, free_timeout: str
) -> tuple[subprocess.CompletedProcess[str], int]:
    """Start a process holding a lock (it prints "held"); an apply with --lock-timeout 1 must
    fail while it lives; after SIGKILL of the holder the next apply must get the lock.
    Returns the refused run and the holder's pid."""
    env = {**os.environ, "KVMSTATE_STATE_DIR": str(state)}
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(LAB_SPEC)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        lock_env = {"KVMSTATE_STATE_DIR": str(state)}
        started = time.monotonic()
        refused = cli("apply", LAB_SPEC, "--auto-approve", "--lock-timeout", "1", env=lock_env)
        assert refused.returncode == 1
        assert time.monotonic() - started >= 1
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        r = cli("apply", LAB_SPEC, "--auto-approve", "--lock-timeout", free_timeout, env=lock_env)
        assert r.returncode == 0, r.stdout + r.stderr
        return refused, holder.pid
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_second_apply_names_the_holder_and_a_killed_holder_frees_the_lock(
    converged: Lab, tmp_path: Path
) -> None:
    refused, pid = _refused_while_held_then_free_once_killed(HOLD_LOCK, tmp_path, free_timeout="1")
    assert f"pid {pid}" in refused.stderr and "kvmstate apply" in refused.stderr


def test_two_concurrent_applies_one_waits_for_the_other(converged: Lab, tmp_path: Path) -> None:
    """A slow apply (a bandwidth-limited migration that times out after 6 s) holds the lock;
    a second apply started meanwhile waits for it, then finds nothing to do."""
    slow = variant(
        tmp_path,
        "slow",
        lambda t: t.replace(
            "migration: {max_downtime: 300ms, timeout: 2m}",
            "migration: {max_downtime: 1ms, bandwidth: 1MiB, timeout: 6s}",
        ).replace("host: kvm-1", "host: kvm-2"),
    )
    state = tmp_path / "state"
    other = tmp_path / "other-machine"  # a second machine: its own local lock, same cluster
    first = spawn("apply", slow, "--auto-approve", env={"KVMSTATE_STATE_DIR": str(state)})
    deadline = time.monotonic() + 30
    while not list(state.glob("locks/*.holder")):  # readiness: the first run holds the lock
        assert time.monotonic() < deadline, "the first apply never took the lock"
        time.sleep(0.05)
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
from kvmstate.ops.clusterlock import cluster_lock
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
    refused, _ = _refused_while_held_then_free_once_killed(
        HOLD_CLUSTER_LOCK, tmp_path, free_timeout="30"
    )
    assert "kvmstate apply elsewhere.yaml" in refused.stderr
    assert "cluster lock on storage" in refused.stderr
