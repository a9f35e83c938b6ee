"""The lab's test guests, both from Debian's kernel and busybox, proving continuity.

- The **kernel-boot guest** (``vmlinuz`` + ``initrd.img``, booted with ``<kernel>``/
  ``<initrd>``): ``/init`` increments a counter every second, dirties a few MiB of RAM, writes
  ``KVMSTATE-COUNTER N boot=ID`` to sector 0 of ``/dev/vda`` with O_DIRECT and prints
  ``kvmstate-counter N boot=ID`` on the serial console.
- The **disk guest** (``disk.qcow2``, a template that boots from its own disk through SYSLINUX;
  see :mod:`kvmstate.lab.image`): the same counter, kept at sector 2047 and continued across
  boots, plus a NoCloud hostname, a clean ACPI shutdown, DHCP and a dirty-rate knob.

A live migration that loses memory or disk state shows up as a counter that restarts or
stalls; the boot id (the first 8 hex digits of the kernel's boot_id) tells a new boot's lines
from the previous boot's.

Nothing is installed on the machine: ``apt-get download`` + ``dpkg -x`` into the lab dir.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kvmstate.lab import image
from kvmstate.lab.proc import LabError, run

log = logging.getLogger(__name__)

MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
)
COUNTER_PREFIX = image.COUNTER_PREFIX
DEFAULT_GUEST_DEBS = Path("/var/lib/kvmstate-lab/guest/debs")
DISK_MAGIC = image.DISK_MAGIC
# Where each guest keeps its counter record on its disk: the kernel-boot guest at sector 0 of
# its blank disk, the disk guest in the gap before its partition (sector 0 is its MBR).
DISK_COUNTER_OFFSETS = (0, image.COUNTER_OFFSET)
DISK_RECORD_BYTES = 64

INIT = f"""#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {" ".join(MODULES)}; do
    insmod /lib/modules/$m.ko 2>/dev/null
done
BOOT=$(cut -c1-8 /proc/sys/kernel/random/boot_id)
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
echo "kvmstate-guest: booted, disk: $(ls /dev/vda 2>/dev/null || echo none)"
n=0
while true; do
    n=$((n + 1))
    dd if=/dev/urandom of=/tmp/dirty bs=1048576 count=4 2>/dev/null
    if [ -b /dev/vda ]; then
        printf '{DISK_MAGIC} %d boot=%s\\n' "$n" "$BOOT" |
            dd of=/dev/vda bs=512 count=1 conv=sync oflag=direct 2>/dev/null
    fi
    echo "{COUNTER_PREFIX} $n boot=$BOOT"
    sleep 1
done
"""
STAMP_VERSION = hashlib.sha256(INIT.encode()).hexdigest()[:16]


def kernel_path(guest_dir: Path) -> Path:
    return guest_dir / "vmlinuz"


def initrd_path(guest_dir: Path) -> Path:
    return guest_dir / "initrd.img"


def installed(guest_dir: Path) -> bool:
    stamp = guest_dir / "guest.json"
    try:
        data = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return (
        data.get("init") == STAMP_VERSION
        and kernel_path(guest_dir).exists()
        and initrd_path(guest_dir).exists()
    )


def kernel_package() -> str:
    """The versioned package ``linux-image-amd64`` depends on, e.g. linux-image-6.1.0-56-amd64."""
    out = run(["apt-cache", "depends", "linux-image-amd64"]).stdout
    m = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*)", out)
    if not m:
        raise LabError("apt-cache knows no linux-image-amd64 (run apt-get update)")
    return m.group(1)


def download_kernel(debs: Path) -> Path:
    debs.mkdir(parents=True, exist_ok=True)
    pkg = kernel_package()
    found = sorted(debs.glob(f"{pkg}_*.deb"))
    if found:
        return found[-1]
    # Another lab directory or apt's own cache may already hold it.
    for cache in (DEFAULT_GUEST_DEBS, Path("/var/cache/apt/archives")):
        cached = sorted(cache.glob(f"{pkg}_*.deb"))
        if cached:
            shutil.copy2(cached[-1], debs / cached[-1].name)
            return debs / cached[-1].name
    log.info("downloading %s", pkg)
    proc = subprocess.run(
        ["apt-get", "download", pkg], cwd=debs, capture_output=True, text=True, check=False
    )
    found = sorted(debs.glob(f"{pkg}_*.deb"))
    if proc.returncode != 0 or not found:
        raise LabError(f"apt-get download {pkg} failed: {proc.stderr.strip()}")
    return found[-1]


def disk_image_path(guest_dir: Path) -> Path:
    """The disk guest's qcow2 template (boots from its own disk)."""
    return guest_dir / "disk.qcow2"


