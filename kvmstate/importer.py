"""``kvmstate import``: a spec for what already exists on some hosts.

Two halves. ``gather`` reads each host once, read-only (one batched shell round trip for
fstab, mountinfo and /etc/exports; one libvirt call listing pools, volumes and domains; one
batch of ``stat`` for the volumes' owners). ``build`` is pure: it turns those inventories into
spec data in the same shapes the resources compare, so that ``plan`` of the result shows no
changes for everything it kept. Whatever cannot be expressed exactly (a disk outside any dir
pool, an NFS mount whose server was not imported, a pool of another type) is left out and
named in ``notes``: an import never guesses, because a guess would be "drift" that ``apply``
then "repairs".
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvmstate import hostfacts, nfsexports, virt, virtxml
from kvmstate.errors import KvmstateError
from kvmstate.spec import is_valid_name
from kvmstate.transport.base import Transports
from kvmstate.transport.libvirt import REMOTE_SOCKET
from kvmstate.units import format_size

# --- what one host has -------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolInfo:
    name: str
    type: str
    path: str
    active: bool
    autostart: bool


@dataclass(frozen=True)
class VolumeInfo:
    pool: str
    name: str
    state: virtxml.VolumeState
    owner: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class DomainInfo:
    name: str
    state: virt.DomainState
    devices: tuple[str, ...]  # device element names in the persistent XML


@dataclass
class Inventory:
    """Everything ``import`` reads on one host."""

    host: str
    address: str
    fstab: list[hostfacts.FstabEntry] = field(default_factory=list)
    mounts: list[hostfacts.MountEntry] = field(default_factory=list)
    exports: list[nfsexports.ExportLine] = field(default_factory=list)
    pools: list[PoolInfo] = field(default_factory=list)
    volumes: list[VolumeInfo] = field(default_factory=list)
    domains: list[DomainInfo] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def list_libvirt(conn: Any) -> tuple[list[PoolInfo], list[VolumeInfo], list[DomainInfo]]:
    """Pools (with their volumes when active) and domains of one libvirt connection."""
    pools: list[PoolInfo] = []
    volumes: list[VolumeInfo] = []
    for pool in conn.listAllStoragePools(0):
        root = virtxml.parse_xml(pool.XMLDesc(0))
        name = pool.name()
        active = bool(pool.isActive())
        pools.append(
            PoolInfo(
                name,
                root.get("type", ""),
                virtxml.parse_pool_path(pool.XMLDesc(0)),
                active,
                bool(pool.autostart()),
            )
        )
        if active:
            for vol in pool.listAllVolumes(0):
                volumes.append(
                    VolumeInfo(name, vol.name(), virtxml.parse_volume_xml(vol.XMLDesc(0)))
                )
    domains: list[DomainInfo] = []
    for dom in conn.listAllDomains(0):
        st = virt.observe_domain(conn, dom.name())
        if st is None:  # undefined while we looked
            continue
        # the persistent definition's device kinds (only the tag names are kept)
        devices = virtxml.parse_xml(virt.inactive_xml(conn, dom.name())).find("devices")
        devs = tuple(el.tag for el in devices) if devices is not None else ()
        domains.append(DomainInfo(dom.name(), st, devs))
    return pools, volumes, domains


async def gather_host(transports: Transports, host: str, address: str) -> Inventory:
    shell = transports.shell(host)
    fstab_res, mountinfo_res, exports_res = await shell.run_many(
        [hostfacts.FSTAB.argv, hostfacts.MOUNTINFO.argv, hostfacts.EXPORTS.argv]
    )
    fstab_text = hostfacts.FSTAB.parse(fstab_res)
    mountinfo = hostfacts.MOUNTINFO.parse(mountinfo_res)
    exports_text = hostfacts.EXPORTS.parse(exports_res)
    notes: list[str] = []
    pools: list[PoolInfo] = []
    volumes: list[VolumeInfo] = []
    domains: list[DomainInfo] = []
    lv = transports.libvirt(host)
    try:
        pools, volumes, domains = await lv.run(list_libvirt, await lv.connect())
    except KvmstateError:
        # a host without libvirtd (the storage host) is fine; a broken libvirtd is not
        res = await shell.run(["test", "-S", REMOTE_SOCKET], check=False)
        if res.exit_status != 1:
            raise
        notes.append(f"{host}: no libvirtd socket ({REMOTE_SOCKET}): no pools or domains read")
    if volumes:
        stats = await shell.run_many(
            [hostfacts.stat_owner_fact(v.state.path).argv for v in volumes]
        )
        owned = []
        for v, res in zip(volumes, stats, strict=True):
            got = hostfacts.stat_owner_fact(v.state.path).parse(res)
            owner, group = got if got is not None else (None, None)
            owned.append(VolumeInfo(v.pool, v.name, v.state, owner, group))
        volumes = owned
    return Inventory(
        host,
        address,
        hostfacts.parse_fstab(fstab_text or ""),
        list(mountinfo),
        nfsexports.parse_exports(exports_text or ""),
        pools,
        volumes,
        domains,
        notes,
    )


async def gather(transports: Transports, hosts: Mapping[str, str]) -> list[Inventory]:
    """Every host read in parallel; the first host that cannot be read fails the import."""
    return list(await asyncio.gather(*(gather_host(transports, h, a) for h, a in hosts.items())))


# --- inventories -> spec data --------------------------------------------------------------------

_DOMAIN_STATES = {"running": "running", "shut-off": "shut-off"}
# devices the spec models (or libvirt adds to every guest by itself)
_MODELED_DEVICES = {"disk", "interface", "serial", "console", "emulator", "controller"}
_MODELED_DEVICES |= {"memballoon", "input", "rng", "audio"}


@dataclass
class Imported:
    """Spec data (plain dicts, in the spec's field order) plus what was left out and why."""

    data: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            k: {} for k in ("subvolumes", "exports", "mounts", "pools", "volumes", "domains")
        }
    )
    notes: list[str] = field(default_factory=list)

    def resources(self) -> list[tuple[str, str]]:
        return [(kind, name) for kind, items in self.data.items() for name in items]

    def skip(self, host: str, what: str, why: str) -> None:
        self.notes.append(f"{host}: {what} left out: {why}")


