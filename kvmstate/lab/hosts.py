"""Lab hosts' own files and daemons: private /etc, /run, /root; sshd; libvirtd + virtlogd."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

from kvmstate.lab.config import (
    BTRFS_LABEL,
    BTRFS_TOPLEVEL,
    DEFAULT_DIR,
    SERVER_PATH,
    HostConfig,
    LabConfig,
)
from kvmstate.lab.netns import host_argv
from kvmstate.lab.proc import (
    LabError,
    PidRegistry,
    run,
    spawn,
    tcp_port_ready,
    unix_socket_ready,
    wait_for,
)

log = logging.getLogger(__name__)

HOST_ENV = {"PATH": SERVER_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
_UUID_NS = uuid.UUID("5d0c8f52-4f0c-4c83-9d6b-6b1b3a2c7a11")

BASHRC = "# kvmstate lab host: a plain .bashrc (no pyenv init: every SSH command would pay it)\n"


def host_uuid(host: HostConfig) -> str:
    """A stable, distinct libvirt host UUID per lab host."""
    return str(uuid.uuid5(_UUID_NS, host.name))


def in_host(host: HostConfig, argv: Sequence[str], check: bool = True) -> str:
    """Run ``argv`` inside ``host`` and return its stdout."""
    return run(host_argv(host, argv), check=check, env=HOST_ENV).stdout


# Files ---------------------------------------------------------------------------------


def bare_fstab(host: HostConfig) -> str:
    """The fstab a freshly installed lab host has (the storage host mounts its btrfs)."""
    text = f"# /etc/fstab of kvmstate lab host {host.name}\n"
    text += "# <file system> <mount point> <type> <options> <dump> <pass>\n"
    if host.role == "storage":
        text += f"LABEL={BTRFS_LABEL} {BTRFS_TOPLEVEL} btrfs defaults 0 0\n"
    return text


def bare_exports() -> str:
    return "# /etc/exports of the kvmstate lab storage host: see exports(5)\n"


def write_host_files(cfg: LabConfig, host: HostConfig, pubkey: str) -> None:
    """Create the host's private directories and its /etc layer (before they are mounted)."""
    if host.root.exists():
        shutil.rmtree(host.root)
    for d in host.private_dirs().values():
        d.mkdir(parents=True, exist_ok=True)
    host.etc_upper.mkdir(parents=True)
    host.etc_work.mkdir(parents=True)
    make_run_dirs(host)

    etc = host.etc_upper
    (etc / "hostname").write_text(host.name + "\n")
    hosts_lines = ["127.0.0.1\tlocalhost", f"127.0.1.1\t{host.name}"]
    hosts_lines += [f"{h.address}\t{h.name}" for h in cfg.hosts]
    (etc / "hosts").write_text("\n".join(hosts_lines) + "\n")
    bare = host.root / "bare"
    bare.mkdir()
    (bare / "fstab").write_text(bare_fstab(host))
    shutil.copy2(bare / "fstab", etc / "fstab")
    if host.role == "storage":
        (bare / "exports").write_text(bare_exports())
        shutil.copy2(bare / "exports", etc / "exports")
        (etc / "exports.d").mkdir()

    home = host.outside("/root")
    home.chmod(0o700)
    (home / ".bashrc").write_text(BASHRC)
    (home / ".profile").write_text('[ -f "$HOME/.bashrc" ] && . "$HOME/.bashrc"\n')
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    (ssh_dir / "authorized_keys").write_text(pubkey)
    (ssh_dir / "authorized_keys").chmod(0o600)
    # The hosts can reach each other as the tutorial's KVM hosts do (passwordless root SSH).
    shutil.copy2(cfg.identity, ssh_dir / "id_ed25519")
    (ssh_dir / "id_ed25519").chmod(0o600)
    shutil.copy2(cfg.known_hosts, ssh_dir / "known_hosts")

    write_sshd_files(cfg, host)
    if host.role == "kvm":
        write_libvirt_files(host)
        seed_capability_cache(cfg, host)
    else:
        (etc / "ganesha").mkdir()


