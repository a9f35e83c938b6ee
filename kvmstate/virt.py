"""What resources do with libvirt: lookups, observations and mutations of pools, volumes and
domains, and the migration helpers (at the end).

Everything here is synchronous and is called by resources through ``Libvirt.run`` (a worker
thread). This module does not import ``libvirt``: the module (its flags, its exception class)
comes from ``kvmstate.transport.libvirt.libvirt_module()``, the one importer, and so do the
error codes. Lookups turn "no such domain/pool/volume" into ``None`` (``is_not_found``). XML is
built from the typed spec with ``xml.etree`` and parsed back into small frozen values; raw XML
is never compared. Pure XML building/parsing lives in ``kvmstate.virtxml``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kvmstate.errors import KvmstateError
from kvmstate.transport.libvirt import VIR_ERR_NO_DOMAIN as NO_DOMAIN
from kvmstate.transport.libvirt import VIR_ERR_NO_STORAGE_POOL as NO_POOL
from kvmstate.transport.libvirt import VIR_ERR_NO_STORAGE_VOL as NO_VOLUME
from kvmstate.transport.libvirt import VIR_ERR_NO_SUPPORT as NO_SUPPORT
from kvmstate.transport.libvirt import VIR_ERR_OPERATION_INVALID as OPERATION_INVALID
from kvmstate.transport.libvirt import is_not_found
from kvmstate.transport.libvirt import libvirt_module as _libvirt
from kvmstate.virtxml import (
    NS,
    CpuConfig,
    DomainConfig,
    NetworkConfig,
    VolumeState,
    cpu_xml,
    network_xml,
    parse_cpu,
    parse_domain_xml,
    parse_network_xml,
    parse_pool_path,
    parse_volume_xml,
    parse_xml,
    pool_xml,
    volume_xml,
)

# the short names of libvirt's error codes are kvmstate.transport.libvirt's, re-exported
__all__ = [
    "NO_DOMAIN",
    "NO_POOL",
    "NO_SUPPORT",
    "NO_VOLUME",
    "NS",
    "OPERATION_INVALID",
    "DomainConfig",
    "VolumeState",
]

log = logging.getLogger(__name__)


@functools.cache
def _states() -> dict[int, str]:
    lv = _libvirt()
    return {
        lv.VIR_DOMAIN_RUNNING: "running",
        lv.VIR_DOMAIN_BLOCKED: "running",
        lv.VIR_DOMAIN_PAUSED: "paused",
        lv.VIR_DOMAIN_SHUTDOWN: "shutting-down",
        lv.VIR_DOMAIN_SHUTOFF: "shut-off",
        lv.VIR_DOMAIN_CRASHED: "crashed",
        lv.VIR_DOMAIN_PMSUSPENDED: "suspended",
    }


def _lookup(fn: Any, name: str) -> Any:
    try:
        return fn(name)
    except Exception as e:
        if is_not_found(e):
            return None
        raise


def lookup_domain(conn: Any, name: str) -> Any:
    return _lookup(conn.lookupByName, name)


def lookup_pool(conn: Any, name: str) -> Any:
    return _lookup(conn.storagePoolLookupByName, name)


def lookup_volume(pool: Any, name: str) -> Any:
    return _lookup(pool.storageVolLookupByName, name)


# --- pools -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolState:
    path: str
    active: bool
    autostart: bool
    volumes: frozenset[str]


def observe_pool(conn: Any, name: str) -> PoolState | None:
    pool = lookup_pool(conn, name)
    if pool is None:
        return None
    active = bool(pool.isActive())
    # listAllVolumes is one call (listVolumes is two: the count, then the names); a volume
    # object's name() is local
    vols = frozenset(v.name() for v in pool.listAllVolumes(0)) if active else frozenset()
    return PoolState(parse_pool_path(pool.XMLDesc(0)), active, bool(pool.autostart()), vols)


def define_pool(conn: Any, name: str, path: str) -> None:
    conn.storagePoolDefineXML(pool_xml(name, path), 0)


def start_pool(conn: Any, name: str) -> None:
    pool = conn.storagePoolLookupByName(name)
    if not pool.isActive():
        pool.create(0)


def set_pool_autostart(conn: Any, name: str, on: bool) -> None:
    conn.storagePoolLookupByName(name).setAutostart(1 if on else 0)


def undefine_pool(conn: Any, name: str) -> None:
    pool = lookup_pool(conn, name)
    if pool is not None:
        if pool.isActive():
            pool.destroy()
        pool.undefine()


def refresh_pool(conn: Any, name: str, wait: float = 600.0) -> bool:
    """Rescan an active pool's directory; False when the pool is missing or inactive.

    libvirt refuses to refresh a pool while one of its asynchronous jobs runs (an upload
    stream into one of its volumes: seen on the lab when a seed and a disk image were uploaded
    into the same pool at once): this waits for the job to end, up to ``wait`` seconds.
    Blocking: call it through ``Libvirt.run``."""
    pool = lookup_pool(conn, name)
    if pool is None or not pool.isActive():
        return False
    deadline = time.monotonic() + wait
    while True:
        try:
            pool.refresh(0)
            return True
        except _libvirt().libvirtError as e:
            if "asynchronous jobs running" not in str(e) or time.monotonic() > deadline:
                raise
        time.sleep(0.2)


# --- volumes -----------------------------------------------------------------------------------


def pool_is_active(conn: Any, name: str) -> bool | None:
    """None when the pool is not defined."""
    pool = lookup_pool(conn, name)
    return None if pool is None else bool(pool.isActive())


def observe_volume(conn: Any, pool_name: str, name: str) -> VolumeState | None:
    """None when the pool is missing or inactive (check ``pool_is_active`` to tell apart)."""
    pool = lookup_pool(conn, pool_name)
    if pool is None:
        return None
    try:
        vol = pool.storageVolLookupByName(name)
    except _libvirt().libvirtError as e:
        # missing, or the pool is not active (asked of the lookup, not in a call of its own)
        if e.get_error_code() in (NO_VOLUME, OPERATION_INVALID):
            return None
        raise
    return parse_volume_xml(vol.XMLDesc(0))


def create_volume(conn: Any, pool_name: str, name: str, fmt: str, capacity: int) -> None:
    conn.storagePoolLookupByName(pool_name).createXML(volume_xml(name, fmt, capacity), 0)


def create_upload_target(conn: Any, pool_name: str, name: str, length: int) -> None:
    """A sparse raw volume of ``length`` bytes for an upload to fill; libvirt reads the format
    of what was sent when the pool is refreshed."""
    xml = volume_xml(name, "raw", length, allocation=0)
    conn.storagePoolLookupByName(pool_name).createXML(xml, 0)


def create_overlay(
    conn: Any, pool_name: str, name: str, capacity: int, base_path: str, base_format: str
) -> None:
    """A qcow2 overlay (linked clone) on ``base_path``, ``capacity`` bytes (may exceed the
    base's: the guest sees the larger disk at once)."""
    xml = volume_xml(name, "qcow2", capacity, (base_path, base_format))
    conn.storagePoolLookupByName(pool_name).createXML(xml, 0)


def clone_volume(conn: Any, pool_name: str, name: str, fmt: str, base_pool: str, base: str) -> None:
    """A full copy of volume ``base`` (libvirt's createXMLFrom), at the base's capacity."""
    src = conn.storagePoolLookupByName(base_pool).storageVolLookupByName(base)
    capacity = parse_volume_xml(src.XMLDesc(0)).capacity
    conn.storagePoolLookupByName(pool_name).createXMLFrom(volume_xml(name, fmt, capacity), src, 0)


def upload_volume(
    conn: Any, pool_name: str, name: str, chunks: Iterable[bytes], length: int
) -> int:
    """Send ``length`` bytes into the volume through libvirt's upload stream (virStream over
    the connection's own RPC channel); blocks until libvirt has them all. Returns the bytes
    sent; a short source aborts the stream and raises ``ValueError``."""
    vol = conn.storagePoolLookupByName(pool_name).storageVolLookupByName(name)
    stream = conn.newStream(0)
    vol.upload(stream, 0, length, 0)
    sent = 0
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                n = stream.send(bytes(view))
                if n < 0:  # -2: would block (non-blocking streams only); try again
                    continue
                view = view[n:]
                sent += n
        if sent != length:
            raise ValueError(f"the source gave {sent} bytes, {length} were announced")
        stream.finish()
    except BaseException:
        with contextlib.suppress(Exception):
            stream.abort()
        raise
    return sent


def overlays_of(conn: Any, pool_name: str, path: str) -> list[str]:
    """The volumes of a pool whose qcow2 backing file is ``path`` (its linked clones)."""
    pool = lookup_pool(conn, pool_name)
    if pool is None or not pool.isActive():
        return []
    out = []
    for vol in pool.listAllVolumes(0):
        if parse_volume_xml(vol.XMLDesc(0)).backing == path:
            out.append(vol.name())
    return sorted(out)


def resize_volume(conn: Any, pool_name: str, name: str, capacity: int) -> None:
    vol = conn.storagePoolLookupByName(pool_name).storageVolLookupByName(name)
    vol.resize(capacity, 0)


def delete_volume(conn: Any, pool_name: str, name: str) -> None:
    pool = lookup_pool(conn, pool_name)
    vol = None if pool is None else lookup_volume(pool, name)
    if vol is not None:
        vol.delete(0)


# --- domains -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainState:
    config: DomainConfig  # persistent definition
    live: DomainConfig | None  # running definition (None when not running)
    state: str
    autostart: bool
    persistent: bool
    reason: str = ""  # why it is paused or crashed ("migration", "ioerror", "user"...)


def domain_state_name(code: int) -> str:
    return _states().get(code, "other")


@functools.cache
def _pause_reasons() -> dict[int, str]:
    """libvirt's reasons of a paused domain (VIR_DOMAIN_PAUSED_*), by the names users see."""
    lv = _libvirt()
    prefix = "VIR_DOMAIN_PAUSED_"
    return {
        getattr(lv, n): n.removeprefix(prefix).lower().replace("_", "-")
        for n in dir(lv)
        if n.startswith(prefix) and n != f"{prefix}LAST"
    }


def domain_state_reason(code: int, reason: int) -> str:
    """The reason of state ``code`` as a word: only paused domains' reasons are named."""
    if domain_state_name(code) != "paused":
        return ""
    return _pause_reasons().get(reason, "unknown")


def observe_domain(conn: Any, name: str) -> DomainState | None:
    dom = lookup_domain(conn, name)
    if dom is None:
        return None
    code, why = dom.state()[:2]
    state = domain_state_name(code)
    # The current definition tells by itself whether the domain is active (only a running
    # definition carries an id), so a shut-off domain costs one definition call, not three.
    current = dom.XMLDesc(0)
    if _LIVE_XML.match(current):
        live = parse_domain_xml(current)
        config = parse_domain_xml(dom.XMLDesc(_libvirt().VIR_DOMAIN_XML_INACTIVE))
    else:
        live, config = None, parse_domain_xml(current)
    return DomainState(
        config,
        live,
        state,
        bool(dom.autostart()),
        bool(dom.isPersistent()),
        domain_state_reason(code, why),
    )


# the root element of an ACTIVE domain's definition: <domain type='kvm' id='3'>
_LIVE_XML = re.compile(r"""\s*<domain\b[^>]*\sid=['"]\d+['"]""")


def define_domain(conn: Any, xml: str) -> None:
    """Define (or redefine) a domain. A redefinition must carry the existing UUID, or libvirt
    refuses it ("already exists with uuid")."""
    root = parse_xml(xml)
    existing = lookup_domain(conn, _name_of(root))
    if existing is not None and root.find("uuid") is None:
        uuid = ET.Element("uuid")
        uuid.text = existing.UUIDString()
        root.insert(1, uuid)
        xml = ET.tostring(root, encoding="unicode")
    conn.defineXML(xml)


def _name_of(root: ET.Element) -> str:
    el = root.find("name")
    if el is None or not el.text:
        raise ValueError("domain XML without a name")
    return el.text


def start_domain(conn: Any, name: str) -> None:
    dom = conn.lookupByName(name)
    if not dom.isActive():
        dom.create()


def resume_domain(conn: Any, name: str) -> None:
    dom = conn.lookupByName(name)
    if domain_state_name(dom.state()[0]) == "paused":
        dom.resume()


def destroy_domain(conn: Any, name: str) -> None:
    dom = lookup_domain(conn, name)
    if dom is not None and dom.isActive():
        dom.destroy()


def shutdown_domain(conn: Any, name: str, agent: bool) -> bool:
    """Ask the guest to power itself off: the guest agent first when the domain has one
    (``agent``), the ACPI power button otherwise or when the agent does not answer (libvirt
    tries them in that order). Returns at once, before the guest is off; False when the
    domain was not running."""
    dom = lookup_domain(conn, name)
    if dom is None or not dom.isActive():
        return False
    lv = _libvirt()
    flags = lv.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN
    if agent:
        flags |= lv.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT
    dom.shutdownFlags(flags)
    return True


def domain_state(conn: Any, name: str) -> str | None:
    """The domain's state name (``running``, ``shut-off``...), None when not defined."""
    dom = lookup_domain(conn, name)
    return None if dom is None else domain_state_name(dom.state()[0])


def set_domain_autostart(conn: Any, name: str, on: bool) -> None:
    conn.lookupByName(name).setAutostart(1 if on else 0)


def undefine_domain(conn: Any, name: str) -> None:
    dom = lookup_domain(conn, name)
    if dom is None:
        return
    if dom.isActive():
        dom.destroy()
    lv = _libvirt()
    flags = lv.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | lv.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    try:
        dom.undefineFlags(flags)
    except lv.libvirtError as e:
        if e.get_error_code() != NO_SUPPORT:
            raise
        dom.undefine()


def inactive_xml(conn: Any, name: str) -> str:
    lv = _libvirt()
    flags = lv.VIR_DOMAIN_XML_INACTIVE | lv.VIR_DOMAIN_XML_SECURE
    return str(conn.lookupByName(name).XMLDesc(flags))


# --- migration ---------------------------------------------------------------------------------

_PROGRESS_KEYS = (
    "time_elapsed",
    "data_processed",
    "data_remaining",
    "data_total",
    "memory_processed",
    "memory_remaining",
    "memory_total",
    "memory_iteration",
    "memory_dirty_rate",
    "memory_bps",
    "downtime",
    "setup_time",
)


def migration_flags(
    live: bool, *, auto_converge: bool, postcopy: bool, parallel: bool, compressed: bool
) -> int:
    lv = _libvirt()
    flags: int = int(
        lv.VIR_MIGRATE_PERSIST_DEST | lv.VIR_MIGRATE_UNDEFINE_SOURCE | lv.VIR_MIGRATE_ABORT_ON_ERROR
    )
    if live:
        flags |= lv.VIR_MIGRATE_LIVE
    if auto_converge:
        flags |= lv.VIR_MIGRATE_AUTO_CONVERGE
    if postcopy:
        flags |= lv.VIR_MIGRATE_POSTCOPY
    if parallel:
        flags |= lv.VIR_MIGRATE_PARALLEL
    if compressed:
        flags |= lv.VIR_MIGRATE_COMPRESSED
    return flags


def migration_params(bandwidth_bytes: int | None, parallel: int | None) -> dict[str, Any]:
    lv = _libvirt()
    params: dict[str, Any] = {}
    if bandwidth_bytes:
        params[lv.VIR_MIGRATE_PARAM_BANDWIDTH] = max(1, bandwidth_bytes // (1024 * 1024))
    if parallel:
        params[lv.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = parallel
    return params


def migrate(src: Any, dst: Any, name: str, params: dict[str, Any], flags: int) -> None:
    """Blocks until the migration completes or fails (run it in a worker thread)."""
    src.lookupByName(name).migrate3(dst, params, flags)


def job_progress(conn: Any, name: str) -> dict[str, Any] | None:
    """The running job's statistics, or None when there is no job (or no support)."""
    lv = _libvirt()
    try:
        stats = conn.lookupByName(name).jobStats(0)
    except lv.libvirtError as e:
        if e.get_error_code() in (NO_SUPPORT, NO_DOMAIN, OPERATION_INVALID):
            return None
        raise
    if not stats or stats.get("type") in (None, lv.VIR_DOMAIN_JOB_NONE):
        return None
    return {k: stats[k] for k in _PROGRESS_KEYS if k in stats}


def completed_job(conn: Any, name: str) -> dict[str, Any]:
    """Statistics of the finished migration, read on the destination; kept there for
    ``virsh domjobinfo --completed`` (reading them without KEEP_COMPLETED discards them)."""
    lv = _libvirt()
    flags = lv.VIR_DOMAIN_JOB_STATS_COMPLETED | lv.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
    try:
        stats = conn.lookupByName(name).jobStats(flags)
    except lv.libvirtError as e:
        log.debug("no completed job statistics for %s: %s", name, e)
        return {}
    return {k: stats[k] for k in _PROGRESS_KEYS if k in stats}


def abort_job(conn: Any, name: str) -> None:
    dom = lookup_domain(conn, name)
    if dom is not None:
        try:
            dom.abortJob()
        except _libvirt().libvirtError as e:
            log.warning("abortJob(%s): %s", name, e)


def set_max_downtime(conn: Any, name: str, ms: int) -> None:
    conn.lookupByName(name).migrateSetMaxDowntime(ms, 0)


def start_postcopy(conn: Any, name: str) -> bool:
    """Switch the running migration to post-copy; True once libvirt accepted it."""
    conn.lookupByName(name).migrateStartPostCopy(0)
    return True


def hypervisor_version(conn: Any) -> int:
    """The hypervisor's version as libvirt encodes it (QEMU 7.2.0 -> 7002000)."""
    return int(conn.getVersion())


class NoCpuCaps(KvmstateError):
    """The libvirt driver reports no domain capabilities (libvirt's test driver)."""


@dataclass(frozen=True)
class CpuCaps:
    """What a host's ``getDomainCapabilities`` says of guest CPUs for one virt type: the
    emulator, arch, machine and virt type that ``baselineHypervisorCPU`` and
    ``compareHypervisorCPU`` take, the modes it supports, and its host-model CPU (as the
    ``<cpu>`` XML the baseline is fed, and parsed)."""

    emulator: str | None
    arch: str | None
    machine: str | None
    virttype: str
    modes: frozenset[str]
    host_model_xml: str | None
    host_model: CpuConfig | None


def cpu_caps(conn: Any, virttype: str) -> CpuCaps:
    """The host's guest-CPU capabilities for ``virttype`` (kvm | qemu); raises
    ``NoCpuCaps`` when the driver cannot tell (libvirt's test driver)."""
    lv = _libvirt()
    try:
        xml = conn.getDomainCapabilities(None, None, None, virttype, 0)
    except lv.libvirtError as e:
        if e.get_error_code() == NO_SUPPORT:
            raise NoCpuCaps(
                "the libvirt driver does not report domain capabilities "
                "(getDomainCapabilities): no CPU baseline or comparison here"
            ) from e
        raise
    root = parse_xml(xml)
    modes = frozenset(
        m.get("name", "") for m in root.findall("cpu/mode") if m.get("supported") == "yes"
    )
    hm = root.find("cpu/mode[@name='host-model']")
    host_xml = None
    if hm is not None and hm.get("supported") == "yes":
        cpu = ET.Element("cpu", mode="custom", match="exact")
        for child in hm:
            if child.tag in ("model", "vendor", "feature"):
                cpu.append(child)
        host_xml = ET.tostring(cpu, encoding="unicode")
    return CpuCaps(
        root.findtext("path"),
        root.findtext("arch"),
        root.findtext("machine"),
        virttype,
        modes,
        host_xml,
        parse_cpu(hm) if host_xml else None,
    )


def baseline_cpu(conn: Any, caps: CpuCaps, host_cpus: Sequence[str]) -> CpuConfig:
    """libvirt's ``baselineHypervisorCPU`` of the hosts' host-model CPUs (``<cpu>`` XML), for
    the emulator/arch/machine/virt type of ``caps``: the newest CPU all of them can run."""
    got = conn.baselineHypervisorCPU(
        caps.emulator, caps.arch, caps.machine, caps.virttype, list(host_cpus), 0
    )
    cpu = parse_cpu(parse_xml(got))
    if cpu is None or cpu.model is None:
        raise KvmstateError(f"baselineHypervisorCPU gave no CPU model: {got[:200]}")
    return cpu


def compare_cpu(conn: Any, caps: CpuCaps, cpu: CpuConfig) -> tuple[bool | None, str]:
    """Can this host run ``cpu`` (``compareHypervisorCPU``, failing on an incompatible CPU so
    that libvirt names the features the host lacks)? None: libvirt cannot compare it
    (host-passthrough, host-model: the host's own CPU)."""
    if cpu.mode != "custom":
        return None, f"{cpu.mode}: the host's own CPU (no model to compare)"
    lv = _libvirt()
    try:
        res = conn.compareHypervisorCPU(
            caps.emulator,
            caps.arch,
            caps.machine,
            caps.virttype,
            cpu_xml(cpu),
            lv.VIR_CONNECT_COMPARE_CPU_FAIL_INCOMPATIBLE,
        )
    except lv.libvirtError as e:
        if e.get_error_code() == lv.VIR_ERR_CPU_INCOMPATIBLE:
            msg = str(e.get_error_message() or e)
            msg = msg.split("host CPU: ", 1)[-1]
            return False, f"{_cpu_name(cpu)}: {msg}"
        raise
    ok = res in (lv.VIR_CPU_COMPARE_IDENTICAL, lv.VIR_CPU_COMPARE_SUPERSET)
    return ok, f"{_cpu_name(cpu)} runs here" if ok else f"{_cpu_name(cpu)} incompatible"


def _cpu_name(cpu: CpuConfig) -> str:
    """A short name for a check's detail: a baseline lists dozens of features."""
    n = len(cpu.features)
    return cpu.describe() if n <= 4 else f"{cpu.model} (+{n} feature policies)"


def cpu_compatible(src: Any, dst: Any, name: str) -> tuple[bool | None, str]:
    """Is the domain's guest CPU (its current definition on ``src``) usable on ``dst``?
    (None: cannot tell: no CPU model, or the driver cannot compare)."""
    root = parse_xml(src.lookupByName(name).XMLDesc(0))
    cpu = parse_cpu(root.find("cpu"))
    if cpu is None or cpu.mode != "custom" or cpu.model is None:
        return None, "no CPU model in use (the hypervisor's default or the host's CPU)"
    try:
        caps = cpu_caps(dst, root.get("type") or "kvm")
    except NoCpuCaps as e:
        return None, str(e)
    return compare_cpu(dst, caps, cpu)


def volume_visible(conn: Any, pool_name: str, name: str) -> bool:
    pool = lookup_pool(conn, pool_name)
    return bool(pool is not None and pool.isActive() and lookup_volume(pool, name) is not None)


def open_connection(uri: str) -> Any:
    return _libvirt().open(uri)


def users_of_path(conn: Any, path: str) -> list[str]:
    """Active pools and running domains whose storage is under ``path`` (what an unmount
    would pull the floor from under)."""
    prefix = path.rstrip("/") + "/"
    users = []
    for pool in conn.listAllStoragePools(0):
        p = parse_pool_path(pool.XMLDesc(0))
        if pool.isActive() and (p == path or p.startswith(prefix)):
            users.append(f"active pool {pool.name()}")
    for dom in conn.listAllDomains(_libvirt().VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        for disk in parse_domain_xml(dom.XMLDesc(0)).disks:
            if disk.path == path or disk.path.startswith(prefix):
                users.append(f"running domain {dom.name()}")
                break
    return users


def running_memory(conn: Any) -> dict[str, int]:
    """{domain: bytes of its maximum memory} for every running domain (incoming ones too)."""
    return {
        dom.name(): int(dom.maxMemory()) * 1024
        for dom in conn.listAllDomains(_libvirt().VIR_CONNECT_LIST_DOMAINS_ACTIVE)
    }


def set_live_memory(conn: Any, name: str, kib: int) -> None:
    conn.lookupByName(name).setMemoryFlags(kib, _libvirt().VIR_DOMAIN_AFFECT_LIVE)


def set_live_vcpus(conn: Any, name: str, n: int) -> None:
    conn.lookupByName(name).setVcpusFlags(n, _libvirt().VIR_DOMAIN_AFFECT_LIVE)


# --- networks ----------------------------------------------------------------------------------

# libvirt's virErrorNumber for an invalid argument (the test driver's answer to an
# unsupported XMLDesc flag)
_INVALID_ARG = 8


@dataclass(frozen=True)
class NetworkState:
    config: NetworkConfig  # the persistent definition (the live one for a transient network)
    live: NetworkConfig | None  # the running definition (None when not active)
    active: bool
    autostart: bool
    persistent: bool


def lookup_network(conn: Any, name: str) -> Any:
    return _lookup(conn.networkLookupByName, name)


def _persistent_xml(net: Any) -> str:
    lv = _libvirt()
    try:
        return str(net.XMLDesc(lv.VIR_NETWORK_XML_INACTIVE))
    except lv.libvirtError as e:  # libvirt's test driver knows no flags here
        if e.get_error_code() not in (NO_SUPPORT, _INVALID_ARG):
            raise
        return str(net.XMLDesc(0))


def observe_network(conn: Any, name: str) -> NetworkState | None:
    net = lookup_network(conn, name)
    if net is None:
        return None
    active, persistent = bool(net.isActive()), bool(net.isPersistent())
    live = parse_network_xml(net.XMLDesc(0)) if active else None
    config = parse_network_xml(_persistent_xml(net)) if persistent or live is None else live
    autostart = bool(net.autostart()) if persistent else False
    return NetworkState(config, live, active, autostart, persistent)


def define_network(conn: Any, name: str, config: NetworkConfig) -> None:
    """Define (or redefine) a network; a redefinition keeps the network's UUID."""
    existing = lookup_network(conn, name)
    uuid = existing.UUIDString() if existing is not None else None
    conn.networkDefineXML(network_xml(name, config, uuid))


def start_network(conn: Any, name: str) -> None:
    net = conn.networkLookupByName(name)
    if not net.isActive():
        net.create()


def stop_network(conn: Any, name: str) -> None:
    net = lookup_network(conn, name)
    if net is not None and net.isActive():
        net.destroy()


def set_network_autostart(conn: Any, name: str, on: bool) -> None:
    conn.networkLookupByName(name).setAutostart(1 if on else 0)


def undefine_network(conn: Any, name: str) -> None:
    net = lookup_network(conn, name)
    if net is None:
        return
    if net.isActive():
        net.destroy()
    if net.isPersistent():
        net.undefine()


@dataclass(frozen=True)
class DhcpEdit:
    """One ``virNetworkUpdate`` of the first IPv4 address's DHCP: add or delete a static
    host or a range (``xml`` is the element)."""

    command: str  # add | delete
    section: str  # host | range
    xml: str


def update_network_dhcp(conn: Any, name: str, edits: Sequence[DhcpEdit], live: bool) -> None:
    """Apply ``edits`` to the persistent definition, or to the running network (``live``):
    DHCP hosts and ranges change without restarting the network or its guests."""
    lv = _libvirt()
    net = conn.networkLookupByName(name)
    commands = {
        "add": lv.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST,
        "delete": lv.VIR_NETWORK_UPDATE_COMMAND_DELETE,
    }
    sections = {
        "host": lv.VIR_NETWORK_SECTION_IP_DHCP_HOST,
        "range": lv.VIR_NETWORK_SECTION_IP_DHCP_RANGE,
    }
    flags = lv.VIR_NETWORK_UPDATE_AFFECT_LIVE if live else lv.VIR_NETWORK_UPDATE_AFFECT_CONFIG
    for e in edits:
        net.update(commands[e.command], sections[e.section], -1, e.xml, flags)


def network_users(conn: Any, name: str) -> list[str]:
    """The running domains with an interface on network ``name`` (their live definitions)."""
    users = []
    for dom in conn.listAllDomains(_libvirt().VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        nics = parse_domain_xml(dom.XMLDesc(0)).nics
        if any(n.kind == "network" and n.source == name for n in nics):
            users.append(str(dom.name()))
    return sorted(users)


def network_taps(conn: Any, name: str) -> tuple[str | None, list[str]]:
    """The bridge of active network ``name`` (None when it is not active) and the tap devices
    of running domains' interfaces on it (from their live definitions)."""
    net = lookup_network(conn, name)
    if net is None or not net.isActive():
        return None, []
    taps = []
    for dom in conn.listAllDomains(_libvirt().VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        for iface in parse_xml(dom.XMLDesc(0)).findall("devices/interface[@type='network']"):
            src, target = iface.find("source"), iface.find("target")
            if src is not None and src.get("network") == name and target is not None:
                dev = target.get("dev")
                if dev:
                    taps.append(dev)
    return str(net.bridgeName()), sorted(taps)


def network_is_active(conn: Any, name: str) -> bool | None:
    """None when the network is not defined."""
    net = lookup_network(conn, name)
    return None if net is None else bool(net.isActive())


def domain_addresses(conn: Any, name: str) -> list[str]:
    """The IP addresses of running domain ``name`` that its networks' DHCP servers leased
    (libvirt's lease source; empty when there are none or libvirt cannot tell)."""
    lv = _libvirt()
    dom = lookup_domain(conn, name)
    if dom is None:
        return []
    try:
        ifaces = dom.interfaceAddresses(lv.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0)
    except lv.libvirtError:
        return []
    return sorted({str(a["addr"]) for i in (ifaces or {}).values() for a in i.get("addrs") or []})
