"""``Lab``: bring the multi-host lab up and down, run commands in its hosts, reset it to bare."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from kvmstate.lab import guest, hosts, netns, nfsserver, power, specgen, storage
from kvmstate.lab.config import BRIDGE, BTRFS_LABEL, DEFAULT_DIR, HostConfig, LabConfig
from kvmstate.lab.proc import (
    CommandError,
    LabError,
    PidRegistry,
    kill_pids,
    pid_alive,
    run,
    start_time,
    wait_gone,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

REQUIRED_COMMANDS = {
    "ip": "iproute2",
    "nsenter": "util-linux",
    "unshare": "util-linux",
    "losetup": "util-linux",
    "mkfs.btrfs": "btrfs-progs",
    "btrfs": "btrfs-progs",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "libvirtd": "libvirt-daemon-system",
    "virtlogd": "libvirt-daemon-system",
    "virsh": "libvirt-clients",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "ganesha.nfsd": "nfs-ganesha",
    "rpcbind": "rpcbind",
    "showmount": "nfs-common",
    "nfs-ls": "libnfs-utils",
    "busybox": "busybox-static",
    "cpio": "cpio",
    "ss": "iproute2",
}
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The network (bridge, namespace names, 10.77.0.0/24) is fixed: one lab at a time.
ACTIVE_MARKER = Path("/run/kvmstate-lab.active")


def _parallel(fn: Callable[[HostConfig], T], items: Sequence[HostConfig]) -> list[T]:
    with ThreadPoolExecutor(max_workers=max(1, len(items))) as pool:
        return list(pool.map(fn, items))


class Lab:
    """A lab in ``directory``: one storage host and N KVM hosts on 10.77.0.0/24."""

    def __init__(self, directory: Path | str = DEFAULT_DIR, kvm_hosts: int | None = None) -> None:
        directory = Path(directory)
        saved = LabConfig.load(directory)
        self.cfg = LabConfig(directory, kvm_hosts if kvm_hosts is not None else saved.kvm_hosts)
        self.pids = PidRegistry(self.cfg.pids_file)
        # what the last ``down`` had to SIGKILL ("NAME (pid N)"), for the user to see
        self.forced: list[str] = []

    @property
    def dir(self) -> Path:
        return self.cfg.dir

    # Checks -------------------------------------------------------------------------
    def preflight(self) -> None:
        """Fail with a clear message naming what is missing."""
        if os.geteuid() != 0:
            raise LabError("the lab needs root (namespaces, mounts, loop devices): run it as root")
        missing = sorted({pkg for cmd, pkg in REQUIRED_COMMANDS.items() if not _which(cmd)})
        if missing:
            raise LabError(
                f"packages not installed: {', '.join(missing)} (run `kvmstate lab install`)"
            )
        filesystems = Path("/proc/filesystems").read_text()
        for fs, what in (("btrfs", "btrfs"), ("fuse", "FUSE"), ("overlay", "overlayfs")):
            if f"\t{fs}\n" not in filesystems:
                run(["modprobe", fs], check=False)
                if f"\t{fs}\n" not in Path("/proc/filesystems").read_text():
                    raise LabError(
                        f"the kernel has no {what} support ({fs} not in /proc/filesystems)"
                    )
        if not Path("/dev/fuse").exists():
            raise LabError("no FUSE: /dev/fuse is missing")
        if not Path("/proc/self/ns/net").exists():
            raise LabError("the kernel has no network namespaces")
        if not Path("/dev/loop-control").exists():
            raise LabError("no loop devices: /dev/loop-control is missing")
        if not _loadable("libnfs.so.13"):
            raise LabError("libnfs13 is not installed (run `kvmstate lab install`)")
        if importlib.util.find_spec("mfusepy") is None:
            raise LabError("the Python package mfusepy is missing: pip install 'kvmstate[lab]'")
        if importlib.util.find_spec("libvirt") is None:
            raise LabError("the Python package libvirt-python is missing: pip install kvmstate")

    # Up -----------------------------------------------------------------------------------
    def up(self) -> float:
        """Bring the lab up from any state (a crashed run is torn down first). Returns seconds."""
        t0 = time.monotonic()
        self.preflight()
        other = _read(ACTIVE_MARKER)
        if other and Path(other) != self.cfg.dir and Lab(other).is_up():
            raise LabError(
                f"another lab is up in {other}: run `kvmstate lab --dir {other} down` first"
            )
        self.down()
        cfg = self.cfg
        guest.install(cfg.guest_dir)
        for d in (cfg.dir, cfg.bin_dir, cfg.log_dir, cfg.dir / "hosts"):
            d.mkdir(parents=True, exist_ok=True)
        cfg.save()
        ACTIVE_MARKER.write_text(f"{cfg.dir}\n")
        self._write_client_files()
        try:
            self._bring_up()
        except BaseException:
            log.error("lab up failed; tearing down what was started (logs in %s)", cfg.log_dir)
            with contextlib.suppress(Exception):
                self.down()
            raise
        self._write_state(up=True)
        elapsed = time.monotonic() - t0
        log.info("lab up in %.1f s", elapsed)
        return elapsed

    def _write_client_files(self) -> None:
        cfg = self.cfg
        if not cfg.identity.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kvmstate-lab",
                 "-f", str(cfg.identity)])  # fmt: skip
        keys = {h.name: hosts.ensure_host_key(cfg, h) for h in cfg.hosts}
        cfg.known_hosts.write_text(specgen.render_known_hosts(cfg, keys))
        cfg.ssh_config.write_text(specgen.render_ssh_config(cfg))
        cfg.spec.write_text(specgen.render_spec(cfg))
        (cfg.dir / "lab-migrated.yaml").write_text(specgen.render_spec(cfg, cfg.kvm[1].name))
        python = sys.executable
        scripts = {
            "mount.nfs": specgen.render_python_entry(python, "kvmstate.lab.nfsfuse", "mount_main"),
            "mount.nfs4": specgen.render_python_entry(python, "kvmstate.lab.nfsfuse", "mount_main"),
            "exportfs": specgen.render_python_entry(python, "kvmstate.lab.exportfs", "main"),
            "ssh": specgen.render_ssh_wrapper(cfg),
            "fence-agent": power.render_fence_agent(python, cfg.dir),
        }
        for name, text in scripts.items():
            path = cfg.bin_dir / name
            path.write_text(text)
            path.chmod(0o755)

    def _bring_up(self) -> None:
        cfg = self.cfg
        pubkey = Path(f"{cfg.identity}.pub").read_text()
        netns.create_bridge()
        netns.prepare_ns_dir(cfg)
        for h in cfg.hosts:
            netns.create_host_network(h)
            netns.create_host_namespaces(h)
            hosts.write_host_files(cfg, h, pubkey)
        st = cfg.storage
        nfsserver.write_files(cfg, st)
        for h in cfg.hosts:
            hosts.mount_host_view(cfg, h)
        device = storage.create_filesystem(cfg)
        storage.mount_toplevel(st, device)

        sshd = {h.name: hosts.start_sshd(cfg, h, self.pids) for h in cfg.hosts}
        libvirtd = {h.name: hosts.start_libvirt(cfg, h, self.pids) for h in cfg.kvm}
        ganesha = nfsserver.start(cfg, st, self.pids)

        for h in cfg.kvm:
            hosts.wait_libvirt(cfg, h, libvirtd[h.name])
        # QEMU's capability probe (~4 s per host, cached across runs) while the rest settles.
        with ThreadPoolExecutor(max_workers=len(cfg.kvm)) as pool:
            probes = [pool.submit(hosts.probe_qemu, cfg, h) for h in cfg.kvm]
            for h in cfg.hosts:
                hosts.wait_sshd(cfg, h, sshd[h.name])
            nfsserver.wait_ready(st, ganesha)
            for p in probes:
                p.result()

    # Down ---------------------------------------------------------------------------------
    def down(self) -> float:
        """Stop everything the lab started; idempotent, works after a crash. Returns seconds.

        The network (bridge, namespace names) is shared by every lab directory: when another
        directory's lab is up, this refuses and touches nothing (it would tear that lab down)."""
        t0 = time.monotonic()
        cfg = self.cfg
        other = _read(ACTIVE_MARKER)
        if other and Path(other) != cfg.dir and Lab(other).is_up():
            raise LabError(
                f"the lab in {other} is up, not the one in {cfg.dir}: nothing stopped "
                f"(`kvmstate lab --dir {other} down` stops it)"
            )
        # Crashed hosts have no processes and no mount namespace; isolated ones get their
        # link back first (an isolated storage host would stall the unmounts below).
        for h in cfg.hosts:
            if h.netns_path.exists():
                with contextlib.suppress(Exception):
                    power.link_up(h)
        power.clear_unreachable_routes()
        live_hosts = [h for h in cfg.hosts if h.netns_path.exists() and h.mnt_ns.exists()]
        kvm_live = [h for h in live_hosts if h.role == "kvm"]
        # 1. Domains (QEMU processes) before anything they use.
        for h in kvm_live:
            with contextlib.suppress(Exception):
                self._clear_libvirt(h, pools=False)
        # 2. FUSE NFS clients before the NFS server.
        for h in kvm_live:
            with contextlib.suppress(Exception):
                self._unmount_nfs(h)
        # 3. Daemons we recorded, by PID (libvirtd, sshd, ganesha, rpcbind...), and
        # 4. whatever else runs inside the lab's namespaces (qemu, FUSE clients, ssh sessions).
        # Each group is signalled in turn; then ONE wait until every process of the lab has
        # left the process table (exited and reaped), so that nothing of the lab is listed
        # once this returns.
        daemons = self.pids.load()
        names = {d.pid: f"{d.name} on {d.host}" for d in daemons}
        namespaces = {h.netns for h in cfg.hosts} | set(netns.lab_netns_names())
        inside = [(pid, start_time(pid)) for n in sorted(namespaces) for pid in netns.netns_pids(n)]
        everything = [(d.pid, d.started) for d in daemons] + inside
        order = ["libvirtd", "virtlogd", "sshd", "ganesha", "rpcbind"]
        groups = [[d for d in daemons if d.name == name] for name in order]
        groups.append([d for d in daemons if d.name not in order])
        forced: list[str] = []
        for group in groups:
            forced += kill_pids([(d.pid, d.started) for d in group], reap_timeout=0, names=names)
        leftovers: list[tuple[int, int | None]] = [
            (pid, None) for n in sorted(namespaces) for pid in netns.netns_pids(n)
        ]
        if leftovers:
            log.info("stopping %d leftover processes in the lab's namespaces", len(leftovers))
            forced += kill_pids(leftovers, reap_timeout=0)
        wait_gone(everything + leftovers, names=names)
        self.forced = forced
        # 5. Mounts inside the storage host (subvolume, top level), then the namespaces.
        st = cfg.storage
        if st.netns_path.exists() and st.mnt_ns.exists():
            with contextlib.suppress(Exception):
                for _src, mp, _fs in reversed(storage.host_mounts(st)):
                    if mp.startswith("/srv/"):
                        hosts.in_host(st, ["umount", "-l", mp], check=False)
        for h in cfg.hosts:
            netns.destroy_host(h)
        for name in netns.lab_netns_names():  # other labs' sizes, crashed runs
            run(["ip", "netns", "del", name], check=False)
        for link in _lab_links():
            run(["ip", "link", "del", link], check=False)
        storage.detach(cfg)
        netns.destroy_network(cfg)
        self.pids.clear()
        if _read(ACTIVE_MARKER) == str(cfg.dir):
            ACTIVE_MARKER.unlink()
        if cfg.dir.exists():
            self._write_state(up=False)
        elapsed = time.monotonic() - t0
        log.info("lab down in %.1f s", elapsed)
        return elapsed

    # Status -------------------------------------------------------------------------------
    def is_up(self) -> bool:
        if not Path(f"/sys/class/net/{BRIDGE}").exists():
            return False
        if not all(h.netns_path.exists() for h in self.cfg.hosts):
            return False
        latest = {(d.name, d.host): d for d in self.pids.load()}  # a restart supersedes
        off = {h.name for h in self.cfg.hosts if power.power_state(self.cfg, h) == power.OFF}
        latest = {k: d for k, d in latest.items() if d.host not in off}  # crashed on purpose
        return bool(latest) and all(pid_alive(d.pid, d.started) for d in latest.values())

    def status(self) -> dict[str, Any]:
        cfg = self.cfg
        daemons = list({(d.name, d.host): d for d in self.pids.load()}.values())
        return {
            "dir": str(cfg.dir),
            "up": self.is_up(),
            "hosts": [
                {
                    "name": h.name,
                    "role": h.role,
                    "address": h.address,
                    "netns": h.netns,
                    "power": power.power_state(cfg, h),
                    "libvirt_uri": cfg.ssh_uri(h) if h.role == "kvm" else None,
                    "libvirt_socket": str(cfg.libvirt_socket(h)) if h.role == "kvm" else None,
                    "daemons": [
                        {"name": d.name, "pid": d.pid, "alive": pid_alive(d.pid, d.started)}
                        for d in daemons
                        if d.host == h.name
                    ],
                }
                for h in cfg.hosts
            ],
            "spec": str(cfg.spec),
            "identity": str(cfg.identity),
            "known_hosts": str(cfg.known_hosts),
            "ssh_config": str(cfg.ssh_config),
            "btrfs_device": f"LABEL={BTRFS_LABEL}",
            "loop_device": _read(cfg.dir / "loopdev"),
        }

    def leftovers(self) -> list[str]:
        """Anything of the lab still present (empty after a clean ``down``)."""
        cfg = self.cfg
        found: list[str] = []
        found += [f"network namespace {n}" for n in netns.lab_netns_names()]
        if Path(f"/sys/class/net/{BRIDGE}").exists():
            found.append(f"bridge {BRIDGE}")
        found += [f"veth {link}" for link in _lab_links()]
        found += [f"loop device {dev}" for dev in storage.loop_devices(cfg.btrfs_image)]
        found += [f"mount {mp}" for mp in netns.mounts_under(cfg.dir)]
        found += [
            f"daemon {d.name} pid {d.pid}" for d in self.pids.load() if pid_alive(d.pid, d.started)
        ]
        found += [f"process {pid}: {cmd}" for pid, cmd in _processes_mentioning(str(cfg.dir))]
        return found

    def _write_state(self, up: bool) -> None:
        data = {
            "dir": str(self.cfg.dir),
            "kvm_hosts": self.cfg.kvm_hosts,
            "up": up,
            "power": {h.name: power.ON if up else power.OFF for h in self.cfg.hosts},
        }
        self.cfg.state_file.write_text(json.dumps(data, indent=2) + "\n")

    # Commands in hosts --------------------------------------------------------------------
    def host(self, name: str) -> HostConfig:
        try:
            return self.cfg.host(name)
        except KeyError as exc:
            raise LabError(str(exc.args[0])) from None

    def run(
        self,
        host: str,
        argv: Sequence[str],
        check: bool = True,
        input: str | None = None,
        timeout: float | None = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``host`` (its network, mount and UTS namespaces), as root."""
        h = self.host(host)
        if not h.netns_path.exists():
            raise LabError(f"lab host {h.name} is not up (run `kvmstate lab up`)")
        self.require_on(h.name)
        return run(
            netns.host_argv(h, argv, wd="/root"),
            check=check,
            input=input,
            env=hosts.HOST_ENV,
            timeout=timeout,
        )

    # Power --------------------------------------------------------------------------------
    def power_state(self, name: str) -> str:
        """``on``, ``off`` (crashed, or the lab is down) or ``isolated`` (on, unreachable)."""
        return power.power_state(self.cfg, self.host(name))

    def require_on(self, name: str) -> None:
        if self.power_state(name) == power.OFF and self.host(name).netns_path.exists():
            raise LabError(f"lab host {name} is powered off (`kvmstate lab boot {name}`)")

    def crash(self, name: str) -> int:
        """Power loss of KVM host ``name`` (see :mod:`kvmstate.lab.power`); idempotent.
        Returns how many processes were killed."""
        return power.crash(self.cfg, self.host(name), self.pids)

    def boot(self, name: str) -> list[str]:
        """Boot a crashed KVM host with its old libvirt state; returns the boot's warnings."""
        return power.boot(self.cfg, self.host(name), self.pids)

    def isolate(self, name: str) -> None:
        """Cut ``name`` off the network, its processes alive (a partition)."""
        power.isolate(self.cfg, self.host(name))

    def reconnect(self, name: str) -> None:
        power.reconnect(self.cfg, self.host(name))

    # Reset --------------------------------------------------------------------------------
    def reset(self) -> float:
        """Back to BARE: daemons running; no domain, pool, NFS mount, export or subvolume.

        A lab that is not (fully) up is brought up, which also leaves it bare.
        """
        t0 = time.monotonic()
        cfg = self.cfg
        if not self.is_up():
            log.warning("the lab in %s is not up: bringing it up", cfg.dir)
            self.up()
            return time.monotonic() - t0
        for h in cfg.hosts:  # every host on and connected
            state = power.power_state(cfg, h)
            if state == power.OFF:
                self.boot(h.name)
            elif state == power.ISOLATED or not power.link_is_up(h):
                self.reconnect(h.name)

        def reset_kvm(h: HostConfig) -> None:
            self._clear_libvirt(h, pools=True)
            self._unmount_nfs(h)
            hosts.restore_bare_files(h)
            images = h.outside("/var/lib/libvirt/images")
            for entry in os.scandir(images):
                run(["rm", "-rf", "--one-file-system", entry.path])
            logs = h.outside("/var/log/libvirt/qemu")
            for entry in os.scandir(logs):
                if entry.is_file():
                    os.unlink(entry.path)

        _parallel(reset_kvm, cfg.kvm)
        st = cfg.storage
        nfsserver.reset(st)
        storage.reset(st)
        hosts.restore_bare_files(st)
        elapsed = time.monotonic() - t0
        log.info("lab reset in %.2f s", elapsed)
        return elapsed

    def _clear_libvirt(self, h: HostConfig, pools: bool) -> None:
        from kvmstate.lab import virt

        sock = self.cfg.libvirt_socket(h)
        if not sock.exists():
            return
        with virt.connect(self.cfg.libvirt_uri(h)) as conn:
            virt.clear_domains(conn)
            if pools:
                virt.clear_pools(conn)
                virt.clear_networks(conn)

    def _unmount_nfs(self, h: HostConfig) -> None:
        """Unmount the host's NFS (FUSE) mounts; their client processes then exit."""
        for src, mp, fstype in reversed(storage.host_mounts(h)):
            if fstype.startswith("fuse.") or fstype.startswith("nfs"):
                try:
                    hosts.in_host(h, ["umount", "--no-canonicalize", mp])
                except CommandError:
                    hosts.in_host(h, ["umount", "--no-canonicalize", "-l", mp], check=False)
                log.debug("%s: unmounted %s from %s", h.name, mp, src)

    # Guest --------------------------------------------------------------------------------
    def guest_counter(self, domain: str) -> int:
        """The guest's latest counter value, from whichever KVM host runs it."""
        return self.guest_reading(domain).value

    def guest_reading(self, domain: str) -> guest.CounterReading:
        """The guest's latest counter value and the boot id that printed it."""
        from kvmstate.lab import virt

        if not self.is_up():
            raise LabError(f"the lab in {self.cfg.dir} is not up (run `kvmstate lab up`)")

        for h in self._kvm_on():
            with virt.connect(self.cfg.libvirt_uri(h)) as conn:
                dom = virt.lookup_domain(conn, domain)
                if dom is None or not dom.isActive():
                    continue
                xml = dom.XMLDesc(0)
            value = self._counter_from_serial(h, xml)
            if value is None:
                value = self._counter_from_disk(h, xml)
            if value is None:
                raise LabError(f"{domain} runs on {h.name} but has printed no counter yet")
            return value
        raise LabError(f"domain {domain} is not running on any lab KVM host")

    def guest_host(self, domain: str) -> str | None:
        """The lab KVM host where ``domain`` runs, if any."""
        from kvmstate.lab import virt

        if not self.is_up():
            raise LabError(f"the lab in {self.cfg.dir} is not up (run `kvmstate lab up`)")

        for h in self._kvm_on():
            with virt.connect(self.cfg.libvirt_uri(h)) as conn:
                dom = virt.lookup_domain(conn, domain)
                if dom is not None and dom.isActive():
                    return h.name
        return None

    def _kvm_on(self) -> list[HostConfig]:
        return [h for h in self.cfg.kvm if power.power_state(self.cfg, h) != power.OFF]

    def _counter_from_serial(self, h: HostConfig, xml: str) -> guest.CounterReading | None:
        import xml.etree.ElementTree as ET

        root = ET.fromstring(xml)  # noqa: S314 (our own libvirtd)
        for serial in root.findall("./devices/serial[@type='file']/source"):
            path = serial.get("path")
            if not path:
                continue
            out = self.run(h.name, ["tail", "-c", "4096", path], check=False).stdout
            value = guest.parse_serial_reading(out)
            if value is not None:
                return value
        return None

    def _counter_from_disk(self, h: HostConfig, xml: str) -> guest.CounterReading | None:
        import xml.etree.ElementTree as ET

        root = ET.fromstring(xml)  # noqa: S314 (our own libvirtd)
        for disk in root.findall("./devices/disk[@device='disk']"):
            src = disk.find("source")
            drv = disk.find("driver")
            path = src.get("file") if src is not None else None
            if not path:
                continue
            fmt = (drv.get("type") if drv is not None else None) or "raw"
            for offset in guest.DISK_COUNTER_OFFSETS:
                read = f"read -v {offset} {guest.DISK_RECORD_BYTES}"
                out = self.run(
                    h.name, ["qemu-io", "-r", "-U", "-f", fmt, "-c", read, path], check=False
                ).stdout
                value = guest.parse_disk_reading(guest.parse_qemu_io_read(out))
                if value is not None:
                    return value
        return None


def _which(cmd: str) -> bool:
    return shutil.which(cmd, path=SBIN_PATH) is not None


def _loadable(name: str) -> bool:
    import ctypes

    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _lab_links() -> list[str]:
    out = run(["ip", "-o", "link", "show"], check=False).stdout
    links = []
    for line in out.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if name.startswith("kvl-"):
                links.append(name)
    return links


def _processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Live (non-zombie) processes whose command line contains ``text``, except this one."""
    found = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        try:
            cmd = (
                Path(f"/proc/{pid}/cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
            )
        except OSError:
            continue
        if text in cmd and pid_alive(pid):
            found.append((pid, cmd.strip()))
    return found
