"""``kvmstate lab selftest``: prove the running lab is a real cluster, then clean it to bare.

1. every host over SSH (asyncssh), its host key verified against the lab's known_hosts;
2. every libvirtd over ``qemu+ssh://`` (distinct host UUIDs);
3. a btrfs subvolume exported with ``/etc/exports`` + ``exportfs -ra`` and mounted by hand
   (``mount -t nfs``) on every KVM host, each host seeing the others' writes;
4. a TCG guest (raw libvirt XML, direct kernel boot, qcow2 on the NFS mount) started on the
   first KVM host and live-migrated to the second with ``migrate3`` (no UNSAFE flag) while
   its counter keeps increasing;
5. back to bare (``Lab.reset``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rich.console import Console

from kvmstate.lab import virt
from kvmstate.lab.config import BTRFS_LABEL, BTRFS_TOPLEVEL, NETWORK
from kvmstate.lab.guest import initrd_path, kernel_path
from kvmstate.lab.lab import Lab
from kvmstate.lab.proc import LabError
from kvmstate.transport.libvirt import libvirt_module

log = logging.getLogger(__name__)

T = TypeVar("T")
GUEST = "selftest-guest"
IMAGES = "/var/lib/libvirt/images"


@dataclass
class Step:
    name: str
    ok: bool
    seconds: float
    detail: str = ""


@dataclass
class SelftestResult:
    steps: list[Step] = field(default_factory=list)
    migration: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s.ok for s in self.steps)


def guest_xml(lab: Lab, name: str, disk: str, serial_log: str) -> str:
    guest_dir = lab.cfg.guest_dir
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel_path(guest_dir)}</kernel>
    <initrd>{initrd_path(guest_dir)}</initrd>
    <cmdline>console=ttyS0 quiet</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='{serial_log}'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='{serial_log}'/>
      <target type='serial' port='0'/>
    </console>
  </devices>
</domain>
"""


