"""Issue 16 on the real lab: guests that boot from their disks, with a cloud-init identity, shut
down cleanly through ACPI, and pending changes converged by an opt-in restart.

What these tests expect of the lab's disk-bootable guest image (built by the lab from Debian
packages; its path is ``GUEST_IMAGE``, a qcow2 file readable from the storage host):
- it boots from its disk (bootloader, Debian's kernel, busybox) with ``console=ttyS0``;
- its init mounts the NoCloud seed (the CD-ROM labelled ``cidata``, on SATA: ahci, sr_mod,
  cdrom, isofs), reads ``local-hostname`` from ``meta-data``, sets it, and prints
  ``kvmstate-guest: hostname NAME`` on the serial console;
- it answers the ACPI power button (busybox acpid, or a handler of the power button event)
  with a clean shutdown (sync, unmount) and prints ``kvmstate-guest: clean shutdown`` first;
- it keeps the counter as today (``parse_serial_counter``), with a boot identifier.
The busybox guest of ``specs/lab.yaml`` (direct kernel boot) must NOT answer the power button:
the power-off fallback is proven on it.

The guest image reaches the shared pool as kvmstate would put it there: uploaded from this
machine (``upload:``); the linked clones are ``backing:`` overlays on it.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from labkit import LAB_SPEC, cli, converge, plan, virsh

from kvmstate.lab.guest import CounterReading, parse_serial_reading
from kvmstate.lab.lab import Lab
from kvmstate.lab.proc import wait_for

pytestmark = pytest.mark.lab

GUEST_IMAGE = Path("/var/lib/kvmstate-lab/guest/disk.qcow2")
POOL = "/var/lib/libvirt/images"  # on the KVM hosts (NFS); /srv/images on the storage host
SERIAL = "/var/log/libvirt/qemu/{name}.serial.log"
HOSTNAME_LINE = "kvmstate-guest: hostname {hostname}"
CLEAN = "kvmstate-guest: clean shutdown"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtZ9Ek8oXFZc2w9r8c1F7M3Tq1Jm4aQdNqgqT0sYv0H lab@x"
HASH = "$6$kvmstatelab$Q8bTnU0m1x0cB4oE6Tq5Yc8z3x1Gm2Jt7vR9sD4fH6kL0pW2aZ5nM8bV3cX1yE7uI9o"


@pytest.fixture(scope="module")
def guests_lab(lab: Lab) -> Iterator[Lab]:
    if not GUEST_IMAGE.exists():
        pytest.skip(f"the lab's disk-bootable guest image {GUEST_IMAGE} is not built")
    lab.reset()
    converge(LAB_SPEC)  # the chain: subvolume, export, mounts, pool
    yield lab


def _virtual_size(path: Path) -> int:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", "--", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(json.loads(out)["virtual-size"])


def full_copy(lab: Lab, name: str) -> dict[str, Any]:
    """The guest image, uploaded by kvmstate from this machine into the shared pool (the
    volume kind's `upload:` source)."""
    return {"pool": "images", "format": "qcow2", "upload": str(GUEST_IMAGE)}


def guest(name: str, host: str, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "type": "qemu",
        "memory": "128MiB",
        "vcpus": 1,
        "disks": [{"volume": f"{name}.qcow2", "bus": "virtio", "cache": "none"}],
        "serial": {"type": "file", "path": SERIAL.format(name=name)},
        "state": "running",
        "host": host,
        "placement": {"hosts": ["kvm-1", "kvm-2"]},
        "cloud_init": {
            "hostname": f"{name}-host",
            "users": [{"name": "debian", "ssh_authorized_keys": [KEY], "password_hash": HASH}],
        },
    }
    d.update(extra)
    return d


def spec_with(tmp_path: Path, file: str, volumes: dict[str, Any], domains: dict[str, Any]) -> Path:
    """specs/lab.yaml without its busybox guest, with these volumes and domains."""
    data = yaml.safe_load(LAB_SPEC.read_text())
    data["volumes"] = volumes
    data["domains"] = domains
    out = tmp_path / file
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def serial(lab: Lab, host: str, name: str) -> str:
    return lab.run(host, ["cat", "--", SERIAL.format(name=name)], check=False).stdout


def wait_serial(lab: Lab, host: str, name: str, text: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = serial(lab, host, name)
        if text in out:
            return out
        time.sleep(1)
    raise AssertionError(f"{name} on {host} did not print {text!r} within {timeout}s")


def counter_of(text: str) -> CounterReading:
    reading = parse_serial_reading(text)
    assert reading is not None and reading.boot, text[-2000:]
    return reading


def wait_counter_past(
    lab: Lab, host: str, name: str, before: CounterReading, timeout: float = 120
) -> CounterReading:
    """The guest's counter on ``host`` once it is past ``before`` (its serial log there)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reading = parse_serial_reading(serial(lab, host, name))
        if reading is not None and reading.value > before.value:
            return reading
        time.sleep(1)
    raise AssertionError(f"{name} on {host} did not count past {before} within {timeout}s")


def plan_exit(path: Path) -> int:
    return cli("plan", path).returncode


def _cleanup(lab: Lab, names: list[str]) -> None:
    for name in names:
        for h in ("kvm-1", "kvm-2"):
            virsh(lab, h, "destroy", name, check=False)
            virsh(lab, h, "undefine", name, check=False)
        lab.run(
            "storage",
            ["rm", "-f", "--", f"/srv/images/{name}.qcow2", f"/srv/images/{name}-cidata.iso"],
        )


def test_shut_off_is_a_clean_acpi_shutdown(guests_lab: Lab, tmp_path: Path) -> None:
    lab = guests_lab
    try:
        vols = {"gs.qcow2": full_copy(lab, "gs.qcow2")}
        up = spec_with(tmp_path, "up.yaml", vols, {"gs": guest("gs", "kvm-1")})
        r = cli("apply", up, "--auto-approve")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "(secret, sha256 " in r.stdout and HASH not in r.stdout + r.stderr
        wait_serial(lab, "kvm-1", "gs", HOSTNAME_LINE.format(hostname="gs-host"))
        mode = lab.run("storage", ["stat", "-c", "%a", "--", "/srv/images/gs-cidata.iso"])
        assert mode.stdout.strip() == "600"
        assert plan_exit(up) == 0

        off = spec_with(tmp_path, "off.yaml", vols, {"gs": guest("gs", "kvm-1", state="shut-off")})
        r = cli("apply", off, "--auto-approve")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "the guest shut down in" in r.stdout, r.stdout
        assert "powering it off" not in r.stdout
        assert CLEAN in serial(lab, "kvm-1", "gs")
        assert virsh(lab, "kvm-1", "domstate", "gs").strip() == "shut off"
        assert plan_exit(off) == 0
    finally:
        _cleanup(lab, ["gs"])


def test_a_guest_that_ignores_the_power_button_is_powered_off_after_the_timeout(
    guests_lab: Lab, tmp_path: Path
) -> None:
    """The busybox guest of specs/lab.yaml has no ACPI handler."""
    lab = guests_lab
    converge(LAB_SPEC)
    text = LAB_SPEC.read_text().replace(
        "    state: running\n", "    state: shut-off\n    shutdown_timeout: 5s\n"
    )
    off = tmp_path / "off.yaml"
    off.write_text(text)
    try:
        r = cli("apply", off, "--auto-approve")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "did not shut down within 5s (shutdown_timeout): powering it off" in r.stdout
        assert virsh(lab, "kvm-1", "domstate", "lab-guest").strip() == "shut off"
    finally:
        converge(LAB_SPEC)


def test_a_pending_memory_change_is_converged_by_the_opt_in_restart(
    guests_lab: Lab, tmp_path: Path
) -> None:
    lab = guests_lab
    try:
        vols = {"gr.qcow2": full_copy(lab, "gr.qcow2")}
        up = spec_with(tmp_path, "up.yaml", vols, {"gr": guest("gr", "kvm-1")})
        assert cli("apply", up, "--auto-approve").returncode == 0
        wait_serial(lab, "kvm-1", "gr", HOSTNAME_LINE.format(hostname="gr-host"))
        bigger = spec_with(
            tmp_path, "big.yaml", vols, {"gr": guest("gr", "kvm-1", memory="192MiB")}
        )
        r = cli("apply", bigger, "--auto-approve")
        assert r.returncode == 0, r.stdout + r.stderr
        p = cli("plan", bigger)
        assert p.returncode == 2 and "pending restart" in p.stdout
        assert "--restart-pending" in p.stdout  # the way out is named
        r = cli("apply", bigger, "--auto-approve", "--restart-pending")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "restarted to apply" in r.stdout and "the guest shut down in" in r.stdout
        # (the serial log starts afresh at the new boot: the guest shutting itself down is
        # what "the guest shut down in" says, not a power-off)
        wait_serial(lab, "kvm-1", "gr", HOSTNAME_LINE.format(hostname="gr-host"))
        assert plan_exit(bigger) == 0
        info = virsh(lab, "kvm-1", "dominfo", "gr")
        assert "196608 KiB" in info, info
    finally:
        _cleanup(lab, ["gr"])


def clone_volumes(lab: Lab) -> dict[str, Any]:
    """A template in the pool (a full copy) and two linked clones grown past it. The clones
    use the volume kind's ``backing:`` (issue 16, another branch)."""
    template = full_copy(lab, "tmpl.qcow2")
    grown = _virtual_size(GUEST_IMAGE) + 64 * 1024**2
    clone = {"pool": "images", "format": "qcow2", "capacity": grown, "backing": "tmpl.qcow2"}
    return {"tmpl.qcow2": template, "g1.qcow2": clone, "g2.qcow2": dict(clone)}


def test_two_linked_clones_each_with_its_own_hostname(guests_lab: Lab, tmp_path: Path) -> None:
    lab = guests_lab
    try:
        vols = clone_volumes(lab)
        two = {"g1": guest("g1", "kvm-1"), "g2": guest("g2", "kvm-2")}
        spec = spec_with(tmp_path, "two.yaml", vols, two)
        r = cli("apply", spec, "--auto-approve")
        assert r.returncode == 0, r.stdout + r.stderr
        wait_serial(lab, "kvm-1", "g1", HOSTNAME_LINE.format(hostname="g1-host"))
        wait_serial(lab, "kvm-2", "g2", HOSTNAME_LINE.format(hostname="g2-host"))
        assert HOSTNAME_LINE.format(hostname="g2-host") not in serial(lab, "kvm-1", "g1")
        assert plan_exit(spec) == 0
        # the seeds are on shared storage: both guests live-migrate (they swap hosts) and keep
        # their CD-ROM, hostname and counter (the same boot goes on counting there)
        before = {
            "g1": counter_of(serial(lab, "kvm-1", "g1")),
            "g2": counter_of(serial(lab, "kvm-2", "g2")),
        }
        swapped = {"g1": guest("g1", "kvm-2"), "g2": guest("g2", "kvm-1")}
        sspec = spec_with(tmp_path, "swapped.yaml", vols, swapped)
        r = cli("apply", sspec, "--auto-approve")
        assert r.returncode == 0 and r.stdout.count("migrated") >= 2, r.stdout + r.stderr
        assert plan_exit(sspec) == 0
        for name, host in (("g1", "kvm-2"), ("g2", "kvm-1")):
            assert f"{name}-cidata.iso" in virsh(lab, host, "domblklist", name)
            after = wait_counter_past(lab, host, name, before[name])
            # the same boot, hostname and all: the guest's memory carried over
            assert after.boot == before[name].boot, (name, before[name], after)
        # then both on kvm-2, for what follows
        moved = {"g1": guest("g1", "kvm-2"), "g2": guest("g2", "kvm-2")}
        mspec = spec_with(tmp_path, "moved.yaml", vols, moved)
        r = cli("apply", mspec, "--auto-approve")
        assert r.returncode == 0 and "migrated" in r.stdout, r.stdout + r.stderr
        assert plan_exit(mspec) == 0
        # a new identity: the plan says next boot, the disk is not touched
        inode = lab.run("storage", ["stat", "-c", "%i", "--", "/srv/images/g1.qcow2"]).stdout
        renamed = {
            "g1": guest("g1", "kvm-2", cloud_init={"hostname": "g1-renamed"}),
            "g2": guest("g2", "kvm-2"),
        }
        rspec = spec_with(tmp_path, "renamed.yaml", vols, renamed)
        p = cli("plan", rspec)
        assert p.returncode == 2 and "applied at the guest's next boot" in p.stdout, p.stdout
        assert cli("apply", rspec, "--auto-approve").returncode == 0
        assert plan(rspec).has_changes is False
        assert HOSTNAME_LINE.format(hostname="g1-renamed") not in serial(lab, "kvm-2", "g1")
        virsh(lab, "kvm-2", "shutdown", "g1")  # its next boot
        wait_for(
            "g1 shut down by its guest",
            lambda: virsh(lab, "kvm-2", "domstate", "g1").strip() == "shut off",
            timeout=120,
        )
        virsh(lab, "kvm-2", "start", "g1")
        wait_serial(lab, "kvm-2", "g1", HOSTNAME_LINE.format(hostname="g1-renamed"))
        same = lab.run("storage", ["stat", "-c", "%i", "--", "/srv/images/g1.qcow2"]).stdout
        assert same == inode  # the disk was never re-imaged
    finally:
        _cleanup(lab, ["g1", "g2"])
        lab.run("storage", ["rm", "-f", "--", "/srv/images/tmpl.qcow2"])
