"""The real lab: SSH, libvirt, btrfs, NFS-Ganesha, the FUSE NFS client, live migration."""

from __future__ import annotations

import contextlib
import io
import os
import signal
from pathlib import Path

import pytest
from rich.console import Console

from kvmstate.lab.lab import Lab
from kvmstate.lab.netns import netns_pids
from kvmstate.lab.proc import pid_alive, wait_for

pytestmark = pytest.mark.lab

IMAGES = "/var/lib/libvirt/images"


def _export(lab: Lab, line: str) -> None:
    """The seed's storage steps by hand: subvolume, its mount, /etc/exports, exportfs -ra."""
    lab.run("storage", ["btrfs", "subvolume", "create", "/srv/btrfs/images"])
    lab.run("storage", ["mkdir", "-p", "/srv/images"])
    lab.run("storage", ["mount", "-o", "subvol=images", "LABEL=kvmstate-lab", "/srv/images"])
    lab.run("storage", ["tee", "-a", "/etc/exports"], input=line + "\n")
    lab.run("storage", ["exportfs", "-ra"])


def _mounts(lab: Lab, host: str) -> list[list[str]]:
    return [m.split() for m in lab.run(host, ["cat", "/proc/self/mounts"]).stdout.splitlines()]


def test_selftest(bare_lab: Lab) -> None:
    from kvmstate.lab.selftest import selftest

    out = io.StringIO()
    result = selftest(bare_lab, console=Console(file=out, width=200))
    assert result.ok, out.getvalue()
    m = result.migration
    assert m["counter_after"] > m["counter_before"], m
    assert m["downtime_ms"] is not None and m["downtime_ms"] < 5000, m


def test_bare_state(bare_lab: Lab) -> None:
    lab = bare_lab
    assert lab.run("storage", ["btrfs", "subvolume", "list", "/srv/btrfs"]).stdout == ""
    assert lab.run("storage", ["exportfs", "-v"]).stdout == ""
    assert "LABEL=kvmstate-lab /srv/btrfs btrfs" in lab.run("storage", ["cat", "/etc/fstab"]).stdout
    assert lab.run("storage", ["blkid", "-L", "kvmstate-lab"]).stdout.startswith("/dev/loop")
    for h in ("kvm-1", "kvm-2"):
        assert not [m for m in _mounts(lab, h) if m[1] == IMAGES]
        assert lab.run(h, ["virsh", "list", "--all", "--name"]).stdout.strip() == ""
        assert lab.run(h, ["virsh", "pool-list", "--all", "--name"]).stdout.strip() == ""
        assert lab.run(h, ["hostname"]).stdout.strip() == h


def test_exportfs_live_table_is_distinct_from_etc_exports(bare_lab: Lab) -> None:
    lab = bare_lab
    _export(lab, "/srv/images 10.77.0.0/24(rw,sync,no_root_squash,no_subtree_check)")
    assert lab.run("storage", ["exportfs", "-v"]).stdout == (
        "/srv/images   \t10.77.0.0/24(sync,wdelay,hide,no_subtree_check,sec=sys,rw,secure,"
        "no_root_squash,no_all_squash)\n"
    )
    lab.run("storage", ["exportfs", "-u", "10.77.0.0/24:/srv/images"])
    assert lab.run("storage", ["exportfs", "-v"]).stdout == ""
    assert "/srv/images" in lab.run("storage", ["cat", "/etc/exports"]).stdout
    shown = lab.run("kvm-1", ["showmount", "--no-headers", "-e", "10.77.0.10"]).stdout
    assert "/srv/images" not in shown
    lab.run("storage", ["exportfs", "-a"])
    assert "/srv/images" in lab.run("kvm-1", ["showmount", "-e", "10.77.0.10"]).stdout


def test_client_outside_the_allowed_network_is_refused(bare_lab: Lab) -> None:
    lab = bare_lab
    _export(lab, "/srv/images 10.77.0.11(rw,no_root_squash)")
    url = "nfs://10.77.0.10/srv/images"
    assert lab.run("kvm-1", ["nfs-ls", url], check=False).returncode == 0
    refused = lab.run("kvm-2", ["nfs-ls", url], check=False)
    assert refused.returncode != 0
    assert "MNT3ERR_ACCES" in refused.stderr + refused.stdout
    mount = lab.run(
        "kvm-2",
        ["mount", "-t", "nfs", "-o", "vers=3,nolock", "10.77.0.10:/srv/images", IMAGES],
        check=False,
    )
    assert mount.returncode == 32, mount
    assert "MNT3ERR_ACCES" in mount.stderr


def test_mount_nfs_stand_in_via_fstab_and_refuses_v4(bare_lab: Lab) -> None:
    lab = bare_lab
    _export(lab, "/srv/images 10.77.0.0/24(rw,sync,no_root_squash,no_subtree_check)")
    line = f"10.77.0.10:/srv/images {IMAGES} nfs vers=3,nolock,_netdev 0 0\n"
    lab.run("kvm-1", ["tee", "-a", "/etc/fstab"], input=line)
    lab.run("kvm-1", ["mount", IMAGES])
    mounted = [m for m in _mounts(lab, "kvm-1") if m[1] == IMAGES]
    assert mounted and mounted[0][0] == "10.77.0.10:/srv/images"
    assert mounted[0][2] == "fuse.glusterfs"  # libvirt: shared storage
    lab.run("kvm-1", ["qemu-img", "create", "-q", "-f", "qcow2", f"{IMAGES}/t.qcow2", "16M"])
    assert "t.qcow2" in lab.run("storage", ["ls", "/srv/images"]).stdout
    lab.run("kvm-1", ["umount", IMAGES])
    assert not [m for m in _mounts(lab, "kvm-1") if m[1] == IMAGES]

    v4 = lab.run(
        "kvm-2",
        ["mount", "-t", "nfs", "-o", "vers=4", "10.77.0.10:/srv/images", IMAGES],
        check=False,
    )
    assert v4.returncode == 32 and "NFSv3 only" in v4.stderr
    v4 = lab.run("kvm-2", ["mount", "-t", "nfs4", "10.77.0.10:/srv/images", IMAGES], check=False)
    assert v4.returncode == 32 and "NFSv3 only" in v4.stderr