def disk_initrd_path(image_path: Path) -> Path:
    """The disk guest's initramfs beside its template (``disk.qcow2`` -> ``disk-initrd.img``):
    the same guest for a direct kernel boot (``<kernel>`` = :func:`kernel_path`,
    ``<cmdline>console=ttyS0 kvmstate.dirty=MIB</cmdline>``) on a blank disk."""
    return image_path.with_name(image_path.stem + "-initrd.img")


def _stamp_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def disk_image_installed(
    out: Path, dirty_mib: int = image.DEFAULT_DIRTY_MIB, size_mib: int = image.DEFAULT_SIZE_MIB
) -> bool:
    try:
        data = json.loads(_stamp_path(out).read_text())
    except (OSError, ValueError):
        return False
    return (
        data.get("image") == image.IMAGE_VERSION
        and data.get("dirty_mib") == dirty_mib
        and data.get("size_mib") == size_mib
        and out.exists()
        and disk_initrd_path(out).exists()
    )


@dataclass(frozen=True)
class KernelTree:
    """Debian's kernel package unpacked: the kernel, its modules, what is built in."""

    version: str
    deb: str
    vmlinuz: Path
    modules: dict[str, Path]
    builtin: frozenset[str]


@contextlib.contextmanager
def kernel_tree(guest_dir: Path) -> Iterator[KernelTree]:
    """Download (or reuse) the kernel package and unpack it into a temporary directory."""
    guest_dir.mkdir(parents=True, exist_ok=True)
    deb = download_kernel(guest_dir / "debs")
    with tempfile.TemporaryDirectory(dir=guest_dir) as tmp:
        root = Path(tmp) / "deb"
        run(["dpkg-deb", "-x", str(deb), str(root)])
        vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise LabError(f"{deb.name} has no /boot/vmlinuz-*")
        version = vmlinuz[-1].name.removeprefix("vmlinuz-")
        moddir = root / "lib" / "modules" / version / "kernel"
        yield KernelTree(
            version=version,
            deb=deb.name,
            vmlinuz=vmlinuz[-1],
            modules=image.module_files(moddir),
            builtin=image.builtin_modules(moddir),
        )


def install(guest_dir: Path, force: bool = False) -> None:
    """Kernel + initramfs and the disk template into ``guest_dir`` (cached: a no-op when
    already there)."""
    kernel_ok = installed(guest_dir) and not force
    disk_ok = disk_image_installed(disk_image_path(guest_dir)) and not force
    if kernel_ok and disk_ok:
        return
    default = DEFAULT_GUEST_DEBS.parent
    if not force and guest_dir != default:  # another lab's, same build
        guest_dir.mkdir(parents=True, exist_ok=True)
        if not kernel_ok and installed(default):
            for name in ("vmlinuz", "initrd.img", "guest.json"):
                shutil.copy2(default / name, guest_dir / name)
            kernel_ok = True
        src = disk_image_path(default)
        if not disk_ok and disk_image_installed(src):
            dst = disk_image_path(guest_dir)
            for a, b in ((src, dst), (disk_initrd_path(src), disk_initrd_path(dst))):
                shutil.copy2(a, b)
            shutil.copy2(_stamp_path(src), _stamp_path(dst))  # last: it vouches for both
            disk_ok = True
        if kernel_ok and disk_ok:
            return
    if not Path("/usr/bin/busybox").exists():
        raise LabError("busybox-static is not installed (run `kvmstate lab install`)")
    with kernel_tree(guest_dir) as kernel:
        if not kernel_ok:
            _install_kernel_guest(guest_dir, kernel)
        if not disk_ok:
            build_disk_image(guest_dir, kernel=kernel, force=True)


