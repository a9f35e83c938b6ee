"""Host prerequisites: what each resource kind needs on a host, and which Debian package
provides it.

``check_prerequisites`` costs one batched command per host (all commands and devices checked
by one fixed ``sh`` script) plus, when libvirtd is needed, opening the host's libvirt connection
(which plan opens anyway). ``install_packages`` installs only what is missing, with
``apt-get install -y --no-install-recommends``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from kvmstate.errors import ParseError, TransportError
from kvmstate.facts import Fact
from kvmstate.spec import Spec
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


REQUIREMENTS: dict[str, Requirement] = {
    r.name: r
    for r in (
        Requirement("btrfs", "command", "btrfs-progs", "btrfs", "btrfs subvolumes"),
        Requirement("mount", "command", "mount", "mount", "mounting filesystems"),
        Requirement("exportfs", "command", "nfs-kernel-server", "exportfs", "NFS exports"),
        Requirement("mount.nfs", "command", "nfs-common", "mount.nfs", "NFS mounts"),
        Requirement("qemu-img", "command", "qemu-utils", "qemu-img", "disk volumes"),
        Requirement(
            "qemu-system-x86_64", "command", "qemu-system-x86", "qemu-system-x86_64", "domains"
        ),
        Requirement(
            "libvirtd-binary", "command", "libvirt-daemon-system", "libvirtd", "libvirt (daemon)"
        ),
        Requirement(
            "libvirtd", "daemon", "libvirt-daemon-system", "libvirtd", "pools, volumes, domains"
        ),
        Requirement("kvm", "device", None, "/dev/kvm", "domains of type kvm"),
        Requirement("apt-get", "command", "apt", "apt-get", "installing packages"),
    )
}

#: What each resource kind needs on the hosts it touches.
KIND_NEEDS: dict[str, frozenset[str]] = {
    "packages": frozenset({"apt-get"}),
    "subvolume": frozenset({"btrfs", "mount"}),
    "export": frozenset({"exportfs"}),
    "mount": frozenset({"mount", "mount.nfs"}),
    "pool": frozenset({"libvirtd-binary", "libvirtd"}),
    "volume": frozenset({"libvirtd-binary", "libvirtd", "qemu-img"}),
    "domain": frozenset({"libvirtd-binary", "libvirtd", "qemu-system-x86_64"}),
}


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


def needs_for_host(spec: Spec, host: str) -> set[str]:
    """The requirement names ``host`` needs for the resources the spec puts on it. Pure."""
    needs: set[str] = set()
    if spec.hosts[host].packages:
        needs |= KIND_NEEDS["packages"]
    if any(sv.host == host for sv in spec.subvolumes.values()):
        needs |= KIND_NEEDS["subvolume"]
    if any(e.host == host for e in spec.exports.values()):
        needs |= KIND_NEEDS["export"]
    if any(host in m.hosts for m in spec.mounts.values()):
        needs |= KIND_NEEDS["mount"]
    pool_hosts = {p: set(pool.hosts) for p, pool in spec.pools.items()}
    if any(host in hs for hs in pool_hosts.values()):
        needs |= KIND_NEEDS["pool"]
    if any(host in pool_hosts.get(v.pool, set()) for v in spec.volumes.values()):
        needs |= KIND_NEEDS["volume"]
    for d in spec.domains.values():
        if host in d.allowed_hosts():
            needs |= KIND_NEEDS["domain"]
            if d.type == "kvm":
                needs.add("kvm")
    return needs


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


def host_fact(spec: Spec, host: str) -> Fact[tuple[Missing, ...]]:
    """The commands and devices the spec needs on ``host``, probed by one fixed script that
    the engine batches with the host's other facts (no extra round trip). Value: what is
    missing. (libvirtd itself is checked by connecting to it.)"""
    reqs = [
        replace(REQUIREMENTS[n], name=n)
        for n in sorted(needs_for_host(spec, host))
        if REQUIREMENTS[n].kind != "daemon"
    ]
    probes = tuple(probe_of(r) for r in reqs)

    def parse(res: CommandResult) -> tuple[Missing, ...]:
        absent = _absent(res)
        return tuple(_missing(host, r) for r, p in zip(reqs, probes, strict=True) if p in absent)

    return Fact(
        f"prereq:{','.join(probes)}", ("sh", "-c", CHECK_SCRIPT, "kvmstate-prereq", *probes), parse
    )


def needs_of(kind: str, domain_type: str | None = None) -> frozenset[str]:
    """What one resource of ``kind`` needs on each of its hosts."""
    needs = KIND_NEEDS.get(kind, frozenset())
    return needs | {"kvm"} if domain_type == "kvm" else needs


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


# --- installing --------------------------------------------------------------------------------

_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]{0,127}$")
_APT_ENV = ["env", "DEBIAN_FRONTEND=noninteractive"]
_NEEDS_UPDATE = ("Unable to locate package", "has no installation candidate")


def _validate(packages: Sequence[str]) -> list[str]:
    bad = [p for p in packages if not _PACKAGE_RE.match(p)]
    if bad:
        raise ValueError(f"invalid Debian package name(s): {', '.join(map(repr, bad))}")
    return list(dict.fromkeys(packages))


def dpkg_query(packages: Sequence[str]) -> tuple[str, ...]:
    """The argv that lists the dpkg status of ``packages`` (validated names)."""
    pkgs = _validate(packages)
    return ("dpkg-query", "-W", "-f", "${Package}\\t${db:Status-Abbrev}\\n", "--", *pkgs)


def parse_installed(res: CommandResult) -> frozenset[str]:
    """The installed ones (dpkg status ``ii``) in ``dpkg_query``'s output. Exit 1 is an
    answer (a name dpkg has never seen), anything else an error."""
    if res.exit_status not in (0, 1):
        raise ParseError(res.host, "dpkg-query", f"exit {res.exit_status}: {res.stderr.strip()}")
    installed = set()
    for line in res.stdout.splitlines():
        name, _, status = line.partition("\t")
        if status.startswith("ii"):
            installed.add(name.split(":")[0])  # drop an ":amd64" arch suffix
    return frozenset(installed)


def installed_fact(packages: Sequence[str]) -> Fact[frozenset[str]]:
    """Which of ``packages`` are installed: one ``dpkg-query``, batched with the host's reads."""
    argv = dpkg_query(packages)
    return Fact(f"dpkg:{','.join(argv[5:])}", argv, parse_installed)