def make_run_dirs(host: HostConfig) -> None:
    """The directories a freshly booted host has in its (empty) ``/run``."""
    run_dir = host.outside("/run")
    run_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("sshd", "lock", "shm", "libvirt", "ganesha", "rpcbind", "mount"):
        (run_dir / sub).mkdir(exist_ok=True)
    (run_dir / "sshd").chmod(0o755)
    (run_dir / "lock").chmod(0o1777)
    (run_dir / "shm").chmod(0o1777)


def write_sshd_files(cfg: LabConfig, host: HostConfig) -> None:
    etc_ssh = host.outside("/etc/ssh")
    etc_ssh.mkdir()
    # Hide the machine's own host keys and sshd_config.d: whiteouts in the overlay.
    keys = cfg.dir / "keys" / host.name
    ours = {f.name for f in keys.iterdir()}
    for lower in Path("/etc/ssh").glob("ssh_host_*"):
        if lower.name not in ours:
            _whiteout(etc_ssh / lower.name)
    if Path("/etc/ssh/sshd_config.d").exists():
        _whiteout(etc_ssh / "sshd_config.d")
    for f in keys.iterdir():
        shutil.copy2(f, etc_ssh / f.name)
    (etc_ssh / "sshd_config").write_text(
        f"""# sshd of kvmstate lab host {host.name}
ListenAddress {host.address}
Port 22
HostKey /etc/ssh/ssh_host_ed25519_key
PidFile /run/sshd.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
AuthorizedKeysFile .ssh/authorized_keys
PrintMotd no
PrintLastLog no
MaxStartups 100:30:200
MaxSessions 100
AcceptEnv LANG LC_*
StreamLocalBindUnlink yes
AllowStreamLocalForwarding yes
AllowTcpForwarding yes
Subsystem sftp /usr/lib/openssh/sftp-server
"""
    )


def ensure_host_key(cfg: LabConfig, host: HostConfig) -> str:
    """The host's ed25519 key pair (kept across runs); returns the public key line."""
    keys = cfg.dir / "keys" / host.name
    keys.mkdir(parents=True, exist_ok=True)
    key = keys / "ssh_host_ed25519_key"
    if not key.exists():
        run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                f"root@{host.name}",
                "-f",
                str(key),
            ]
        )
    return (keys / "ssh_host_ed25519_key.pub").read_text().split(" ", 2)[1]


def _whiteout(path: Path) -> None:
    """An overlayfs whiteout: hides the lower layer's file of that name."""
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def seed_capability_cache(cfg: LabConfig, host: HostConfig) -> None:
    """Reuse QEMU capabilities another lab host already probed (libvirt re-validates them)."""
    mine = host.outside("/var/cache/libvirt") / "qemu" / "capabilities"
    if mine.exists() and any(mine.iterdir()):
        return
    for other in (DEFAULT_DIR / "cache", cfg.dir / "cache"):
        for src in sorted(other.glob("kvm-*/libvirt/qemu/capabilities")):
            if src != mine and any(src.iterdir()):
                shutil.copytree(src, mine, dirs_exist_ok=True)
                return


