"""A private libvirtd for B3 (``kvmstate.lab.private_libvirtd``: its own mount + network
namespace, nothing of the machine's or the lab's libvirt touched), preloaded with the pools,
volumes and (shut-off) domains the simulated spec asks for, built with kvmstate's own XML
builders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvmstate.lab.private_libvirtd import private_libvirtd, unavailable

__all__ = ["available", "preload", "private_libvirtd"]


def available() -> str | None:
    """Why a private libvirtd cannot run here (None: it can)."""
    why = unavailable()
    if why is not None:
        return why
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "needs libvirt-python"
    return None


def preload(sock: str, spec: Any) -> dict[str, int]:
    """Define/start/autostart every pool, create every volume, define every domain (shut off,
    no autostart) of ``spec`` in the private libvirtd. Idempotent."""
    import libvirt

    from kvmstate import virt
    from kvmstate.resources.domain import disk_sources
    from kvmstate.transport.libvirt import unix_uri
    from kvmstate.virtxml import build_domain_xml, desired_config

    conn = libvirt.open(unix_uri(sock))
    counts = {"pools": 0, "volumes": 0, "domains": 0}
    try:
        have_pools = set(conn.listStoragePools()) | set(conn.listDefinedStoragePools())
        for name, p in spec.pools.items():
            Path(p.path).mkdir(parents=True, exist_ok=True)
            if name not in have_pools:
                virt.define_pool(conn, name, p.path)
                virt.start_pool(conn, name)
                virt.set_pool_autostart(conn, name, p.autostart)
                counts["pools"] += 1
        for name, v in spec.volumes.items():
            pool = conn.storagePoolLookupByName(v.pool)
            if name not in pool.listVolumes():
                virt.create_volume(conn, v.pool, name, v.format, v.capacity)
                counts["volumes"] += 1
        have_doms = {d.name() for d in conn.listAllDomains(0)}
        for name, d in spec.domains.items():
            if name not in have_doms:
                want = desired_config(d, disk_sources(spec, d))
                virt.define_domain(conn, build_domain_xml(name, want))
                counts["domains"] += 1
    finally:
        conn.close()
    return counts