def test_ssh_with_lab_config_and_libvirt_over_ssh(lab: Lab) -> None:
    import subprocess

    cfg = lab.cfg
    out = subprocess.run(
        ["ssh", "-F", str(cfg.ssh_config), "kvm-2", "hostname; virsh -c qemu:///system uri"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    assert out == ["kvm-2", "qemu:///system"]
    uri = f"qemu+ssh://root@10.77.0.11/system?keyfile={cfg.identity}&command={cfg.bin_dir}/ssh"
    virsh = subprocess.run(
        ["virsh", "-c", uri, "hostname"], capture_output=True, text=True, check=True, timeout=30
    )
    assert virsh.stdout.strip() == "kvm-1"


def test_up_recovers_from_a_crash_and_down_leaves_nothing(lab: Lab) -> None:
    # A crashed run: daemons killed hard, an NFS mount and the btrfs left behind.
    lab.reset()
    _export(lab, "/srv/images 10.77.0.0/24(rw,no_root_squash)")
    lab.run("kvm-1", ["mount", "-t", "nfs", "-o", "vers=3", "10.77.0.10:/srv/images", IMAGES])
    # (the registry also lists daemons that died earlier: a fault test restarts them)
    victims = [
        d.pid
        for d in lab.pids.load()
        if d.name in ("ganesha", "libvirtd") and pid_alive(d.pid, d.started)
    ]
    for host in ("storage", "kvm-1"):  # the daemons themselves, not only their reapers
        for pid in netns_pids(lab.cfg.host(host).netns):
            if Path(f"/proc/{pid}/comm").read_text().strip() in ("ganesha.nfsd", "libvirtd"):
                victims.append(pid)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):  # a reaper exits with its daemon
            os.kill(pid, signal.SIGKILL)
    wait_for("killed daemons", lambda: not any(pid_alive(p) for p in victims), timeout=10)
    assert not lab.is_up()
    crashed = Lab(lab.dir)  # as a new process would see it
    crashed.up()
    assert crashed.is_up()
    assert crashed.run("kvm-1", ["virsh", "list", "--name"]).returncode == 0
    assert crashed.run("storage", ["exportfs", "-v"]).stdout == ""

    daemons = crashed.pids.load()
    crashed.down()
    assert crashed.leftovers() == []
    assert [d for d in daemons if pid_alive(d.pid, d.started)] == []
    # Leave the session's lab up for the tests that follow (and `reset` of a downed lab ups it).
    lab.reset()
    assert lab.is_up()


def test_cli_down_returns_only_when_no_lab_process_is_left(lab: Lab) -> None:
    """Issue 14: `kvmstate lab up; kvmstate lab down`, each a new process as a script runs
    them; at the moment `down` returns, not one process the lab started is in the process
    table, not even as a zombie waiting for init to reap it (`ps` would list it)."""
    import subprocess
    import sys

    from kvmstate.lab.proc import gone, start_time

    def lab_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kvmstate.lab.cli", "--dir", str(lab.dir), *args],
            capture_output=True,
            text=True,
            timeout=300,
        )

    up = lab_cli("up")
    assert up.returncode == 0, up.stderr
    started = [(d.pid, d.started) for d in lab.pids.load()]
    names = {h.netns for h in lab.cfg.hosts}
    started += [(p, start_time(p)) for n in sorted(names) for p in netns_pids(n)]
    assert len(started) >= 9  # sshd x3, libvirtd + virtlogd x2, ganesha, rpcbind, reapers
    down = lab_cli("down")
    left = [pid for pid, st in started if not gone(pid, st)]
    assert down.returncode == 0, down.stderr
    assert left == [], [Path(f"/proc/{p}/stat").read_text() for p in left]
    assert "no lab process is left" in down.stdout
    lab.reset()  # the session's lab, up again
    assert lab.is_up()


def test_kvm_hosts_and_dir_variant(lab: Lab, tmp_path: Path) -> None:
    """`lab up --kvm-hosts 3 --dir DIR`: its own spec and connection files; one lab at a time."""
    import json
    import subprocess
    import sys

    from kvmstate.lab.proc import LabError

    other = Lab(tmp_path / "lab3", kvm_hosts=3)
    with pytest.raises(LabError, match="another lab is up"):
        other.up()
    with pytest.raises(LabError, match="nothing stopped"):
        other.down()  # would tear the session's lab down: the network is shared
    assert lab.is_up()
    lab.down()
    try:
        other.up()
        status = json.loads(
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "kvmstate.lab.cli",
                    "--dir",
                    str(other.dir),
                    "status",
                    "--json",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert status["up"] is True
        assert [h["name"] for h in status["hosts"]] == ["storage", "kvm-1", "kvm-2", "kvm-3"]
        spec = (other.dir / "lab.yaml").read_text()
        assert (
            f"identity: {other.dir}/id_ed25519" in spec and "kvm-3: {address: 10.77.0.13}" in spec
        )
        ssh = subprocess.run(
            ["ssh", "-F", str(other.dir / "ssh_config"), "kvm-3", "hostname"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        assert ssh.stdout.strip() == "kvm-3"
    finally:
        other.down()
    assert other.leftovers() == []
    lab.reset()  # the session's lab, up again
