"""Power for lab hosts: a power loss (``crash``), ``boot``, a network partition (``isolate`` /
``reconnect``) and the lab's fence agent (``kvmstate lab power HOST status|off|on``).

A lab host is a set of namespaces with its own daemons (:mod:`kvmstate.lab.netns`,
:mod:`kvmstate.lab.hosts`). Its power state lives in the lab's ``state.json`` (``"power"``:
``on``, ``off`` or ``isolated``), the lab's stand-in for a BMC.

- **crash** (KVM hosts only): the host's link goes down (its root-side veth down, plus an
  ``unreachable`` route for its address in the controller's namespace, so a connect from the
  control machine fails at once with "No route to host"; from the other lab hosts ARP fails,
  "No route to host" after about 3 s), then every process of the host is SIGKILLed: everything
  in its network or mount namespace (QEMU guests, libvirtd, virtlogd, sshd, the FUSE NFS
  client, ssh sessions) and the lab's reaper processes that ran its daemons, by PID, round
  after round until none is left, then waited for until they left the process table. Its
  mount and UTS namespaces are dropped (every mount is gone, as after a power loss) and its
  ``/run`` is emptied (libvirt's runtime dirs, pid files, sockets). Its persistent files stay:
  ``/etc`` (libvirt's domain definitions and autostart links, fstab), ``/var/lib/libvirt``,
  ``/var/log/libvirt``, ``/root``.
- **boot**: link up, fresh mount + UTS namespaces with the host's usual view and an empty
  ``/run``, ``mount -a`` (the NFS entries of its fstab, through the lab's FUSE client; a mount
  that fails is logged and the boot goes on, as with ``_netdev``), then virtlogd + libvirtd
  (which autostart the pools and domains marked so) and sshd, waited for as ``lab up`` does.
- **isolate / reconnect**: only the link (as for crash) goes down / up; every process lives on.
  An isolated host is powered ON.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from kvmstate.lab import hosts, netns
from kvmstate.lab.config import DEFAULT_DIR, NETWORK, SERVER_PATH, HostConfig, LabConfig
from kvmstate.lab.proc import (
    LabError,
    PidRegistry,
    gone,
    pid_alive,
    run,
    start_time,
    wait_for,
)

log = logging.getLogger(__name__)

ON = "on"
OFF = "off"
ISOLATED = "isolated"

# Fence-agent conventions (fence-agents: fencing.py): exit codes of `status` and of errors.
EXIT_ON = 0
EXIT_FAILED = 1
EXIT_OFF = 2

REAP_TIMEOUT = 60.0  # PID 1 on some machines reaps orphans a second or two late
KILL_ROUNDS = 100


# State ------------------------------------------------------------------------------------


@contextlib.contextmanager
def power_lock(cfg: LabConfig) -> Iterator[None]:
    """One power operation at a time on a lab (the fence agent runs in other processes)."""
    cfg.dir.mkdir(parents=True, exist_ok=True)
    with open(cfg.dir / "power.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_state(cfg: LabConfig) -> dict[str, object]:
    try:
        data = json.loads(cfg.state_file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def recorded_power(cfg: LabConfig) -> dict[str, str]:
    """The power states ``state.json`` records (hosts not listed are on while the lab is up)."""
    power = _load_state(cfg).get("power")
    if not isinstance(power, dict):
        return {}
    return {str(k): str(v) for k, v in power.items() if v in (ON, OFF, ISOLATED)}


def power_state(cfg: LabConfig, host: HostConfig) -> str:
    """``on``, ``off`` or ``isolated``. A host of a lab that is down is off."""
    if not host.netns_path.exists():
        return OFF
    return recorded_power(cfg).get(host.name, ON)


def record_power(cfg: LabConfig, states: dict[str, str]) -> None:
    """Update the recorded power state of the given hosts (atomically, other keys kept)."""
    data = _load_state(cfg) or {"dir": str(cfg.dir), "kvm_hosts": cfg.kvm_hosts}
    power = recorded_power(cfg)
    power.update(states)
    data["power"] = {h.name: power.get(h.name, ON) for h in cfg.hosts}
    tmp = cfg.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(cfg.state_file)


# Links ------------------------------------------------------------------------------------


def link_down(host: HostConfig) -> None:
    """Cut the host off the lab network: its bridge port down and, in the controller's
    namespace, an ``unreachable`` route for its address (connects fail at once there)."""
    run(["ip", "route", "replace", "unreachable", f"{host.address}/32"])
    if Path(f"/sys/class/net/{host.veth}").exists():
        run(["ip", "link", "set", host.veth, "down"])


def link_up(host: HostConfig) -> None:
    if Path(f"/sys/class/net/{host.veth}").exists():
        run(["ip", "link", "set", host.veth, "up"])
    run(["ip", "route", "del", "unreachable", f"{host.address}/32"], check=False)


def wait_link(host: HostConfig) -> None:
    """Wait until the host's link carries traffic: both veth ends operationally up (the
    kernel applies a carrier change a moment later) and its bridge port forwarding. A boot
    mounts its NFS lines only then, as ``network-online`` comes before ``_netdev`` mounts."""

    def ready() -> bool:
        sysfs = Path("/sys/class/net") / host.veth
        try:
            ours = (sysfs / "operstate").read_text().strip()
            port = (sysfs / "brport" / "state").read_text().strip()
        except OSError:
            return False
        if ours != "up" or port != "3":  # BR_STATE_FORWARDING
            return False
        peer = run(["ip", "-n", host.netns, "-o", "link", "show", "eth0"], check=False).stdout
        return "state UP" in peer

    wait_for(f"{host.name}: link up", ready, timeout=30)


def link_is_up(host: HostConfig) -> bool:
    try:
        flags = int(Path(f"/sys/class/net/{host.veth}/flags").read_text(), 16)
    except (OSError, ValueError):
        return False
    return bool(flags & 0x1)  # IFF_UP


def clear_unreachable_routes() -> None:
    """Remove every ``unreachable`` route into the lab network left by crash or isolate."""
    out = run(["ip", "-o", "route", "show", "type", "unreachable"], check=False).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "unreachable":
            dest = parts[1]
            with contextlib.suppress(ValueError):
                addr = dest.split("/")[0]
                if addr in NETWORK:
                    run(["ip", "route", "del", "unreachable", dest], check=False)


# Processes --------------------------------------------------------------------------------


def _ns_id(path: Path | str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def host_processes(host: HostConfig, registry: PidRegistry) -> list[tuple[int, int | None]]:
    """(pid, start time) of every live process of ``host``: in its network or mount namespace,
    and the lab daemons (their reapers included) recorded for it."""
    targets = {ns for ns in (_ns_id(host.netns_path), _ns_id(host.mnt_ns)) if ns is not None}
    me = os.getpid()
    found: dict[int, int | None] = {}
    if targets:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            pid = int(entry.name)
            for kind in ("net", "mnt"):
                if _ns_id(f"/proc/{pid}/ns/{kind}") in targets:
                    found[pid] = start_time(pid)
                    break
    for d in registry.load():
        if d.host == host.name and pid_alive(d.pid, d.started):
            found[d.pid] = d.started
    return [(p, s) for p, s in found.items() if s is not None and pid_alive(p, s)]


def kill_host(host: HostConfig, registry: PidRegistry) -> list[tuple[int, int | None]]:
    """SIGKILL every process of ``host`` (round after round: a process forked meanwhile is
    caught by the next one) and wait until each left the process table. Returns them."""
    killed: dict[int, int | None] = {}
    for _ in range(KILL_ROUNDS):
        live = [(p, s) for p, s in host_processes(host, registry) if p not in killed]
        if not live:
            break
        for pid, started in live:
            killed[pid] = started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    else:
        raise LabError(f"{host.name}: processes keep appearing after {KILL_ROUNDS} rounds")
    pairs = list(killed.items())
    try:
        wait_for(
            f"{host.name}: killed processes leaving the process table",
            lambda: all(_settled(p, s, killed) for p, s in pairs),
            timeout=REAP_TIMEOUT,
        )
    except LabError:
        left = [p for p, s in pairs if not _settled(p, s, killed)]
        raise LabError(
            f"{host.name}: pids {left} still in the process table after the crash"
        ) from None
    return pairs


def _settled(pid: int, started: int | None, killed: dict[int, int | None]) -> bool:
    """Gone from the process table; or dead and left to a parent outside the host that is
    alive and not init (a test or script that started the lab daemons in-process: only it
    can reap them, and it does on its next ``subprocess`` call). Our own children are
    reaped here; orphans are reaped by init (late on some machines), waited for."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    if gone(pid, started):
        return True
    if pid_alive(pid, started):
        return False
    parent = _ppid(pid)
    return parent not in (None, 0, 1, os.getpid()) and parent not in killed and pid_alive(parent)


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def release_mounts(host: HostConfig) -> None:
    """Detach the host's own mounts (its /etc overlay, /sys, private binds, NFS) inside its
    mount namespace, which is about to be dropped: other hosts' namespaces, copied from the
    controller's after this one was made, keep a reference to it, and the overlay on the
    host's /etc upper directory must not outlive the boot that mounts it again."""
    if not host.mnt_ns.exists():
        return
    try:
        out = run(netns.host_argv(host, ["cat", "/proc/self/mounts"]), check=False).stdout
    except LabError:
        return
    own = {"/sys", "/etc", *host.private_dirs()}
    targets = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mp, fstype = parts[1].replace("\\040", " "), parts[2]
        if mp in own or mp.startswith("/usr/sbin/mount.nfs") or fstype.startswith("fuse."):
            targets.append(mp)
    targets = sorted(set(targets), key=lambda m: m.count("/"), reverse=True)
    if targets:
        run(netns.host_argv(host, ["umount", "-l", "--no-canonicalize", *targets]), check=False)