def _install_kernel_guest(guest_dir: Path, kernel: KernelTree) -> None:
    with tempfile.TemporaryDirectory(dir=guest_dir) as tmp:
        initrd = Path(tmp) / "initrd"
        built = build_initramfs(initrd, kernel.modules)
        shutil.copy2(kernel.vmlinuz, kernel_path(guest_dir))
        shutil.copy2(built, initrd_path(guest_dir))
    (guest_dir / "guest.json").write_text(
        json.dumps({"kernel": kernel.version, "deb": kernel.deb, "init": STAMP_VERSION}, indent=2)
        + "\n"
    )
    for p in (kernel_path(guest_dir), initrd_path(guest_dir)):
        p.chmod(0o644)
    log.info("guest kernel %s and initramfs in %s", kernel.version, guest_dir)


def build_disk_image(
    guest_dir: Path,
    *,
    out: Path | None = None,
    dirty_mib: int = image.DEFAULT_DIRTY_MIB,
    size_mib: int = image.DEFAULT_SIZE_MIB,
    kernel: KernelTree | None = None,
    force: bool = False,
) -> Path:
    """The disk guest's bootable qcow2 template (default ``guest_dir/disk.qcow2``).

    Cached like the kernel: a stamp next to the image (``disk.qcow2.json``) records the build
    and a matching one makes this a no-op. ``dirty_mib`` is the default dirty rate baked into
    the SYSLINUX ``APPEND`` line (``kvmstate.dirty=``); a NoCloud ``kvmstate_dirty:`` key in
    the guest's ``#cloud-config`` user-data overrides it per guest.
    """
    out = out or disk_image_path(guest_dir)
    if not force and disk_image_installed(out, dirty_mib, size_mib):
        return out
    if kernel is None:
        with kernel_tree(guest_dir) as tree:
            return build_disk_image(
                guest_dir, out=out, dirty_mib=dirty_mib, size_mib=size_mib, kernel=tree, force=True
            )
    t0 = time.monotonic()
    _stamp_path(out).unlink(missing_ok=True)  # no stamp vouches for a half-built pair
    order = image.write_disk_image(
        out,
        kernel.vmlinuz,
        kernel.modules,
        builtin=kernel.builtin,
        dirty_mib=dirty_mib,
        size_mib=size_mib,
        initrd_out=disk_initrd_path(out),
    )
    stamp = {
        "image": image.IMAGE_VERSION,
        "kernel": kernel.version,
        "deb": kernel.deb,
        "dirty_mib": dirty_mib,
        "size_mib": size_mib,
        "modules": order,
        "cmdline": image.kernel_cmdline(dirty_mib),
        "build_seconds": round(time.monotonic() - t0, 1),
    }
    _stamp_path(out).write_text(json.dumps(stamp, indent=2) + "\n")
    log.info(
        "disk guest template %s (kernel %s) in %.1f s", out, kernel.version, stamp["build_seconds"]
    )
    return out


def build_initramfs(root: Path, modules: dict[str, Path]) -> Path:
    """A newc cpio (gzip) of busybox, /init and the virtio modules, next to ``root``."""
    for d in ("bin", "dev", "proc", "sys", "tmp", "lib/modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/usr/bin/busybox", root / "bin" / "busybox")
    os.symlink("busybox", root / "bin" / "sh")
    for name in MODULES:
        src = modules.get(name)
        if src is None:
            raise LabError(f"kernel module {name} not found in the kernel package")
        (root / "lib" / "modules" / f"{name}.ko").write_bytes(image.module_bytes(src))
    init = root / "init"
    init.write_text(INIT)
    init.chmod(0o755)
    out = root.parent / "initrd.cpio.gz"
    image.pack_initramfs(root, out)
    return out


# Readers of what the guests print and write ---------------------------------------------

_COUNTER_RE = re.compile(rf"{COUNTER_PREFIX} (\d+)(?: boot=([0-9a-f]{{8}}))?")
_DISK_RE = re.compile(rb"KVMSTATE-COUNTER (\d+)(?: boot=([0-9a-f]{8}))?\n")
_GUEST_RE = re.compile(
    r"kvmstate-guest: (?:"
    r"booted boot=(?P<booted>[0-9a-f]{8})"
    r"|hostname (?P<hostname>[A-Za-z0-9.-]+)"
    r"|address (?P<address>\d{1,3}(?:\.\d{1,3}){3})"
    r"|(?P<shutdown>clean shutdown)"
    r"|counter continues from (?P<resumed>\d+)"
    r"|dirty (?P<dirty>\d+) MiB/s(?P<dirty_failed> failed)?"
    r")"
)


