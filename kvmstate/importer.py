"""``kvmstate import``: a spec for what already exists on some hosts.

Two halves. ``gather`` reads each host once, read-only (one batched shell round trip for
fstab, mountinfo and /etc/exports; one libvirt call listing pools, volumes, domains and
networks; one batch of ``stat`` for the volumes' owners). ``build`` is pure: it turns those
inventories into spec data in the same shapes the resources compare, so that ``plan`` of the
result shows no changes for everything it kept. Whatever cannot be expressed exactly (a disk
outside any dir pool, an NFS mount whose server was not imported, a pool of another type) is
left out and named in ``notes``: an import never guesses, because a guess would be "drift"
that ``apply`` then "repairs".
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from kvmstate import hostfacts, nfsexports, virt, virtxml
from kvmstate.errors import KvmstateError
from kvmstate.resources.base import Resource
from kvmstate.resources.imports import (
    DomainInfo,
    Existing,
    Imported,
    Inventory,
    NetworkInfo,
    PoolInfo,
    VolumeInfo,
)
from kvmstate.transport.base import Transports
from kvmstate.transport.libvirt import REMOTE_SOCKET

__all__ = [
    "DomainInfo",
    "Existing",
    "Imported",
    "Inventory",
    "PoolInfo",
    "VolumeInfo",
    "build",
    "gather",
    "merged",
    "render_yaml",
]

# --- what one host has -------------------------------------------------------------------------


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


def list_networks(conn: Any) -> list[NetworkInfo]:
    """The networks of one libvirt connection, observed as the network kind observes them."""
    out: list[NetworkInfo] = []
    for net in conn.listAllNetworks(0):
        st = virt.observe_network(conn, net.name())
        if st is not None:  # undefined while we looked
            out.append(NetworkInfo(net.name(), st))
    return out


def list_all(
    conn: Any,
) -> tuple[list[PoolInfo], list[VolumeInfo], list[DomainInfo], list[NetworkInfo]]:
    """``list_libvirt`` and ``list_networks`` in one call (one worker-thread hop)."""
    return (*list_libvirt(conn), list_networks(conn))


async def gather_host(
    transports: Transports,
    host: str,
    address: str,
    kinds: Sequence[type[Resource[Any]]] | None = None,
) -> Inventory:
    """Read one host: fstab, mountinfo and /etc/exports plus every kind's own import facts
    (``Resource.import_facts``) in one batched round trip; libvirt's pools, volumes and
    domains in one call; the volumes' owners in one more batch."""
    from kvmstate.resources import KINDS

    extra = list(
        {f.name: f for k in (KINDS if kinds is None else kinds) for f in k.import_facts()}.values()
    )
    shell = transports.shell(host)
    fstab_res, mountinfo_res, exports_res, *extra_res = await shell.run_many(
        [hostfacts.FSTAB.argv, hostfacts.MOUNTINFO.argv, hostfacts.EXPORTS.argv]
        + [f.argv for f in extra]
    )
    facts = {f.name: f.parse(res) for f, res in zip(extra, extra_res, strict=True)}
    fstab_text = hostfacts.FSTAB.parse(fstab_res)
    mountinfo = hostfacts.MOUNTINFO.parse(mountinfo_res)
    exports_text = hostfacts.EXPORTS.parse(exports_res)
    notes: list[str] = []
    pools: list[PoolInfo] = []
    volumes: list[VolumeInfo] = []
    domains: list[DomainInfo] = []
    networks: list[NetworkInfo] = []
    lv = transports.libvirt(host)
    try:
        pools, volumes, domains, networks = await lv.run(list_all, await lv.connect())
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
        facts,
        networks,
    )


async def gather(
    transports: Transports,
    hosts: Mapping[str, str],
    kinds: Sequence[type[Resource[Any]]] | None = None,
) -> list[Inventory]:
    """Every host read in parallel; the first host that cannot be read fails the import."""
    return list(
        await asyncio.gather(*(gather_host(transports, h, a, kinds) for h, a in hosts.items()))
    )


# --- inventories -> spec data --------------------------------------------------------------------


def build(
    invs: Sequence[Inventory],
    base: Mapping[str, Any] | None = None,
    kinds: Sequence[type[Resource[Any]]] | None = None,
) -> Imported:
    """Spec data for ``invs``: each registered kind imports its own section, in kind order
    (a mount names the exports imported before it); what the base spec already declares is
    not repeated. Kinds that cannot be imported say why (``Resource.cannot_import``)."""
    from kvmstate.resources import KINDS

    importable = [k for k in (KINDS if kinds is None else kinds) if k.cannot_import is None]
    out = Imported(
        data={k.section: {} for k in importable},
        notes=[n for inv in invs for n in inv.notes],
    )
    existing = Existing(base or {})
    for kind in importable:
        kind.import_into(invs, out, existing)
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