async def missing_packages(shell: Shell, packages: Sequence[str]) -> list[str]:
    """Which of ``packages`` are not installed (dpkg status other than ``ii``)."""
    pkgs = _validate(packages)
    if not pkgs:
        return []
    installed = parse_installed(await shell.run(dpkg_query(pkgs), check=False))
    return [p for p in pkgs if p not in installed]


async def install_packages(
    shell: Shell, packages: Sequence[str], *, timeout: float | None = 1800.0
) -> list[str]:
    """Install the missing ones of ``packages`` with apt; the list actually installed.

    Runs ``apt-get update`` once and retries when apt does not know a package yet (fresh host,
    empty lists). Raises ``TransportError`` naming the host, the command and apt's error."""
    todo = await missing_packages(shell, packages)
    if not todo:
        log.debug("%s: packages already installed: %s", shell.host, ", ".join(packages))
        return []
    await apt_install(shell, todo, timeout=timeout)
    return todo


async def apt_install(
    shell: Shell, packages: Sequence[str], *, timeout: float | None = 1800.0
) -> None:
    """``apt-get install`` ``packages`` (known to be missing: no dpkg query first), with one
    ``apt-get update`` and a retry when apt does not know one yet."""
    todo = _validate(packages)
    install = [*_APT_ENV, "apt-get", "install", "-y", "--no-install-recommends", "--", *todo]
    log.info("%s: installing %s", shell.host, " ".join(todo))
    res = await shell.run(install, check=False, timeout=timeout)
    if not res.ok and any(s in res.stderr for s in _NEEDS_UPDATE):
        log.info("%s: apt-get update (package lists are stale)", shell.host)
        await shell.run([*_APT_ENV, "apt-get", "update"], timeout=timeout)
        res = await shell.run(install, check=False, timeout=timeout)
    res.check()
