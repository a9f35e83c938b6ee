"""Connections to the lab hosts' libvirtd. libvirt itself (the module, its silenced stderr
handler, the error codes) comes from ``kvmstate.transport.libvirt``, its one importer."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from kvmstate.transport.libvirt import is_not_found
from kvmstate.transport.libvirt import libvirt_module as _libvirt

log = logging.getLogger(__name__)


@contextlib.contextmanager
def connect(uri: str) -> Iterator[Any]:
    libvirt = _libvirt()
    conn = libvirt.open(uri)
    try:
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def lookup_domain(conn: Any, name: str) -> Any | None:
    try:
        return conn.lookupByName(name)
    except Exception as exc:
        if is_not_found(exc):
            return None
        raise


def clear_domains(conn: Any) -> list[str]:
    """Destroy and undefine every domain on ``conn``; returns their names."""
    libvirt = _libvirt()
    names = []
    for dom in conn.listAllDomains(0):
        names.append(dom.name())
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isActive():
                dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isPersistent():
                flags = libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                try:
                    dom.undefineFlags(flags)
                except libvirt.libvirtError:
                    dom.undefine()
    return names


def clear_pools(conn: Any) -> list[str]:
    """Stop and undefine every storage pool on ``conn`` (volumes' files are left alone)."""
    libvirt = _libvirt()
    names = []
    for pool in conn.listAllStoragePools(0):
        names.append(pool.name())
        with contextlib.suppress(libvirt.libvirtError):
            if pool.isActive():
                pool.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            pool.undefine()
    return names


def running_domains(conn: Any) -> list[str]:
    return [d.name() for d in conn.listAllDomains(1)]  # VIR_CONNECT_LIST_DOMAINS_ACTIVE


def clear_networks(conn: Any) -> list[str]:
    """Stop and undefine every network on ``conn`` (their dnsmasq exits with them)."""
    libvirt = _libvirt()
    names = []
    for net in conn.listAllNetworks(0):
        names.append(net.name())
        with contextlib.suppress(libvirt.libvirtError):
            if net.isActive():
                net.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            if net.isPersistent():
                net.undefine()
    return names