def clear_run_dir(host: HostConfig) -> None:
    """Empty the host's ``/run`` (a tmpfs on a real host: lost at power-off)."""
    run_dir = host.outside("/run")
    if run_dir.is_dir():
        for entry in os.scandir(run_dir):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
    hosts.make_run_dirs(host)


# Operations -------------------------------------------------------------------------------


def _require_kvm(host: HostConfig, what: str) -> None:
    if host.role != "kvm":
        raise LabError(f"{what}: only KVM hosts can crash or boot, {host.name} is the {host.role}")


def _power_off(host: HostConfig, registry: PidRegistry) -> int:
    link_down(host)
    killed = kill_host(host, registry)
    release_mounts(host)
    netns.drop_host_namespaces(host)
    clear_run_dir(host)
    return len(killed)


def crash(cfg: LabConfig, host: HostConfig, registry: PidRegistry) -> int:
    """A power loss of ``host``. Returns how many processes were killed (0: it was off)."""
    _require_kvm(host, f"crash {host.name}")
    with power_lock(cfg):
        if power_state(cfg, host) == OFF:
            log.info("%s is already off", host.name)
            return 0
        n = _power_off(host, registry)
        record_power(cfg, {host.name: OFF})
    log.info("%s: power lost (%d processes killed)", host.name, n)
    return n