def _unique(name: str, taken: Iterable[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "imported"
    taken = set(taken)
    out, n = base, 2
    while out in taken or not is_valid_name(out):
        out = f"{base}-{n}"
        n += 1
    return out


def _subvolumes(inv: Inventory, out: Imported, existing: Existing) -> None:
    for e in inv.fstab:
        if e.fstype != "btrfs":
            continue
        sub = next((o.split("=", 1)[1] for o in e.options if o.startswith("subvol=")), None)
        if sub is None:
            continue  # a top-level mount: the filesystem itself, not a subvolume
        name = sub.strip("/")
        if (inv.host, name) in existing.subvolumes:
            continue
        if not is_valid_name(name) or name in out.data["subvolumes"]:
            out.skip(inv.host, f"subvolume {sub!r} on {e.mountpoint}", "not a usable spec name")
            continue
        mounted = hostfacts.mounted_at(inv.mounts, e.mountpoint)
        data: dict[str, Any] = {"host": inv.host, "device": e.source}
        if mounted is not None and mounted.fstype == "btrfs":
            top = next(
                (
                    m.mountpoint
                    for m in inv.mounts
                    if m.fstype == "btrfs" and m.source == mounted.source and m.root == "/"
                ),
                None,
            )
            if top is not None:
                data["toplevel"] = top
        data["mountpoint"] = e.mountpoint
        data["mount_options"] = [o for o in e.options if not o.startswith(("subvol=", "subvolid="))]
        out.data["subvolumes"][name] = data


def _exports(inv: Inventory, out: Imported, existing: Existing) -> dict[str, str]:
    """Import /etc/exports; returns {path: export name} for this host (imported or existing)."""
    names: dict[str, str] = {
        path: name for (h, path), name in existing.exports.items() if h == inv.host
    }
    for line in inv.exports:
        if line.path in names:
            continue
        clients = [{"network": c, "options": list(o)} for c, o in line.clients]
        if not clients:
            out.skip(inv.host, f"export {line.path}", "no clients")
            continue
        sub = next(
            (
                n
                for n, s in out.data["subvolumes"].items()
                if s["host"] == inv.host and s["mountpoint"] == line.path
            ),
            None,
        )
        taken = set(out.data["exports"]) | set(existing.names["exports"])
        name = sub if sub and sub not in taken else _unique(line.path.rsplit("/", 1)[-1], taken)
        out.data["exports"][name] = {"host": inv.host, "path": line.path, "clients": clients}
        names[line.path] = name
    return names


def _nfs_version(e: hostfacts.FstabEntry) -> tuple[str | None, list[str]]:
    vers = None
    rest = []
    for o in e.options:
        k, _, v = o.partition("=")
        if k in ("vers", "nfsvers"):
            vers = v
        else:
            rest.append(o)
    if vers is None and e.fstype == "nfs4":
        vers = "4"
    return vers, rest


def _mounts(invs: Sequence[Inventory], out: Imported, existing: Existing) -> None:
    by_addr = {i.address: i.host for i in invs} | {i.host: i.host for i in invs}
    exports = {i.host: _exports(i, out, existing) for i in invs}
    groups: dict[tuple[str, str, str, tuple[str, ...]], list[str]] = {}
    for inv in invs:
        for e in inv.fstab:
            if e.fstype not in ("nfs", "nfs4"):
                continue
            if (inv.host, e.mountpoint) in existing.mounts:
                continue
            server, _, path = e.source.rpartition(":")
            what = f"NFS mount {e.source} on {e.mountpoint}"
            host = by_addr.get(server.strip("[]"))
            if host is None:
                out.skip(inv.host, what, f"its server {server} is not among the imported hosts")
                continue
            export = next(
                (n for p, n in exports[host].items() if hostfacts.same_source(p, path)), None
            )
            if export is None:
                out.skip(inv.host, what, f"{host} has no /etc/exports line for {path}")
                continue
            vers, options = _nfs_version(e)
            if vers not in ("3", "4", "4.0", "4.1", "4.2"):
                out.skip(inv.host, what, "no vers= option kvmstate can keep (3, 4, 4.x)")
                continue
            groups.setdefault((export, e.mountpoint, vers, tuple(options)), []).append(inv.host)
    for (export, mountpoint, vers, opts), hosts in groups.items():
        taken = set(out.data["mounts"]) | set(existing.names["mounts"])
        name = export if export not in taken else _unique(export, taken)
        out.data["mounts"][name] = {
            "export": export,
            "hosts": hosts,
            "mountpoint": mountpoint,
            "nfs_version": vers,
            "options": list(opts),
        }


def _pools(invs: Sequence[Inventory], out: Imported, existing: Existing) -> None:
    for inv in invs:
        for p in inv.pools:
            what = f"pool {p.name}"
            if p.name in existing.names["pools"]:
                continue
            if p.type != "dir":
                out.skip(inv.host, what, f"type {p.type!r} (kvmstate manages dir pools)")
                continue
            if not is_valid_name(p.name):
                out.skip(inv.host, what, "not a usable spec name")
                continue
            have = out.data["pools"].get(p.name)
            if have is None:
                out.data["pools"][p.name] = {
                    "type": "dir",
                    "path": p.path,
                    "hosts": [inv.host],
                    "autostart": p.autostart,
                }
            elif have["path"] != p.path or have["autostart"] != p.autostart:
                out.skip(
                    inv.host,
                    what,
                    f"differs from the same pool on {have['hosts'][0]} (path or autostart)",
                )
            else:
                have["hosts"].append(inv.host)
            if not p.active:
                out.notes.append(f"{inv.host}: pool {p.name} is not active; apply will start it")


def _volumes(invs: Sequence[Inventory], out: Imported, existing: Existing) -> None:
    for inv in invs:
        for v in inv.volumes:
            pool = out.data["pools"].get(v.pool)
            if pool is None or v.name in existing.names["volumes"]:
                continue
            what = f"volume {v.name} in pool {v.pool}"
            have = out.data["volumes"].get(v.name)
            if have is not None:
                if have["pool"] != v.pool:
                    out.skip(inv.host, what, f"the name is taken by pool {have['pool']}'s volume")
                continue  # the same shared volume seen from another host of the pool
            if inv.host != pool["hosts"][0]:
                continue  # kvmstate reads a volume on its pool's first host
            if not is_valid_name(v.name):
                out.skip(inv.host, what, "not a usable spec name")
                continue
            if v.state.format not in ("qcow2", "raw") or v.state.capacity <= 0:
                out.skip(inv.host, what, f"format {v.state.format!r} (qcow2 or raw only)")
                continue
            data: dict[str, Any] = {
                "pool": v.pool,
                "format": v.state.format,
                "capacity": format_size(v.state.capacity),
            }
            if v.owner and v.group:
                data |= {"owner": v.owner, "group": v.group}
            out.data["volumes"][v.name] = data


def _disks(
    inv: Inventory, cfg: virtxml.DomainConfig, out: Imported
) -> tuple[list[dict[str, Any]] | None, str]:
    """The spec disks of a domain, or None and why not."""
    by_path = {}
    for vname, v in out.data["volumes"].items():
        pool = out.data["pools"][v["pool"]]
        if inv.host in pool["hosts"]:
            by_path[f"{pool['path'].rstrip('/')}/{vname}"] = (vname, v)
    disks = []
    for i, d in enumerate(cfg.disks):
        found = by_path.get(d.path)
        if found is None:
            return None, f"disk {d.path or '(no source)'} is not a volume of an imported dir pool"
        vname, vol = found
        if d.format != vol["format"]:
            return None, f"disk {d.path} is used as {d.format}, the volume is {vol['format']}"
        bus = d.bus or "virtio"
        if bus not in ("virtio", "sata", "scsi", "ide"):
            return None, f"disk {d.path} is on bus {bus!r}"
        cache = d.cache or "default"
        if cache not in ("none", "writeback", "writethrough", "directsync", "unsafe", "default"):
            return None, f"disk {d.path} has cache {cache!r}"
        disk: dict[str, Any] = {"volume": vname, "bus": bus, "cache": cache}
        prefix = {"virtio": "vd", "ide": "hd"}.get(bus, "sd")
        if d.target and d.target != f"{prefix}{chr(97 + i)}":
            disk["target"] = d.target
        disks.append(disk)
    return disks, ""


def _interfaces(cfg: virtxml.DomainConfig) -> tuple[list[dict[str, Any]] | None, str]:
    nics = []
    for n in cfg.nics:
        if n.kind not in ("bridge", "network") or not n.source:
            return None, f"an interface of type {n.kind!r} (bridge or network only)"
        if (n.model or "virtio") not in ("virtio", "e1000", "rtl8139"):
            return None, f"an interface of model {n.model!r}"
        nic: dict[str, Any] = {n.kind: n.source, "model": n.model or "virtio"}
        if n.mac:
            nic["mac"] = n.mac
        nics.append(nic)
    return nics, ""


def _domain(inv: Inventory, dom: DomainInfo, out: Imported) -> dict[str, Any] | str:
    """The spec of one domain, or why it cannot be expressed."""
    st, cfg = dom.state, dom.state.config
    if not st.persistent:
        return "transient (not defined persistently)"
    if cfg.type not in ("kvm", "qemu"):
        return f"domain type {cfg.type!r}"
    if st.state not in _DOMAIN_STATES:
        return f"it is {st.state} (running or shut-off only)"
    disks, why = _disks(inv, cfg, out)
    if disks is None:
        return why
    nics, why = _interfaces(cfg)
    if nics is None:
        return why
    if cfg.serial is not None and cfg.serial[0] not in ("pty", "file"):
        return f"a serial port of type {cfg.serial[0]!r}"
    data: dict[str, Any] = {
        "type": cfg.type,
        "memory": format_size(cfg.memory_kib * 1024),
        "vcpus": cfg.vcpus,
    }
    boot: dict[str, Any] = {}
    if cfg.firmware == "uefi":
        boot["firmware"] = "uefi"
    for key in ("kernel", "initrd", "cmdline"):
        if getattr(cfg, key):
            boot[key] = getattr(cfg, key)
    if boot:
        data["boot"] = boot
    if disks:
        data["disks"] = disks
    if nics:
        data["interfaces"] = nics
    if cfg.serial is not None:
        kind, path = cfg.serial
        data["serial"] = {"type": kind, **({"path": path} if path else {})}
    data |= {"state": _DOMAIN_STATES[st.state], "autostart": st.autostart, "host": inv.host}
    return data


def _domains(invs: Sequence[Inventory], out: Imported, existing: Existing) -> None:
    seen: dict[str, str] = {}
    for inv in invs:
        for dom in inv.domains:
            if dom.name in existing.names["domains"]:
                continue
            what = f"domain {dom.name}"
            if dom.name in seen:
                out.data["domains"].pop(dom.name, None)
                out.skip(inv.host, what, f"also defined on {seen[dom.name]}; undefine one first")
                continue
            seen[dom.name] = inv.host
            if not is_valid_name(dom.name):
                out.skip(inv.host, what, "not a usable spec name")
                continue
            got = _domain(inv, dom, out)
            if isinstance(got, str):
                out.skip(inv.host, what, got)
                continue
            out.data["domains"][dom.name] = got
            if not dom.state.config.managed:
                out.notes.append(
                    f"{inv.host}: domain {dom.name} was not created by kvmstate: plan shows it "
                    "as `managed: false -> true`; `apply --adopt` redefines it from the spec"
                )
            extra = sorted(set(dom.devices) - _MODELED_DEVICES)
            if extra:
                out.notes.append(
                    f"{inv.host}: domain {dom.name} has devices the spec does not describe "
                    f"({', '.join(extra)}); a redefinition by kvmstate would not keep them"
                )


@dataclass(frozen=True)
class Existing:
    """What a base spec already declares: imported duplicates of it are dropped."""

    names: Mapping[str, frozenset[str]]
    subvolumes: frozenset[tuple[str, str]] = frozenset()  # (host, name)
    exports: Mapping[tuple[str, str], str] = field(default_factory=dict)  # (host, path): name
    mounts: frozenset[tuple[str, str]] = frozenset()  # (host, mountpoint)

    @classmethod
    def of(cls, base: Mapping[str, Any] | None) -> Existing:
        base = base or {}
        kinds = ("subvolumes", "exports", "mounts", "pools", "volumes", "domains")
        sect = {k: dict(base.get(k) or {}) for k in kinds}
        return cls(
            {k: frozenset(v) for k, v in sect.items()},
            frozenset((s.get("host", ""), n) for n, s in sect["subvolumes"].items()),
            {(e.get("host", ""), e.get("path", "")): n for n, e in sect["exports"].items()},
            frozenset(
                (h, m.get("mountpoint", "")) for m in sect["mounts"].values() for h in m["hosts"]
            ),
        )


def build(invs: Sequence[Inventory], base: Mapping[str, Any] | None = None) -> Imported:
    """Spec data for ``invs``; resources the base spec already declares are not repeated."""
    existing = Existing.of(base)
    out = Imported(notes=[n for inv in invs for n in inv.notes])
    for inv in invs:
        _subvolumes(inv, out, existing)
    _mounts(invs, out, existing)  # imports the exports first: mounts name them
    _pools(invs, out, existing)
    _volumes(invs, out, existing)
    _domains(invs, out, existing)
    return out


def merged(base: Mapping[str, Any], imported: Imported) -> dict[str, Any]:
    """The base spec's data with the imported resources added to their sections."""
    data = dict(base)
    for kind, items in imported.data.items():
        if items:
            data[kind] = {**(base.get(kind) or {}), **items}
    return data


def render_yaml(data: Mapping[str, Any], notes: Sequence[str], header: str) -> str:
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _list(dumper: yaml.SafeDumper, value: list[Any]) -> Any:
        flow = all(isinstance(x, str | int | float | bool) for x in value)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)

    _Dumper.add_representer(list, _list)
    import textwrap

    lines = [f"# {header}"]
    if notes:
        lines.append("# Left out or worth knowing:")
        for n in notes:
            lines += textwrap.wrap(n, 78, initial_indent="#  - ", subsequent_indent="#    ")
    body = yaml.dump(dict(data), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=78)
    return "\n".join(lines) + "\n" + body
