"""Host prerequisites: the things a resource needs on a host, which Debian package provides
each, and the probe that finds what a host lacks.

Each kind names what it needs (``Resource.requires``, from the shared catalogue below or its
own ``Requirement``); the engine knows none of this: it batches each resource's probe fact
with the host's other reads (``Resource.reads``) and asks the resource what it lacks
(``Resource.preconditions``) before observing it. The probe is one fixed ``sh`` script; a
daemon (libvirtd) is checked by connecting to it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from kvmstate.errors import ParseError, TransportError
from kvmstate.facts import Fact
from kvmstate.transport.base import CommandResult, Shell, Transports
from kvmstate.transport.libvirt import LibvirtUnreachable

log = logging.getLogger(__name__)

Kind = Literal["command", "device", "daemon"]


@dataclass(frozen=True)
class Requirement:
    """One thing a host must have. ``check`` is a command name, a device path or a daemon."""

    name: str
    kind: Kind
    package: str | None
    check: str
    purpose: str


BTRFS = Requirement("btrfs", "command", "btrfs-progs", "btrfs", "btrfs subvolumes")
MOUNT = Requirement("mount", "command", "mount", "mount", "mounting filesystems")
EXPORTFS = Requirement("exportfs", "command", "nfs-kernel-server", "exportfs", "NFS exports")
MOUNT_NFS = Requirement("mount.nfs", "command", "nfs-common", "mount.nfs", "NFS mounts")
QEMU_IMG = Requirement("qemu-img", "command", "qemu-utils", "qemu-img", "disk volumes")
QEMU_SYSTEM = Requirement(
    "qemu-system-x86_64", "command", "qemu-system-x86", "qemu-system-x86_64", "domains"
)
LIBVIRTD_BINARY = Requirement(
    "libvirtd-binary", "command", "libvirt-daemon-system", "libvirtd", "libvirt (daemon)"
)
LIBVIRTD = Requirement(
    "libvirtd", "daemon", "libvirt-daemon-system", "libvirtd", "pools, volumes, domains"
)
KVM_DEVICE = Requirement("kvm", "device", None, "/dev/kvm", "domains of type kvm")
APT_GET = Requirement("apt-get", "command", "apt", "apt-get", "installing packages")

#: The shared catalogue, by name (kinds may also declare requirements of their own).
REQUIREMENTS: dict[str, Requirement] = {
    r.name: r
    for r in (
        BTRFS, MOUNT, EXPORTFS, MOUNT_NFS, QEMU_IMG, QEMU_SYSTEM, LIBVIRTD_BINARY, LIBVIRTD,
        KVM_DEVICE, APT_GET,
    )
}  # fmt: skip


@dataclass(frozen=True)
class Missing:
    """A prerequisite a host lacks, and what to do about it."""

    host: str
    need: str
    kind: Kind
    package: str | None
    detail: str

    def __str__(self) -> str:
        fix = f" (install the Debian package {self.package})" if self.package else ""
        if self.kind == "daemon":
            return f"{self.host}: {self.detail}"
        return f"{self.host}: {self.detail}{fix}"


# A fixed script: the things to check come as "$@" ("cmd:NAME" or "dev:PATH"), never spliced.
# sbin directories are added because a non-root login PATH often lacks them.
CHECK_SCRIPT = (
    'PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"; '
    'for x in "$@"; do case "$x" in '
    'cmd:*) command -v -- "${x#cmd:}" >/dev/null 2>&1 || echo "missing $x" ;; '
    'dev:*) [ -e "${x#dev:}" ] || echo "missing $x" ;; '
    "esac; done"
)


def probe_of(r: Requirement) -> str:
    """The check script's word for ``r``: ``cmd:NAME`` or ``dev:PATH``."""
    return f"cmd:{r.check}" if r.kind == "command" else f"dev:{r.check}"


