"""Lab power: ``lab crash``/``boot`` (a power loss and a reboot), ``isolate``/``reconnect`` (a
partition) and the lab's fence agent, on the real lab (issue 19).

Each test leaves the lab as the session expects: every host on and connected, bare (the
``power_lab`` fixture resets it, which boots a host left off and reconnects one left
isolated). Waits are bounded hang guards (``wait_for``), never timing assertions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from kvmstate.lab import power
from kvmstate.lab.lab import Lab
from kvmstate.lab.proc import LabError, gone, pid_alive, wait_for, wait_gone
from kvmstate.lab.selftest import guest_xml

pytestmark = pytest.mark.lab

IMAGES = "/var/lib/libvirt/images"
SOURCE = "10.77.0.10:/srv/images"
HANG_GUARD = 180.0  # TCG on two busy cores; only a guard against hanging forever


@pytest.fixture
def power_lab(bare_lab: Lab) -> Iterator[Lab]:
    yield bare_lab
    bare_lab.reset()  # every host on and connected; no domain, mount or export left


def _cli(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    """``kvmstate lab ARGS`` as a new process, as a user or a script runs it."""
    return subprocess.run(
        [sys.executable, "-m", "kvmstate.lab.cli", "--dir", str(lab.dir), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def _agent(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    """The fence agent a spec names: ``<lab dir>/bin/fence-agent HOST ACTION``."""
    return subprocess.run(
        [str(lab.cfg.bin_dir / "fence-agent"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def _ssh(lab: Lab, host: str, command: str = "hostname") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-F", str(lab.cfg.ssh_config), "-o", "ConnectTimeout=20", host, command],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _virsh_ssh(lab: Lab, host: str, *args: str) -> subprocess.CompletedProcess[str]:
    """virsh over ``qemu+ssh://``, as kvmstate reaches a host's libvirt."""
    uri = lab.cfg.ssh_uri(lab.cfg.host(host))
    return subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=120)


def _power(status: dict[str, object]) -> dict[str, str]:
    hosts = status["hosts"]
    assert isinstance(hosts, list)
    return {h["name"]: h["power"] for h in hosts}


