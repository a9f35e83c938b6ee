"""The lab's fixed topology: names, addresses and paths.

Everything else in :mod:`kvmstate.lab` derives its paths from a :class:`LabConfig`, so one
place decides where a host's files live, both as seen from the controller (the root
namespaces) and from inside the host.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

DEFAULT_DIR = Path("/var/lib/kvmstate-lab")
NETWORK = ipaddress.IPv4Network("10.77.0.0/24")
CONTROLLER_ADDRESS = "10.77.0.1"
STORAGE_ADDRESS = "10.77.0.10"
FIRST_KVM_HOST = 11
BRIDGE = "kvmlab0"
NETNS_PREFIX = "kvmlab-"
BTRFS_LABEL = "kvmstate-lab"
BTRFS_SIZE = 4 * 1024**3
BTRFS_TOPLEVEL = "/srv/btrfs"
SERVER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

Role = Literal["storage", "kvm"]


@dataclass(frozen=True)
class HostConfig:
    """One lab host: a network + mount + UTS namespace with its own daemons."""

    name: str
    role: Role
    address: str
    lab_dir: Path

    @property
    def netns(self) -> str:
        return f"{NETNS_PREFIX}{self.name}"

    @property
    def netns_path(self) -> Path:
        return Path("/run/netns") / self.netns

    @property
    def veth(self) -> str:
        """The root-namespace end of this host's veth pair (at most 15 characters)."""
        return f"kvl-{self.name}"[:15]

    @property
    def root(self) -> Path:
        """This host's private files, as seen from the controller."""
        return self.lab_dir / "hosts" / self.name

    @property
    def mnt_ns(self) -> Path:
        return self.lab_dir / "ns" / f"{self.name}.mnt"

    @property
    def uts_ns(self) -> Path:
        return self.lab_dir / "ns" / f"{self.name}.uts"

    @property
    def etc_upper(self) -> Path:
        """The upper directory of the overlay mounted on the host's ``/etc`` (lower: ``/etc``)."""
        return self.root / "etc-upper"

    @property
    def etc_work(self) -> Path:
        return self.root / "etc-work"

    def outside(self, inside_path: str) -> Path:
        """Where a path that is private to this host lives, seen from the controller.

        Only valid for the directories that :mod:`kvmstate.lab.hosts` bind-mounts per host
        and for files under ``/etc`` that the host has written (the overlay's upper layer).
        """
        dirs = {**self.private_dirs(), "/etc": self.etc_upper}
        for inside, outside in dirs.items():
            if inside_path == inside or inside_path.startswith(inside + "/"):
                return outside / inside_path[len(inside) :].lstrip("/")
        raise ValueError(f"{inside_path} is not private to host {self.name}")

    def private_dirs(self) -> dict[str, Path]:
        """Directories bind-mounted from the controller over the host's view (inside -> outside)."""
        dirs = {
            "/run": self.root / "run",
            "/root": self.root / "home-root",
            "/var/lib/nfs": self.root / "var-lib-nfs",
        }
        if self.role == "kvm":
            dirs |= {
                "/var/lib/libvirt": self.root / "var-lib-libvirt",
                "/var/log/libvirt": self.root / "var-log-libvirt",
                "/var/cache/libvirt": self.lab_dir / "cache" / self.name / "libvirt",
            }
        else:
            dirs |= {
                "/srv": self.root / "srv",
                "/usr/local/sbin": self.root / "sbin",
                "/var/log/ganesha": self.root / "var-log-ganesha",
            }
        return dirs


@dataclass(frozen=True)
class LabConfig:
    """The whole lab: where it lives and how many KVM hosts it has."""

    dir: Path = DEFAULT_DIR
    kvm_hosts: int = 2
    hosts: tuple[HostConfig, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.kvm_hosts < 2:
            raise ValueError("the lab needs at least 2 KVM hosts (live migration needs two)")
        if FIRST_KVM_HOST + self.kvm_hosts > 250:
            raise ValueError("too many KVM hosts for 10.77.0.0/24")
        hosts = [HostConfig("storage", "storage", STORAGE_ADDRESS, self.dir)]
        for i in range(self.kvm_hosts):
            addr = str(NETWORK.network_address + FIRST_KVM_HOST + i)
            hosts.append(HostConfig(f"kvm-{i + 1}", "kvm", addr, self.dir))
        object.__setattr__(self, "hosts", tuple(hosts))

    @property
    def storage(self) -> HostConfig:
        return self.hosts[0]

    @property
    def kvm(self) -> tuple[HostConfig, ...]:
        return self.hosts[1:]

    def host(self, name: str) -> HostConfig:
        for h in self.hosts:
            if name in (h.name, h.address):
                return h
        names = ", ".join(h.name for h in self.hosts)
        raise KeyError(f"no lab host {name!r} (hosts: {names})")

    # Files in the lab directory -------------------------------------------------------
    @property
    def identity(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        return self.dir / "ssh_config"

    @property
    def spec(self) -> Path:
        return self.dir / "lab.yaml"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def pids_file(self) -> Path:
        return self.dir / "pids.json"

    @property
    def guest_dir(self) -> Path:
        return self.dir / "guest"

    @property
    def btrfs_image(self) -> Path:
        return self.dir / "storage.btrfs.img"

    @property
    def bin_dir(self) -> Path:
        return self.dir / "bin"

    @property
    def log_dir(self) -> Path:
        return self.dir / "log"

    def libvirt_socket(self, host: HostConfig) -> Path:
        return host.outside("/run/libvirt/libvirt-sock")

    def libvirt_uri(self, host: HostConfig) -> str:
        """A URI that reaches the host's libvirtd from the controller without SSH."""
        return f"qemu+unix:///system?socket={self.libvirt_socket(host)}"

    def ssh_uri(self, host: HostConfig) -> str:
        """The ``qemu+ssh://`` URI kvmstate uses, verifying the host key with the lab files."""
        return (
            f"qemu+ssh://root@{host.address}/system?keyfile={self.identity}"
            f"&command={self.bin_dir / 'ssh'}&no_tty=1"
        )

    # Persisted settings ---------------------------------------------------------------
    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = {"dir": str(self.dir), "kvm_hosts": self.kvm_hosts}
        self.state_file.write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path = DEFAULT_DIR) -> LabConfig:
        """The configuration of the lab last brought up in ``directory`` (or the default)."""
        state = directory / "state.json"
        try:
            data = json.loads(state.read_text())
        except (OSError, ValueError):
            return cls(dir=directory)
        return cls(dir=directory, kvm_hosts=int(data.get("kvm_hosts", 2)))