def boot(cfg: LabConfig, host: HostConfig, registry: PidRegistry) -> list[str]:
    """Boot a crashed host. Returns the boot's warnings (fstab entries it could not mount)."""
    _require_kvm(host, f"boot {host.name}")
    with power_lock(cfg):
        if not host.netns_path.exists():
            raise LabError(f"the lab in {cfg.dir} is not up (run `kvmstate lab up`)")
        if power_state(cfg, host) != OFF:
            log.info("%s is already on", host.name)
            return []
        try:
            warnings = _boot(cfg, host, registry)
        except BaseException:
            log.error("%s: boot failed; powering it off again", host.name)
            with contextlib.suppress(Exception):
                _power_off(host, registry)
            raise
        record_power(cfg, {host.name: ON})
    return warnings


def _boot(cfg: LabConfig, host: HostConfig, registry: PidRegistry) -> list[str]:
    netns.drop_host_namespaces(host)  # after a failed boot
    clear_run_dir(host)
    link_up(host)
    wait_link(host)
    # The kernel's neighbour cache did not survive the power loss either (entries that
    # failed while the link was down would make the first connects fail).
    run(["ip", "-n", host.netns, "neigh", "flush", "dev", "eth0"], check=False)
    netns.create_host_namespaces(host)
    hosts.mount_host_view(cfg, host)
    warnings = mount_fstab(host)
    libvirtd = hosts.start_libvirt(cfg, host, registry)
    sshd = hosts.start_sshd(cfg, host, registry)
    hosts.wait_libvirt(cfg, host, libvirtd)
    hosts.wait_sshd(cfg, host, sshd)
    return warnings