def _status_json(lab: Lab) -> dict[str, object]:
    res = _cli(lab, "status", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert isinstance(data, dict)
    return data


def _domstate(lab: Lab, host: str, name: str) -> str:
    return lab.run(host, ["virsh", "domstate", name]).stdout.strip()


def _define_guest(lab: Lab, host: str, name: str, autostart: bool) -> None:
    """A tiny TCG guest (the lab's kernel + initramfs) with its disk on the host's NFS mount."""
    disk = f"{IMAGES}/{name}.qcow2"
    lab.run(host, ["qemu-img", "create", "-q", "-f", "qcow2", disk, "16M"])
    xml = guest_xml(lab, name, disk, f"/var/log/libvirt/qemu/{name}.serial.log")
    lab.run(host, ["tee", f"/root/{name}.xml"], input=xml)
    lab.run(host, ["virsh", "define", f"/root/{name}.xml"])
    if autostart:
        lab.run(host, ["virsh", "autostart", name])
    lab.run(host, ["virsh", "start", name])


def _nfs_mount_in_fstab(lab: Lab, host: str) -> None:
    """The seed's chain by hand: subvolume, export, and the host's fstab line + mount."""
    lab.run("storage", ["btrfs", "subvolume", "create", "/srv/btrfs/images"])
    lab.run("storage", ["mkdir", "-p", "/srv/images"])
    lab.run("storage", ["mount", "-o", "subvol=images", "LABEL=kvmstate-lab", "/srv/images"])
    line = "/srv/images 10.77.0.0/24(rw,sync,no_root_squash,no_subtree_check)\n"
    lab.run("storage", ["tee", "-a", "/etc/exports"], input=line)
    lab.run("storage", ["exportfs", "-ra"])
    fstab = f"{SOURCE} {IMAGES} nfs vers=3,nolock,_netdev 0 0\n"
    lab.run(host, ["tee", "-a", "/etc/fstab"], input=fstab)
    lab.run(host, ["mount", IMAGES])


def _nfs_mounted(lab: Lab, host: str) -> bool:
    mounts = [m.split() for m in lab.run(host, ["cat", "/proc/self/mounts"]).stdout.splitlines()]
    return any(m[0] == SOURCE and m[1] == IMAGES for m in mounts)


def test_crash_kills_everything_and_boot_brings_back_libvirt_state(power_lab: Lab) -> None:
    lab = power_lab
    cfg = lab.cfg
    kvm1 = cfg.host("kvm-1")
    _nfs_mount_in_fstab(lab, "kvm-1")
    _define_guest(lab, "kvm-1", "auto", autostart=True)
    _define_guest(lab, "kvm-1", "manual", autostart=False)
    for name in ("auto", "manual"):
        assert _domstate(lab, "kvm-1", name) == "running"

    victims = power.host_processes(kvm1, lab.pids)
    comms = {_comm(p) for p, _ in victims}
    assert {"libvirtd", "virtlogd", "sshd"} <= comms, comms
    assert sum(1 for p, _ in victims if _comm(p).startswith("qemu-system")) == 2, comms
    assert any("mount.nfs" in _cmdline(p) for p, _ in victims)  # the FUSE NFS client
    bystanders = _daemons(lab, "storage") + _daemons(lab, "kvm-2")
    assert len(bystanders) >= 5

    crashed = _cli(lab, "crash", "kvm-1")
    assert crashed.returncode == 0, crashed.stderr
    assert "lost power" in crashed.stdout

    # Every process of kvm-1 has left the process table when `crash` returns, except the
    # daemons this test process started (the session's `lab up` ran in it): they are dead,
    # zombies that only their parent, this process, can reap (wait_gone does).
    ours = [(p, st) for p, st in victims if _ppid(p) == os.getpid()]
    assert [p for p, st in victims if (p, st) not in ours and not gone(p, st)] == []
    assert [p for p, st in ours if pid_alive(p, st)] == []
    assert wait_gone(ours, timeout=HANG_GUARD) == []
    assert power.host_processes(kvm1, lab.pids) == []
    # Unreachable over SSH and over libvirt's qemu+ssh.
    ssh = _ssh(lab, "kvm-1")
    assert ssh.returncode == 255, ssh
    assert _virsh_ssh(lab, "kvm-1", "list", "--name").returncode != 0
    # The fence agent and the lab say OFF.
    for res in (_cli(lab, "power", "kvm-1", "status"), _agent(lab, "kvm-1", "status")):
        assert (res.returncode, res.stdout.strip()) == (2, "Status: OFF"), res
    assert _power(_status_json(lab)) == {"storage": "on", "kvm-1": "off", "kvm-2": "on"}
    table = _cli(lab, "status")
    assert table.returncode == 0 and "kvm, off" in table.stdout, table
    with pytest.raises(LabError, match="powered off"):
        lab.run("kvm-1", ["hostname"])
    shell = _cli(lab, "shell", "kvm-1", "hostname")
    assert shell.returncode == 1 and "powered off" in shell.stderr, shell
    # Runtime state lost, persistent state kept.
    assert not kvm1.outside("/run/libvirt/libvirt-sock").exists()
    assert not kvm1.outside("/run/libvirt/qemu/auto.pid").exists()
    assert sorted(p.name for p in kvm1.outside("/run/libvirt").iterdir()) == []
    assert kvm1.outside("/etc/libvirt/qemu/auto.xml").is_file()
    assert kvm1.outside("/etc/libvirt/qemu/manual.xml").is_file()
    assert kvm1.outside("/etc/libvirt/qemu/autostart/auto.xml").is_symlink()
    assert not kvm1.outside("/etc/libvirt/qemu/autostart/manual.xml").exists()
    assert SOURCE in kvm1.outside("/etc/fstab").read_text()
    # The other hosts did not notice.
    assert [p for p, st in bystanders if not pid_alive(p, st)] == []
    assert _ssh(lab, "kvm-2").stdout.strip() == "kvm-2"
    assert "/srv/images" in lab.run("storage", ["exportfs", "-v"]).stdout
    assert lab.is_up()  # a host off on purpose is not a broken lab

    booted = _agent(lab, "kvm-1", "on")
    assert (booted.returncode, booted.stdout.strip()) == (0, "Success: Powered ON"), booted

    assert _ssh(lab, "kvm-1").stdout.strip() == "kvm-1"
    listed = _virsh_ssh(lab, "kvm-1", "list", "--all", "--name")
    assert listed.returncode == 0, listed.stderr
    assert sorted(listed.stdout.split()) == ["auto", "manual"]
    assert _nfs_mounted(lab, "kvm-1"), booted.stderr  # its fstab's NFS line, at boot
    wait_for(
        "autostarted domain running",
        lambda: _domstate(lab, "kvm-1", "auto") == "running",
        timeout=HANG_GUARD,
    )
    assert _domstate(lab, "kvm-1", "manual") == "shut off"
    res = _agent(lab, "kvm-1", "status")
    assert (res.returncode, res.stdout.strip()) == (0, "Status: ON"), res
    assert _power(_status_json(lab)) == {"storage": "on", "kvm-1": "on", "kvm-2": "on"}
    assert lab.is_up()


def test_fence_agent_off_and_on_are_idempotent(power_lab: Lab) -> None:
    lab = power_lab
    for _ in range(2):  # already off is success, as fence agents do
        off = _agent(lab, "kvm-2", "off")
        assert (off.returncode, off.stdout.strip()) == (0, "Success: Powered OFF"), off
    status = _agent(lab, "--plug=kvm-2", "--action=status")
    assert (status.returncode, status.stdout.strip()) == (2, "Status: OFF"), status
    assert _ssh(lab, "kvm-2").returncode == 255
    assert _ssh(lab, "kvm-1").stdout.strip() == "kvm-1"
    for _ in range(2):
        on = _cli(lab, "power", "kvm-2", "on")
        assert (on.returncode, on.stdout.strip()) == (0, "Success: Powered ON"), on
    status = _agent(lab, "-n", "kvm-2", "-o", "status")
    assert (status.returncode, status.stdout.strip()) == (0, "Status: ON"), status
    assert _ssh(lab, "kvm-2").stdout.strip() == "kvm-2"

    refused = _cli(lab, "crash", "storage")
    assert refused.returncode == 1 and "only KVM hosts" in refused.stderr, refused
    unknown = _agent(lab, "kvm-9", "status")
    assert unknown.returncode == 1 and "Failed:" in unknown.stderr, unknown
    assert lab.power_state("storage") == "on"


def test_isolate_cuts_the_network_and_keeps_every_process(power_lab: Lab) -> None:
    lab = power_lab
    alive = _daemons(lab, "kvm-1")
    assert len(alive) >= 3

    isolated = _cli(lab, "isolate", "kvm-1")
    assert isolated.returncode == 0, isolated.stderr
    assert _ssh(lab, "kvm-1").returncode == 255  # from the control machine
    peer = lab.run(
        "kvm-2",
        ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "kvm-1", "true"],
        check=False,
    )
    assert peer.returncode == 255, peer  # from another host
    res = _agent(lab, "kvm-1", "status")
    assert (res.returncode, res.stdout.strip()) == (0, "Status: ON"), res  # partitioned, not off
    assert _power(_status_json(lab))["kvm-1"] == "isolated"
    assert [p for p, st in alive if not pid_alive(p, st)] == []
    assert lab.run("kvm-1", ["hostname"]).stdout.strip() == "kvm-1"  # the console still works
    assert lab.run("kvm-1", ["virsh", "list", "--name"]).returncode == 0

    reconnected = _cli(lab, "reconnect", "kvm-1")
    assert reconnected.returncode == 0, reconnected.stderr
    assert _ssh(lab, "kvm-1").stdout.strip() == "kvm-1"
    assert _power(_status_json(lab))["kvm-1"] == "on"
    assert [p for p, st in alive if not pid_alive(p, st)] == []


