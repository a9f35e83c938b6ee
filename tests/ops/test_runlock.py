"""The local run lock: one apply at a time, the holder named, released when the holder dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmstate.ops import runlock

HOLD = """
import os, sys, time
from kvmstate.ops.runlock import local_lock
with local_lock(sys.argv[1], command="kvmstate apply held.yaml"):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KVMSTATE_STATE_DIR", str(tmp_path))
    return tmp_path


def _holder(key: str) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, key], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "held"  # readiness: the lock is held now
    return p


def test_second_run_times_out_naming_the_holder(state: Path) -> None:
    p = _holder("c1")
    try:
        started = time.monotonic()
        with (
            pytest.raises(runlock.LockTimeout) as exc,
            runlock.local_lock("c1", command="kvmstate apply other.yaml", timeout=0.3),
        ):
            pass
        assert time.monotonic() - started >= 0.3
        msg = str(exc.value)
        assert "kvmstate apply held.yaml" in msg
        assert f"pid {p.pid}" in msg
    finally:
        p.kill()
        p.wait()


def test_lock_is_released_when_the_holder_is_killed(state: Path) -> None:
    p = _holder("c2")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    with runlock.local_lock("c2", command="kvmstate apply x.yaml", timeout=0):
        pass


def test_shared_locks_coexist_but_exclude_an_exclusive_one(state: Path) -> None:
    with (
        runlock.local_lock("c3", command="drift", exclusive=False),
        runlock.local_lock("c3", command="drift", exclusive=False),
        pytest.raises(runlock.LockTimeout),
        runlock.local_lock("c3", command="apply", exclusive=True, timeout=0),
    ):
        pass


def test_cluster_key_is_stable_and_distinct() -> None:
    a = runlock.cluster_key({"h1": "10.0.0.1", "h2": "10.0.0.2"})
    assert a == runlock.cluster_key({"h2": "10.0.0.2", "h1": "10.0.0.1"})
    assert a != runlock.cluster_key({"h1": "10.0.0.1"})