def _wait(what: str, fn: Callable[[], T | None], timeout: float, interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = fn()
        except LabError as exc:
            last_exc = exc
            value = None
        if value is not None:
            return value
        time.sleep(interval)
    raise LabError(f"{what}: timed out after {timeout:.0f} s ({last_exc or 'no value'})")


async def _ssh_check(lab: Lab) -> list[str]:
    from kvmstate.transport.sshlib import asyncssh

    cfg = lab.cfg

    async def one(name: str, address: str) -> str:
        async with asyncssh.connect(
            address,
            username="root",
            client_keys=[str(cfg.identity)],
            known_hosts=str(cfg.known_hosts),
            config=None,
        ) as conn:
            res = await conn.run("hostname", check=True)
            got = str(res.stdout).strip()
            if got != name:
                raise LabError(f"{address}: hostname is {got!r}, expected {name!r}")
            return got

    return list(await asyncio.gather(*(one(h.name, h.address) for h in cfg.hosts)))


def selftest(lab: Lab, console: Console | None = None) -> SelftestResult:
    console = console or Console()
    result = SelftestResult()
    cfg = lab.cfg
    if not lab.is_up():
        raise LabError(f"the lab in {cfg.dir} is not up (run `kvmstate lab up`)")
    src_host, dst_host = cfg.kvm[0], cfg.kvm[1]

    def step(name: str, fn: Callable[[], str]) -> bool:
        t0 = time.monotonic()
        try:
            detail = fn()
            ok = True
        except Exception as exc:
            log.debug("selftest step %s failed", name, exc_info=True)
            detail = f"{type(exc).__name__}: {exc}"
            ok = False
        s = Step(name, ok, time.monotonic() - t0, detail)
        result.steps.append(s)
        mark = "[green]ok[/]" if ok else "[bold red]FAIL[/]"
        console.print(f"{mark} {name} ({s.seconds:.2f} s): {detail}")
        return ok

    def ssh() -> str:
        names = asyncio.run(_ssh_check(lab))
        return f"{', '.join(names)}: host keys verified against {cfg.known_hosts}"

    def libvirt_ssh() -> str:
        uuids = {}
        for h in cfg.kvm:
            with virt.connect(cfg.ssh_uri(h)) as conn:
                import xml.etree.ElementTree as ET

                caps = ET.fromstring(conn.getCapabilities())  # noqa: S314 (our libvirtd)
                uuids[h.name] = caps.findtext("./host/uuid") or ""
        if len(set(uuids.values())) != len(uuids):
            raise LabError(f"host UUIDs are not distinct: {uuids}")
        return ", ".join(f"{n} ({u[:8]})" for n, u in uuids.items()) + " over qemu+ssh://"

    def nfs() -> str:
        st = cfg.storage.name
        lab.run(st, ["btrfs", "subvolume", "create", f"{BTRFS_TOPLEVEL}/images"])
        lab.run(st, ["mkdir", "-p", "/srv/images"])
        lab.run(st, ["mount", "-o", "subvol=images,noatime", f"LABEL={BTRFS_LABEL}", "/srv/images"])
        line = f"/srv/images {NETWORK}(rw,sync,no_root_squash,no_subtree_check)\n"
        lab.run(st, ["tee", "-a", "/etc/exports"], input=line)
        lab.run(st, ["exportfs", "-ra"])
        for h in cfg.kvm:
            lab.run(
                h.name,
                [
                    "mount",
                    "-t",
                    "nfs",
                    "-o",
                    "vers=3,nolock",
                    f"{cfg.storage.address}:/srv/images",
                    IMAGES,
                ],
            )
            lab.run(h.name, ["tee", f"{IMAGES}/written-by-{h.name}"], input=h.name)
        for h in cfg.kvm:
            for other in cfg.kvm:
                got = lab.run(h.name, ["cat", f"{IMAGES}/written-by-{other.name}"]).stdout
                if got != other.name:
                    raise LabError(f"{h.name} reads {got!r} from {other.name}'s file")
        for h in cfg.kvm:
            lab.run(h.name, ["rm", "-f", f"{IMAGES}/written-by-{h.name}"])
        return f"/srv/images exported and mounted on {', '.join(h.name for h in cfg.kvm)}"

    def start_guest() -> str:
        disk = f"{IMAGES}/{GUEST}.qcow2"
        lab.run(src_host.name, ["qemu-img", "create", "-q", "-f", "qcow2", disk, "64M"])
        xml = guest_xml(lab, GUEST, disk, f"/var/log/libvirt/qemu/{GUEST}.serial.log")
        with virt.connect(cfg.ssh_uri(src_host)) as conn:
            dom = conn.defineXML(xml)
            dom.create()
        value = _wait("guest counter", lambda: _counter_at_least(lab, 2), timeout=60)
        return f"{GUEST} running on {src_host.name}, counter {value}"

    def migrate() -> str:
        libvirt = libvirt_module()
        before = lab.guest_counter(GUEST)
        flags = (
            libvirt.VIR_MIGRATE_LIVE
            | libvirt.VIR_MIGRATE_PERSIST_DEST
            | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
            | libvirt.VIR_MIGRATE_ABORT_ON_ERROR
        )
        with (
            virt.connect(cfg.ssh_uri(src_host)) as sconn,
            virt.connect(cfg.ssh_uri(dst_host)) as dconn,
        ):
            dom = sconn.lookupByName(GUEST)
            t0 = time.monotonic()
            ddom = dom.migrate3(dconn, {}, flags)
            wall = time.monotonic() - t0
            stats = ddom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
            if virt.lookup_domain(sconn, GUEST) is not None:
                raise LabError(f"{GUEST} is still defined on {src_host.name}")
        after = _wait(
            "counter after migration", lambda: _counter_at_least(lab, before + 2), timeout=30
        )
        result.migration = {
            "wall_s": round(wall, 3),
            "time_elapsed_ms": stats.get("time_elapsed"),
            "downtime_ms": stats.get("downtime"),
            "memory_processed": stats.get("memory_processed"),
            "counter_before": before,
            "counter_after": after,
        }
        return (
            f"{src_host.name} -> {dst_host.name} in {wall:.2f} s "
            f"(job {stats.get('time_elapsed')} ms, downtime {stats.get('downtime')} ms), "
            f"counter {before} -> {after}"
        )

    def disk_counter() -> str:
        with virt.connect(cfg.libvirt_uri(dst_host)) as conn:
            xml = conn.lookupByName(GUEST).XMLDesc(0)
        value = lab._counter_from_disk(dst_host, xml)
        if value is None:
            raise LabError("no counter in sector 0 of the guest's disk")
        return f"sector 0 of the disk (on NFS) holds counter {value}"

    def reset() -> str:
        return f"bare again in {lab.reset():.2f} s"

    ok = step("ssh", ssh) and step("libvirt", libvirt_ssh)
    ok = ok and step("nfs", nfs)
    ok = ok and step("guest", start_guest) and step("migration", migrate)
    ok = ok and step("disk", disk_counter)
    step("reset", reset)
    return result


def _counter_at_least(lab: Lab, n: int) -> int | None:
    value = lab.guest_counter(GUEST)
    return value if value >= n else None