@dataclass(frozen=True)
class CounterReading:
    """A counter value and the boot that wrote it (None: a guest without boot ids)."""

    value: int
    boot: str | None = None

    def __str__(self) -> str:
        return f"{self.value} (boot {self.boot})" if self.boot else str(self.value)


@dataclass
class GuestBoot:
    """What one boot of a lab guest said on its serial console."""

    boot: str | None = None
    hostname: str | None = None
    addresses: list[str] = field(default_factory=list)
    first_counter: int | None = None
    counter: int | None = None
    resumed_from: int | None = None
    dirty_mib: int | None = None
    clean_shutdown: bool = False


def parse_boots(text: str) -> list[GuestBoot]:
    """The boots in a serial log, oldest first.

    A boot starts at ``kvmstate-guest: booted boot=ID``, at a counter line of a boot id not
    seen just before, or at a guest line after a clean shutdown (a log read from its tail may
    start mid-boot). Lines without a boot id (hostname, address...) belong to the boot they
    follow.
    """
    boots: list[GuestBoot] = []

    def current(boot: str | None) -> GuestBoot:
        last = boots[-1] if boots else None
        if last is not None and boot is None and not last.clean_shutdown:
            return last
        if last is not None and boot is not None and last.boot in (None, boot):
            last.boot = boot
            return last
        boots.append(GuestBoot(boot=boot))  # a boot whose "booted" line we did not see
        return boots[-1]

    for line in text.splitlines():
        for m in _GUEST_RE.finditer(line):
            if m.group("booted"):
                boots.append(GuestBoot(boot=m.group("booted")))
                continue
            b = current(None)
            if m.group("hostname"):
                b.hostname = m.group("hostname")
            elif m.group("address"):
                b.addresses.append(m.group("address"))
            elif m.group("shutdown"):
                b.clean_shutdown = True
            elif m.group("resumed"):
                b.resumed_from = int(m.group("resumed"))
            elif m.group("dirty") and not m.group("dirty_failed"):
                b.dirty_mib = int(m.group("dirty"))
        for m in _COUNTER_RE.finditer(line):
            b = current(m.group(2))
            b.counter = int(m.group(1))
            if b.first_counter is None:
                b.first_counter = b.counter
    return boots


def parse_serial_reading(text: str) -> CounterReading | None:
    """The last counter printed on the serial console, with its boot id."""
    last = None
    for m in _COUNTER_RE.finditer(text):
        last = m
    return CounterReading(int(last.group(1)), last.group(2)) if last else None


def parse_serial_counter(text: str) -> int | None:
    """The last counter value printed on the serial console, if any."""
    reading = parse_serial_reading(text)
    return reading.value if reading else None


def parse_hostname(text: str) -> str | None:
    """The host name the last boot set from its NoCloud seed (``kvmstate-guest: hostname``)."""
    boots = parse_boots(text)
    return boots[-1].hostname if boots else None


def parse_address(text: str) -> str | None:
    """The last DHCP address the last boot printed (``kvmstate-guest: address A.B.C.D``)."""
    boots = parse_boots(text)
    return boots[-1].addresses[-1] if boots and boots[-1].addresses else None


def parse_clean_shutdown(text: str) -> bool:
    """Whether the last boot logged its clean (ACPI) shutdown."""
    boots = parse_boots(text)
    return bool(boots) and boots[-1].clean_shutdown


def parse_disk_reading(data: bytes) -> CounterReading | None:
    """The counter record ``KVMSTATE-COUNTER N [boot=ID]\\n`` at the start of ``data``."""
    m = _DISK_RE.match(data)
    if not m:
        return None
    return CounterReading(int(m.group(1)), m.group(2).decode() if m.group(2) else None)


def parse_qemu_io_read(text: str) -> bytes:
    """The bytes of a ``qemu-io -c 'read -v OFFSET LEN'`` hex dump."""
    data = bytearray()
    for line in text.splitlines():
        head, sep, rest = line.partition(":")
        head = head.strip()
        if sep and head and all(c in "0123456789abcdef" for c in head):
            data.extend(int(tok, 16) for tok in rest.split()[:16] if len(tok) == 2)
    return bytes(data)


def parse_disk_counter(sector: bytes) -> int | None:
    reading = parse_disk_reading(sector)
    return reading.value if reading else None
