"""Cross-reference validation and hazard lints over a shape-valid ``Spec``.

Pure functions: ``check_spec`` returns ``(loc, message, severity)`` triples; the loader turns
them into ``file:line: field: message``. The relation helpers here are shared with the graph.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Literal

from kvmstate.spec import Mount, Spec, Subvolume

Severity = Literal["error", "warning"]
Finding = tuple[tuple[str | int, ...], str, Severity]


def is_under(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def covering_subvolume(spec: Spec, host: str, path: str) -> str | None:
    """The subvolume (on ``host``) whose mountpoint holds ``path``, deepest first."""
    best: tuple[int, str] | None = None
    for name, sv in spec.subvolumes.items():
        if sv.host == host and is_under(path, sv.mountpoint):
            depth = len(sv.mountpoint)
            if best is None or depth > best[0]:
                best = (depth, name)
    return best[1] if best else None


def covering_mount(spec: Spec, host: str, path: str) -> str | None:
    """The NFS mount (on ``host``) whose mountpoint holds ``path``, deepest first."""
    best: tuple[int, str] | None = None
    for name, m in spec.mounts.items():
        if host in m.hosts and is_under(path, m.mountpoint):
            depth = len(m.mountpoint)
            if best is None or depth > best[0]:
                best = (depth, name)
    return best[1] if best else None


def pool_is_shared(spec: Spec, pool: str, hosts: list[str]) -> bool:
    """True when ``pool`` sits on the same NFS export on every one of ``hosts``."""
    p = spec.pools[pool]
    exports = set()
    for h in hosts:
        if h not in p.hosts:
            return False
        m = covering_mount(spec, h, p.path)
        if m is None:
            return False
        exports.add(spec.mounts[m].export)
    return len(exports) == 1


def _refs(spec: Spec) -> Iterator[Finding]:
    hosts = spec.hosts
    for name, sv in spec.subvolumes.items():
        if sv.host not in hosts:
            yield ("subvolumes", name, "host"), _unknown("host", sv.host, hosts), "error"
    for name, ex in spec.exports.items():
        if ex.host not in hosts:
            yield ("exports", name, "host"), _unknown("host", ex.host, hosts), "error"
    for name, m in spec.mounts.items():
        if m.export not in spec.exports:
            yield ("mounts", name, "export"), _unknown("export", m.export, spec.exports), "error"
        yield from _host_list(("mounts", name, "hosts"), m.hosts, hosts)
    for name, p in spec.pools.items():
        yield from _host_list(("pools", name, "hosts"), p.hosts, hosts)
    for name, v in spec.volumes.items():
        if v.pool not in spec.pools:
            yield ("volumes", name, "pool"), _unknown("pool", v.pool, spec.pools), "error"
    for name, d in spec.domains.items():
        if d.host not in hosts:
            yield ("domains", name, "host"), _unknown("host", d.host, hosts), "error"
        if d.placement is not None:
            yield from _host_list(("domains", name, "placement", "hosts"), d.placement.hosts, hosts)
            if d.host not in d.placement.hosts:
                yield (
                    ("domains", name, "host"),
                    f"host {d.host!r} is not one of placement.hosts {d.placement.hosts}",
                    "error",
                )
        for i, disk in enumerate(d.disks):
            if disk.volume not in spec.volumes:
                yield (
                    ("domains", name, "disks", i, "volume"),
                    _unknown("volume", disk.volume, spec.volumes),
                    "error",
                )


def _unknown(kind: str, value: str, known: Mapping[str, object]) -> str:
    names = ", ".join(sorted(known)) or "none defined"
    return f"unknown {kind} {value!r} (defined: {names})"


def _host_list(
    loc: tuple[str | int, ...], listed: list[str], hosts: Mapping[str, object]
) -> Iterator[Finding]:
    seen: set[str] = set()
    for i, h in enumerate(listed):
        if h not in hosts:
            yield (*loc, i), _unknown("host", h, hosts), "error"
        if h in seen:
            yield (*loc, i), f"host {h!r} is listed twice", "error"
        seen.add(h)


def _uniqueness(spec: Spec) -> Iterator[Finding]:
    seen: dict[tuple[str, str], tuple[str | int, ...]] = {}

    def claim(key: tuple[str, str], loc: tuple[str | int, ...], what: str) -> Iterator[Finding]:
        if key in seen:
            other = ".".join(str(p) for p in seen[key][:2])
            yield loc, f"{what} {key[1]!r} on host {key[0]!r} is already used by {other}", "error"
        else:
            seen[key] = loc

    for name, sv in spec.subvolumes.items():
        yield from claim((sv.host, sv.mountpoint), ("subvolumes", name, "mountpoint"), "mountpoint")
    for name, m in spec.mounts.items():
        for h in dict.fromkeys(m.hosts):
            yield from claim((h, m.mountpoint), ("mounts", name, "mountpoint"), "mountpoint")
    pool_paths: dict[tuple[str, str], str] = {}
    for name, p in spec.pools.items():
        for h in dict.fromkeys(p.hosts):
            other = pool_paths.setdefault((h, p.path), name)
            if other != name:
                yield (
                    ("pools", name, "path"),
                    f"path {p.path!r} on host {h!r} is already the path of pool {other!r}",
                    "error",
                )
    export_paths: dict[tuple[str, str], str] = {}
    for name, ex in spec.exports.items():
        other = export_paths.setdefault((ex.host, ex.path), name)
        if other != name:
            yield (
                ("exports", name, "path"),
                f"path {ex.path!r} is already exported by {other!r}",
                "error",
            )
    macs: dict[str, str] = {}
    for name, d in spec.domains.items():
        for i, nic in enumerate(d.interfaces):
            if nic.mac is None:
                continue
            other = macs.setdefault(nic.mac.lower(), f"domains.{name}.interfaces.{i}")
            if other != f"domains.{name}.interfaces.{i}":
                yield (
                    ("domains", name, "interfaces", i, "mac"),
                    f"MAC address {nic.mac} is already used by {other}",
                    "error",
                )
    users: dict[str, str] = {}
    for name, d in spec.domains.items():
        if d.state == "absent":
            continue
        mine: set[str] = set()
        for i, disk in enumerate(d.disks):
            if disk.volume in mine:
                yield (
                    ("domains", name, "disks", i, "volume"),
                    "volume used twice by one domain",
                    "error",
                )
            mine.add(disk.volume)
            other = users.setdefault(disk.volume, name)
            if other != name:
                yield (
                    ("domains", name, "disks", i, "volume"),
                    f"volume {disk.volume!r} is already the disk of domain {other!r}",
                    "error",
                )
        targets = [disk.target for disk in d.disks if disk.target]
        if len(targets) != len(set(targets)):
            yield ("domains", name, "disks"), "two disks have the same target", "error"


def _placement(spec: Spec) -> Iterator[Finding]:
    for name, d in spec.domains.items():
        if d.state == "absent":
            continue
        for h in d.allowed_hosts():
            if h not in spec.hosts:
                continue
            for i, disk in enumerate(d.disks):
                vol = spec.volumes.get(disk.volume)
                if vol is None or vol.pool not in spec.pools:
                    continue
                if h not in spec.pools[vol.pool].hosts:
                    loc: tuple[str | int, ...] = (
                        ("domains", name, "host")
                        if h == d.host
                        else ("domains", name, "placement", "hosts")
                    )
                    yield (
                        loc,
                        f"host {h!r} does not have pool {vol.pool!r}, which holds disk "
                        f"{i} ({disk.volume}); add {h!r} to pools.{vol.pool}.hosts",
                        "error",
                    )
        if spec.volumes:
            for i, disk in enumerate(d.disks):
                vol = spec.volumes.get(disk.volume)
                if vol is not None and vol.state == "absent":
                    yield (
                        ("domains", name, "disks", i, "volume"),
                        f"volume {disk.volume!r} is state: absent but still a disk of this domain",
                        "error",
                    )


def _topology(spec: Spec) -> Iterator[Finding]:
    for name, m in spec.mounts.items():
        ex = spec.exports.get(m.export)
        if ex is None:
            continue
        if ex.host in m.hosts:
            yield (
                ("mounts", name, "hosts"),
                f"host {ex.host!r} both exports and mounts {m.export!r}",
                "warning",
            )
    for name, p in spec.pools.items():
        for h in p.hosts:
            if h in spec.hosts and covering_mount(spec, h, p.path) is None and len(p.hosts) > 1:
                yield (
                    ("pools", name, "path"),
                    f"pool {name!r} is on several hosts but {p.path!r} is not on an NFS mount "
                    f"on {h!r}: each host gets its own, unshared directory",
                    "warning",
                )
                break


def _hazards(spec: Spec) -> Iterator[Finding]:
    for name, m in spec.mounts.items():
        if m.nfs_version != "3" or "nolock" in m.options or m.state == "absent":
            continue
        for pname, p in spec.pools.items():
            if not any(covering_mount(spec, h, p.path) == name for h in p.hosts):
                continue
            qcow = [
                v for v, vol in spec.volumes.items() if vol.pool == pname and vol.format == "qcow2"
            ]
            if qcow:
                yield (
                    ("mounts", name, "nfs_version"),
                    f"NFSv3 mount under pool {pname!r} holding qcow2 volumes ({', '.join(qcow)}): "
                    "QEMU image locking fails on NFSv3 ('Failed to lock byte 100'); use "
                    "nfs_version: \"4\" (or the NFSv3-only 'nolock' option)",
                    "warning",
                )
    for name, d in spec.domains.items():
        allowed = [h for h in d.allowed_hosts() if h in spec.hosts]
        if d.state == "absent" or len(allowed) < 2:
            continue
        for i, disk in enumerate(d.disks):
            vol = spec.volumes.get(disk.volume)
            if vol is None or vol.pool not in spec.pools:
                continue
            if not pool_is_shared(spec, vol.pool, allowed):
                yield (
                    ("domains", name, "disks", i, "volume"),
                    f"domain may run on {allowed} but pool {vol.pool!r} is not shared storage "
                    "on all of them: a live migration would fail",
                    "warning",
                )


def mounts_of_host(spec: Spec, host: str) -> dict[str, Mount]:
    return {n: m for n, m in spec.mounts.items() if host in m.hosts}


def subvolumes_of_host(spec: Spec, host: str) -> dict[str, Subvolume]:
    return {n: s for n, s in spec.subvolumes.items() if s.host == host}


def check_spec(spec: Spec) -> list[Finding]:
    out: list[Finding] = []
    for check in (_refs, _uniqueness, _placement, _topology, _hazards):
        out.extend(check(spec))
    return out