def mount_fstab(host: HostConfig) -> list[str]:
    """``mount -a`` inside the host, as its boot does; failures are logged, not fatal."""
    res = run(netns.host_argv(host, ["mount", "-a"]), check=False, env=hosts.HOST_ENV, timeout=300)
    if res.returncode == 0:
        return []
    lines = [ln.strip() for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
    warnings = [f"{host.name}: {ln}" for ln in lines] or [
        f"{host.name}: mount -a exited {res.returncode}"
    ]
    for w in warnings:
        log.warning("boot %s", w)
    return warnings


def isolate(cfg: LabConfig, host: HostConfig) -> None:
    """A network partition: the host's link down, every process of it alive."""
    with power_lock(cfg):
        state = power_state(cfg, host)
        if state == OFF:
            raise LabError(f"{host.name} is powered off (`kvmstate lab boot {host.name}`)")
        link_down(host)
        record_power(cfg, {host.name: ISOLATED})


def reconnect(cfg: LabConfig, host: HostConfig) -> None:
    """End a partition: the host's link up again."""
    with power_lock(cfg):
        state = power_state(cfg, host)
        if state == OFF:
            raise LabError(f"{host.name} is powered off (`kvmstate lab boot {host.name}`)")
        link_up(host)
        wait_link(host)
        record_power(cfg, {host.name: ON})


# The fence agent --------------------------------------------------------------------------

ACTIONS = ("status", "off", "on", "reboot", "monitor", "list")


def fence(
    lab_dir: Path,
    host_name: str | None,
    action: str,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """One fence-agent action on a lab host; returns the agent's exit code."""
    cfg = LabConfig.load(lab_dir)
    registry = PidRegistry(cfg.pids_file)
    try:
        if action == "list":
            for h in cfg.hosts:
                print(f"{h.name},{h.address}", file=out)
            return 0
        if action == "monitor":
            return 0 if all(h.netns_path.exists() for h in cfg.hosts) else EXIT_FAILED
        if host_name is None:
            raise LabError("no host given (plug)")
        try:
            host = cfg.host(host_name)
        except KeyError as exc:
            raise LabError(str(exc.args[0])) from None
        if action == "status":
            on = power_state(cfg, host) != OFF
            print(f"Status: {'ON' if on else 'OFF'}", file=out)
            return EXIT_ON if on else EXIT_OFF
        if os.geteuid() != 0:
            raise LabError("must run as root (the lab uses namespaces)")
        if action == "off":
            crash(cfg, host, registry)
            print("Success: Powered OFF", file=out)
        elif action == "on":
            boot(cfg, host, registry)
            print("Success: Powered ON", file=out)
        elif action == "reboot":
            crash(cfg, host, registry)
            boot(cfg, host, registry)
            print("Success: Rebooted", file=out)
        else:
            raise LabError(f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
    except LabError as exc:
        print(f"Failed: {exc}", file=err)
        return EXIT_FAILED
    return 0


def parse_fence_args(argv: Sequence[str], stdin: TextIO | None = None) -> argparse.Namespace:
    """``[--dir DIR] HOST ACTION``, or fence-agents style ``-n/--plug HOST -o/--action ACTION``,
    or (no arguments) ``key=value`` lines on stdin (``plug=``/``port=``, ``action=``)."""
    p = argparse.ArgumentParser(prog="fence-agent", description="the kvmstate lab's fence agent")
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    p.add_argument("-n", "--plug", "--port", dest="plug")
    p.add_argument("-o", "--action", dest="action")
    p.add_argument("args", nargs="*", metavar="HOST ACTION")
    ns = p.parse_args(list(argv))
    rest = list(ns.args)
    if ns.plug is None and rest:
        ns.plug = rest.pop(0)
    if ns.action is None and rest:
        ns.action = rest.pop(0)
    if rest:
        p.error(f"unexpected arguments: {' '.join(rest)}")
    if ns.plug is None and ns.action is None and stdin is not None and not stdin.isatty():
        for line in stdin:
            key, _, value = line.strip().partition("=")
            if key in ("plug", "port", "nodename"):
                ns.plug = value
            elif key == "action":
                ns.action = value
    ns.action = ns.action or "reboot"  # fence-agents' default action
    if ns.action not in ACTIONS:
        p.error(f"unknown action {ns.action!r} (one of {', '.join(ACTIONS)})")
    return ns


def fence_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``<lab dir>/bin/fence-agent``."""
    args = list(sys.argv[1:] if argv is None else argv)
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = SERVER_PATH + (":" + path if path else "")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ns = parse_fence_args(args, sys.stdin)
    return fence(ns.dir, ns.plug, ns.action)


def render_fence_agent(python: str, lab_dir: Path) -> str:
    """The ``fence-agent`` script ``lab up`` writes: this lab's agent for specs' ``fence:``."""
    return (
        f"#!{python}\n"
        "# Generated by `kvmstate lab up`: the lab's fence agent.\n"
        "# usage: fence-agent HOST status|off|on|reboot  (status: exit 0 ON, 2 OFF, 1 error)\n"
        "import sys\n"
        "from kvmstate.lab.power import fence_main\n"
        f"sys.exit(fence_main(['--dir', {str(lab_dir)!r}, *sys.argv[1:]]))\n"
    )