def _missing(host: str, r: Requirement) -> Missing:
    if r.kind == "command":
        detail = f"command `{r.check}` not found (needed for {r.purpose})"
    else:
        detail = f"{r.check} does not exist (needed for {r.purpose})"
    return Missing(host, r.name, r.kind, r.package, detail)


def _absent(res: CommandResult) -> set[str]:
    if not res.ok:
        raise ParseError(res.host, "prerequisite check", f"exit {res.exit_status}: {res.stderr}")
    return {x.removeprefix("missing ") for x in res.stdout.splitlines() if x.startswith("missing ")}


async def _check_local(shell: Shell, reqs: Sequence[Requirement]) -> list[Missing]:
    probes = [probe_of(r) for r in reqs]
    res = await shell.run(["sh", "-c", CHECK_SCRIPT, "kvmstate-prereq", *probes])
    absent = _absent(res)
    return [_missing(shell.host, r) for r, p in zip(reqs, probes, strict=True) if p in absent]


def probe_fact(host: str, needs: Iterable[Requirement]) -> Fact[tuple[Missing, ...]]:
    """The commands and devices of ``needs`` probed on ``host`` by one fixed script, batched
    with the host's other facts (no extra round trip). Value: what is missing. Resources
    with the same needs share it. (A daemon is checked by connecting to it, not here.)"""
    reqs = sorted({r for r in needs if r.kind != "daemon"}, key=lambda r: r.name)
    probes = tuple(probe_of(r) for r in reqs)

    def parse(res: CommandResult) -> tuple[Missing, ...]:
        absent = _absent(res)
        return tuple(_missing(host, r) for r, p in zip(reqs, probes, strict=True) if p in absent)

    return Fact(
        f"prereq:{','.join(probes)}", ("sh", "-c", CHECK_SCRIPT, "kvmstate-prereq", *probes), parse
    )


async def _check_libvirtd(transports: Transports, host: str, req: Requirement) -> list[Missing]:
    lv = transports.libvirt(host)
    try:
        conn = await lv.connect()
        await lv.run(conn.getLibVersion)
    except LibvirtUnreachable as e:  # SSH itself failing (plain HostUnreachable) propagates
        return [Missing(host, req.name, "daemon", req.package, e.reason)]
    except TransportError as e:
        reason = f"libvirtd is not answering: {e}"
        return [Missing(host, req.name, "daemon", req.package, reason)]
    return []


async def check_prerequisites(
    transports: Transports,
    host: str,
    needs: Iterable[str],
    *,
    requirements: Mapping[str, Requirement] = REQUIREMENTS,
) -> list[Missing]:
    """What ``host`` lacks of ``needs`` (requirement names). One shell round trip, plus a
    libvirt connect when ``libvirtd`` is needed. ``HostUnreachable`` (SSH itself) propagates."""
    wanted = sorted(set(needs))
    unknown = [n for n in wanted if n not in requirements]
    if unknown:
        raise ValueError(f"unknown prerequisite(s): {', '.join(unknown)}")
    reqs = [replace(requirements[n], name=n) for n in wanted]
    local = [r for r in reqs if r.kind in ("command", "device")]
    daemons = [r for r in reqs if r.kind == "daemon"]
    shell = transports.shell(host)
    jobs = []
    if local:
        jobs.append(_check_local(shell, local))
    for d in daemons:
        if d.check != "libvirtd":
            raise ValueError(f"no check for daemon {d.check!r}")
        jobs.append(_check_libvirtd(transports, host, d))
    found: list[Missing] = []
    for part in await asyncio.gather(*jobs):
        found.extend(part)
    binary_missing = any(m.need == "libvirtd-binary" for m in found)
    if binary_missing:  # "not installed" says it all; don't also say "not answering"
        found = [m for m in found if m.kind != "daemon"]
    for m in found:
        log.debug("%s", m)
    return found


def packages_for(missing: Iterable[Missing]) -> list[str]:
    """The Debian packages that provide what is missing (sorted, no duplicates)."""
    return sorted({m.package for m in missing if m.package})