def test_down_and_up_with_a_crashed_and_an_isolated_host(lab: Lab) -> None:
    lab.reset()
    lab.crash("kvm-1")
    lab.isolate("kvm-2")
    down = _cli(lab, "down")
    assert down.returncode == 0, down.stderr
    assert lab.leftovers() == []
    routes = subprocess.run(
        ["ip", "-o", "route", "show", "type", "unreachable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "10.77.0." not in routes
    up = _cli(lab, "up", "--kvm-hosts", str(lab.cfg.kvm_hosts))
    assert up.returncode == 0, up.stderr
    assert lab.is_up()
    assert set(_power(_status_json(lab)).values()) == {"on"}
    assert _ssh(lab, "kvm-1").stdout.strip() == "kvm-1"
    assert _ssh(lab, "kvm-2").stdout.strip() == "kvm-2"
    lab.reset()


def _daemons(lab: Lab, host: str) -> list[tuple[int, int | None]]:
    """The host's long-lived processes: its recorded daemons (and their reapers) and the
    daemons inside it (not short-lived commands or SSH sessions)."""
    daemons = {"libvirtd", "virtlogd", "ganesha.nfsd", "rpcbind"}
    recorded = {d.pid for d in lab.pids.load() if d.host == host}
    return [
        (p, st)
        for p, st in power.host_processes(lab.cfg.host(host), lab.pids)
        if p in recorded or _comm(p) in daemons
    ]


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