def write_libvirt_files(host: HostConfig) -> None:
    etc = host.outside("/etc/libvirt")
    networks = etc / "qemu" / "networks"
    (networks / "autostart").mkdir(parents=True)
    # No stock `default` network: the lab's networks are the ones a spec defines (kvmstate's
    # `networks:`; libvirtd runs their dnsmasq inside this host's namespaces, with the
    # host's own /var/lib/libvirt/dnsmasq and /run), so a spec's `default` starts from none.
    for lower in Path("/etc/libvirt/qemu/networks").rglob("*.xml"):
        rel = lower.relative_to("/etc/libvirt/qemu/networks")
        _whiteout(networks / rel)
    (etc / "libvirtd.conf").write_text(
        f"""# libvirtd of kvmstate lab host {host.name}
host_uuid = "{host_uuid(host)}"
unix_sock_group = "root"
unix_sock_ro_perms = "0777"
unix_sock_rw_perms = "0770"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""
    )
    (etc / "qemu.conf").write_text(
        f"""# QEMU driver of kvmstate lab host {host.name}
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
migration_address = "{host.address}"
migration_host = "{host.address}"
stdio_handler = "logd"
"""
    )
    var_lib = host.outside("/var/lib/libvirt")
    for sub in ("images", "qemu", "boot", "dnsmasq", "network", "swtpm"):
        (var_lib / sub).mkdir(parents=True, exist_ok=True)
    (host.outside("/var/log/libvirt") / "qemu").mkdir(parents=True, exist_ok=True)


# Mounts ---------------------------------------------------------------------------------


def mount_host_view(cfg: LabConfig, host: HostConfig) -> None:
    """Inside the host's mount namespace: fresh /sys, /etc overlay, private bind mounts."""
    in_host(host, ["mount", "-t", "sysfs", "sysfs", "/sys"])
    overlay = f"lowerdir=/etc,upperdir={host.etc_upper},workdir={host.etc_work}"
    in_host(host, ["mount", "-t", "overlay", "overlay", "-o", overlay, "/etc"])
    binds = host.private_dirs()
    for inside in sorted(binds, key=lambda p: p.count("/")):
        if not Path(inside).is_dir():
            raise LabError(f"{host.name}: {inside} does not exist (run `kvmstate lab install`)")
        in_host(host, ["mount", "--bind", str(binds[inside]), inside])
    if host.role == "kvm":
        for name in ("mount.nfs", "mount.nfs4"):
            target = f"/usr/sbin/{name}"
            if not Path(target).exists():
                raise LabError(f"{target} is missing: install nfs-common (`kvmstate lab install`)")
            in_host(host, ["mount", "--bind", str(cfg.bin_dir / name), target])


def restore_bare_files(host: HostConfig) -> None:
    """Put the host's fstab (and exports) back to their bare content, from inside the host."""
    bare = host.root / "bare"
    for name in ("fstab", "exports"):
        if (bare / name).exists():
            in_host(host, ["cp", str(bare / name), f"/etc/{name}"])


# Daemons --------------------------------------------------------------------------------


def reaped(argv: Sequence[str]) -> list[str]:
    """``argv`` under :mod:`kvmstate.lab.reaper` (for daemons whose children detach)."""
    return [sys.executable, "-m", "kvmstate.lab.reaper", "--", *argv]


def start_sshd(cfg: LabConfig, host: HostConfig, pids: PidRegistry) -> subprocess.Popen[bytes]:
    proc = spawn(
        pids,
        "sshd",
        host.name,
        reaped(host_argv(host, ["/usr/sbin/sshd", "-D", "-e", "-f", "/etc/ssh/sshd_config"])),
        cfg.log_dir / f"{host.name}-sshd.log",
        env=HOST_ENV,
    )
    return proc


def wait_sshd(cfg: LabConfig, host: HostConfig, proc: subprocess.Popen[bytes]) -> None:
    wait_for(
        f"sshd on {host.name}",
        tcp_port_ready(host.netns_path, host.address, 22),
        alive=lambda: proc.poll() is None,
    )


def start_libvirt(cfg: LabConfig, host: HostConfig, pids: PidRegistry) -> subprocess.Popen[bytes]:
    logd = spawn(
        pids,
        "virtlogd",
        host.name,
        host_argv(host, ["/usr/sbin/virtlogd"]),
        cfg.log_dir / f"{host.name}-virtlogd.log",
        env=HOST_ENV,
    )
    wait_for(
        f"virtlogd on {host.name}",
        unix_socket_ready(host.outside("/run/libvirt/virtlogd-sock")),
        alive=lambda: logd.poll() is None,
    )
    return spawn(
        pids,
        "libvirtd",
        host.name,
        reaped(host_argv(host, ["/usr/sbin/libvirtd", "-f", "/etc/libvirt/libvirtd.conf"])),
        cfg.log_dir / f"{host.name}-libvirtd.log",
        env=HOST_ENV,
    )


def wait_libvirt(cfg: LabConfig, host: HostConfig, proc: subprocess.Popen[bytes]) -> None:
    wait_for(
        f"libvirtd on {host.name}",
        unix_socket_ready(cfg.libvirt_socket(host)),
        alive=lambda: proc.poll() is None,
        timeout=30,
    )


def probe_qemu(cfg: LabConfig, host: HostConfig) -> None:
    """Ask for QEMU's capabilities once, so the first define/migration is not 4 s slower."""
    from kvmstate.lab import virt

    with virt.connect(cfg.libvirt_uri(host)) as conn:
        conn.getDomainCapabilities(None, None, None, "qemu", 0)
        conn.getCapabilities()  # probes every installed QEMU binary
