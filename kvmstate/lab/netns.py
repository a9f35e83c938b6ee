"""Hosts as namespaces: one network + mount + UTS namespace per host, veths on one bridge.

``ip netns exec`` cannot be combined with ``unshare --mount`` (it makes its own throwaway
mount namespace), so each host's mount and UTS namespaces are kept alive by bind mounts on
files under ``<lab dir>/ns`` (a private mount), and commands enter all three with ``nsenter``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

from kvmstate.lab.config import BRIDGE, CONTROLLER_ADDRESS, NETWORK, HostConfig, LabConfig
from kvmstate.lab.proc import run

log = logging.getLogger(__name__)


def host_argv(host: HostConfig, argv: Sequence[str], wd: str | None = None) -> list[str]:
    """``argv`` wrapped so that it runs inside ``host``'s namespaces."""
    prefix = [
        "nsenter",
        f"--net={host.netns_path}",
        f"--mount={host.mnt_ns}",
        f"--uts={host.uts_ns}",
    ]
    if wd is not None:
        prefix.append(f"--wd={wd}")
    return [*prefix, "--", *argv]


def _mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def mounts_under(prefix: Path) -> list[str]:
    """Mount points in the controller's mount namespace at or below ``prefix``, deepest first."""
    root = str(prefix)
    out: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            if mp == root or mp.startswith(root + "/"):
                out.append(mp)
    return sorted(set(out), key=len, reverse=True)


def create_bridge() -> None:
    run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    run(["ip", "addr", "add", f"{CONTROLLER_ADDRESS}/{NETWORK.prefixlen}", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])


def create_host_network(host: HostConfig) -> None:
    """The host's network namespace, with ``eth0`` on the lab bridge and its address."""
    ns = host.netns
    peer = f"{host.veth}-p"[:15]
    run(["ip", "netns", "add", ns])
    run(["ip", "link", "add", host.veth, "type", "veth", "peer", "name", peer])
    run(["ip", "link", "set", peer, "netns", ns])
    run(["ip", "link", "set", host.veth, "master", BRIDGE, "up"])
    run(["ip", "-n", ns, "link", "set", peer, "name", "eth0"])
    run(["ip", "-n", ns, "addr", "add", f"{host.address}/{NETWORK.prefixlen}", "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])


def prepare_ns_dir(cfg: LabConfig) -> None:
    """Make ``<dir>/ns`` a private bind mount so namespace files can be bind-mounted on it."""
    ns_dir = cfg.dir / "ns"
    ns_dir.mkdir(parents=True, exist_ok=True)
    if not _mounted(ns_dir):
        run(["mount", "--bind", str(ns_dir), str(ns_dir)])
    run(["mount", "--make-private", str(ns_dir)])


def create_host_namespaces(host: HostConfig) -> None:
    """Persistent mount and UTS namespaces for ``host``, entered with its network namespace."""
    for f in (host.mnt_ns, host.uts_ns):
        f.touch()
    run(
        [
            "nsenter",
            f"--net={host.netns_path}",
            "unshare",
            f"--mount={host.mnt_ns}",
            f"--uts={host.uts_ns}",
            "--propagation",
            "private",
            "hostname",
            host.name,
        ]
    )


def drop_host_namespaces(host: HostConfig) -> None:
    """Drop the host's mount and UTS namespaces (its network namespace stays)."""
    for f in (host.mnt_ns, host.uts_ns):
        if _mounted(f):
            run(["umount", str(f)], check=False)
        with contextlib.suppress(FileNotFoundError):
            f.unlink()


def destroy_host(host: HostConfig) -> None:
    """Drop the host's namespaces (freed once no process and no mount holds them)."""
    drop_host_namespaces(host)
    if host.netns_path.exists():
        run(["ip", "netns", "del", host.netns], check=False)
    if Path(f"/sys/class/net/{host.veth}").exists():
        run(["ip", "link", "del", host.veth], check=False)


def destroy_network(cfg: LabConfig) -> None:
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        run(["ip", "link", "del", BRIDGE], check=False)
    ns_dir = cfg.dir / "ns"
    for mp in mounts_under(ns_dir):
        run(["umount", mp], check=False)


def lab_netns_names() -> list[str]:
    """Every network namespace that belongs to a lab (by name prefix)."""
    out = run(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith("kvmlab-")]


def netns_pids(name: str) -> list[int]:
    out = run(["ip", "netns", "pids", name], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]
