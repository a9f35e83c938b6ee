"""specs/seed-complete.yaml, the seed's whole procedure as one spec, through the command as a
user runs it: valid, and its plan (contacting no host) shows the NAT network, the imaged
volume, the guest's CPU and the guest."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "specs" / "seed-complete.yaml"


def kvmstate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmstate.cli", *args],
        input="",
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
        timeout=60,
    )


def test_validate_exits_0() -> None:
    r = kvmstate("validate", str(SPEC))
    assert r.returncode == 0, r.stderr
    assert "valid (3 hosts" in r.stdout


def test_plan_assume_empty_shows_network_image_cpu_and_guest() -> None:
    r = kvmstate("plan", str(SPEC), "--assume-empty")
    assert r.returncode == 2, r.stderr
    out = r.stdout
    for host in ("devstack-1", "devstack-2"):
        assert re.search(
            rf"\+ network:{host}:default\s+create\s+nat network default on virbr0", out
        )
    assert "192.168.122.1/24, DHCP 192.168.122.2-192.168.122.254" in out
    assert "+ volume:devstack-1:nested-ubuntu18.04.qcow2" in out
    assert "source: file xcloud:/root/ubuntu18.04.qcow2" in out
    assert "+ domain:nested-ubuntu18.04  create  kvm domain, 2 vCPU, 4096 MiB on devstack-1" in out
    assert "cpu: baseline of devstack-1, devstack-2 (+vmx)" in out
    assert "hostname: nested-ubuntu18-04" in out
    # the network and the volume come before the guest that uses them
    assert out.index("+ network:devstack-1:default") < out.index("+ domain:")
    assert out.index("+ volume:") < out.index("+ domain:")


def test_every_block_names_the_seed_step_it_replaces() -> None:
    text = SPEC.read_text()
    blocks = re.findall(r"((?:^#.*\n)*)^(\w+):", text, re.MULTILINE)
    for comment, section in blocks:
        if section == "version":
            continue
        if section != "hosts":
            assert "seed step" in comment, f"{section}: no comment naming its seed step"


def test_seed_yaml_is_unchanged_by_it() -> None:
    # specs/seed.yaml stays the storage-only contract: no network, no cpu
    seed = (ROOT / "specs" / "seed.yaml").read_text()
    assert "networks:" not in seed and "cpu:" not in seed
