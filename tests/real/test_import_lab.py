"""Issue 9 on the real lab: `kvmstate import` of hosts that hold the seed's chain writes a spec
whose `plan` shows no changes; importing one KVM host names what it had to leave out."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from labkit import LAB_SPEC, cli

from kvmstate.lab.lab import Lab
from kvmstate.loader import load_spec

pytestmark = pytest.mark.lab

ADDRESSES = {"storage": "10.77.0.10", "kvm-1": "10.77.0.11", "kvm-2": "10.77.0.12"}


def _ssh_flags(lab: Lab) -> list[str]:
    return [
        "--identity",
        str(lab.dir / "id_ed25519"),
        "--known-hosts",
        str(lab.dir / "known_hosts"),
    ]


def test_import_of_the_lab_plans_no_changes(bare_lab: Lab, tmp_path: Path) -> None:
    r = cli("apply", LAB_SPEC, "--auto-approve")
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "imported.yaml"
    hosts = [f"{h}={a}" for h, a in ADDRESSES.items()]
    r = cli("import", *hosts, *_ssh_flags(bare_lab), "-o", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no libvirtd socket" in r.stderr  # the storage host has no libvirt: said, not fatal

    # the same resources as the hand-written spec, with the fields that matter
    got, want = load_spec(out).spec, load_spec(LAB_SPEC).spec
    for kind in ("subvolumes", "exports", "mounts", "pools", "volumes", "domains"):
        assert set(getattr(got, kind)) == set(getattr(want, kind)), kind
    assert got.mounts["images"].hosts == ["kvm-1", "kvm-2"]
    assert got.volumes["lab-guest.qcow2"].capacity == want.volumes["lab-guest.qcow2"].capacity
    assert (got.domains["lab-guest"].host, got.domains["lab-guest"].state) == ("kvm-1", "running")

    r = cli("plan", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No changes" in r.stdout


def test_import_of_one_host_into_a_hosts_only_spec(bare_lab: Lab, tmp_path: Path) -> None:
    r = cli("apply", LAB_SPEC, "--auto-approve")
    assert r.returncode == 0, r.stdout + r.stderr
    lab = yaml.safe_load(LAB_SPEC.read_text())
    base = tmp_path / "hosts.yaml"
    base.write_text(yaml.safe_dump({k: lab[k] for k in ("version", "ssh", "hosts")}))
    out = tmp_path / "kvm-1.yaml"
    r = cli("import", "--spec", base, "kvm-1", "-o", out)
    assert r.returncode == 0, r.stdout + r.stderr
    text = out.read_text()
    # the NFS mount needs its export, on a host that was not imported: left out, with the reason
    assert "kvm-1: NFS mount 10.77.0.10:/srv/images on /var/lib/libvirt/images" in text
    spec = load_spec(out).spec
    assert set(spec.hosts) == set(ADDRESSES)  # the base spec's hosts are kept
    assert not spec.mounts and spec.pools["images"].hosts == ["kvm-1"]
    assert set(spec.domains) == {"lab-guest"}
    r = cli("plan", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No changes" in r.stdout


def test_import_of_an_unreachable_host_fails_and_writes_nothing(
    bare_lab: Lab, tmp_path: Path
) -> None:
    out = tmp_path / "never.yaml"
    r = cli("import", "ghost=10.77.0.99", *_ssh_flags(bare_lab), "-o", out, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ghost" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
