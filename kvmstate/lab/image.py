"""The lab's bootable disk image: an MBR, SYSLINUX on a FAT partition, Debian's kernel and a
busybox initramfs as the whole userland.

Layout of the raw disk (then converted to a qcow2 template):

- sector 0: SYSLINUX's ``mbr.bin`` boot code and one active FAT16 partition;
- sector :data:`COUNTER_SECTOR` (2047, the last sector of the gap before the partition): the
  counter record ``KVMSTATE-COUNTER N boot=ID``, written by the guest with O_DIRECT;
- sector 2048 onwards: FAT16 with ``ldlinux.sys``/``ldlinux.c32`` (``syslinux --install``),
  ``syslinux.cfg``, ``vmlinuz`` and ``initrd.img``.

Why SYSLINUX on FAT and not extlinux or GRUB: the ``syslinux`` installer works through mtools
on a plain file (``--offset`` into the disk image), so the build needs no loop device, no mount
and no device map; extlinux needs a mounted filesystem and ``grub-install`` a block device (or
hand-assembled ``boot.img``/``core.img``). ``syslinux.cfg`` is a text file on FAT that mtools
can read and rewrite in a raw copy of the image.

The guest's ``/init`` (PID 1, never leaves the initramfs) loads the modules, reads a NoCloud
``cidata`` seed (hostname), answers the ACPI power button with a clean shutdown, keeps a counter
with a boot id on the serial console and on disk (continuing from the disk's value), takes a
DHCP lease on every NIC and dirties ``kvmstate.dirty`` MiB of RAM per second.

The dirty rate (issue 18), MiB of RAM rewritten per second, default 4, 0 = off; the guest
needs about three times that much free RAM (a source buffer plus a target of two halves,
written in turn, so QEMU's dirty-rate measurements over up to 2 s see the rate):

- ``kvmstate.dirty=MIB`` on the kernel command line: baked into the template's SYSLINUX
  ``APPEND`` line by ``guest.build_disk_image(dirty_mib=...)``, or given on ``<cmdline>`` when
  the same initramfs (``disk-initrd.img``) is booted directly;
- ``kvmstate_dirty: MIB`` in the NoCloud ``#cloud-config`` user-data, per guest; it wins.

Serial console lines (parsed by :mod:`kvmstate.lab.guest`):
``kvmstate-guest: booted boot=ID disk=DEV``, ``kvmstate-guest: hostname NAME``,
``kvmstate-guest: counter continues from N (boot=OLD)``, ``kvmstate-counter N boot=ID``,
``kvmstate-guest: address A.B.C.D``, ``kvmstate-guest: dirty N MiB/s``,
``kvmstate-guest: clean shutdown``, and ``kvmstate-guest: no cidata seed``.

The script texts, the MBR, the boot config and the module ordering are pure and unit-tested;
:func:`build_initramfs` and :func:`write_disk_image` run the tools (proven by
``tests/lab/test_guest_image.py`` on real QEMU).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from kvmstate.lab.proc import LabError, run

log = logging.getLogger(__name__)

SECTOR = 512
PARTITION_START = 2048  # sectors: 1 MiB, the usual alignment
COUNTER_SECTOR = PARTITION_START - 1
COUNTER_OFFSET = COUNTER_SECTOR * SECTOR
DEFAULT_SIZE_MIB = 128
DEFAULT_DIRTY_MIB = 4
FAT16_LBA = 0x0E
VOLUME_LABEL = "KVMSTATE"
VOLUME_ID = "4b564d53"  # fixed, so two builds of the same inputs give the same bytes
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
TOOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = {  # command -> the Debian package that has it
    "mkfs.fat": "dosfstools",
    "syslinux": "syslinux",
    "mcopy": "mtools",
    "qemu-img": "qemu-utils",
    "cpio": "cpio",
}

# What the guest needs from the kernel package; their dependencies are added and ordered from
# each module's own ``depends=`` (the package ships no modules.dep: depmod runs at install).
MODULES = (
    "virtio_pci",  # the PCI transport for every virtio device
    "virtio_blk",  # the boot disk
    "virtio_net",  # a NIC (DHCP)
    "virtio_scsi",  # a CD-ROM on bus='scsi'
    "ata_piix",  # a CD-ROM on bus='ide' (pc-i440fx)
    "ahci",  # a CD-ROM on bus='sata' (q35)
    "sr_mod",  # SCSI CD-ROM -> /dev/sr0
    "isofs",  # the cidata ISO9660 seed
    "button",  # ACPI power button -> input event
    "evdev",  # /dev/input/event* for acpid
)

GUEST_PREFIX = "kvmstate-guest:"
COUNTER_PREFIX = "kvmstate-counter"
DISK_MAGIC = "KVMSTATE-COUNTER"

INIT = f"""#!/bin/sh
# kvmstate lab disk guest: PID 1, the initramfs is the whole userland.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp /run /etc /mnt/seed
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=90% tmpfs /tmp
say() {{ echo "{GUEST_PREFIX} $*"; }}
for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m.ko" 2>/dev/null || say "module $m not loaded"
done
BOOT=$(cut -c1-8 /proc/sys/kernel/random/boot_id)
DIRTY={DEFAULT_DIRTY_MIB}
for arg in $(cat /proc/cmdline); do
    case "$arg" in kvmstate.dirty=*) DIRTY=${{arg#kvmstate.dirty=}} ;; esac
done

# ACPI power button -> /etc/acpi/PWRF/00000080 (clean shutdown)
i=0
while [ ! -e /dev/input/event0 ] && [ $i -lt 30 ]; do sleep 0.1; i=$((i + 1)); done
acpid -c /etc/acpi -l /run/acpid.log -p /run/acpid.pid

DISK=
i=0
while [ -z "$DISK" ] && [ $i -lt 100 ]; do
    for d in /dev/vda /dev/sda; do
        if [ -b "$d" ]; then DISK=$d; break; fi
    done
    [ -n "$DISK" ] || sleep 0.1
    i=$((i + 1))
done
say "booted boot=$BOOT disk=${{DISK:-none}}"

# NoCloud seed: a filesystem labelled cidata with meta-data and user-data. insmod waits for
# the ATA/SCSI probes, so a CD-ROM drive is there by now: without one, wait 1 s, not 5.
SEED=
i=0
while [ $i -lt 50 ]; do
    SEED=$(findfs LABEL=cidata 2>/dev/null || findfs LABEL=CIDATA 2>/dev/null)
    [ -n "$SEED" ] && break
    if [ $i -ge 10 ] && ! ls /sys/class/block | grep -q '^sr'; then break; fi
    sleep 0.1
    i=$((i + 1))
done
value() {{
    sed -n "s/^$1:[[:space:]]*//p" "$2" 2>/dev/null | head -n 1 |
        sed -e 's/\\r$//' -e 's/[[:space:]]*$//' -e 's/^["'"'"']//' -e 's/["'"'"']$//'
}}
NAME=
if [ -n "$SEED" ] && mount -o ro "$SEED" /mnt/seed; then
    NAME=$(value local-hostname /mnt/seed/meta-data)
    if head -n 1 /mnt/seed/user-data 2>/dev/null | grep -q '^#cloud-config'; then
        v=$(value hostname /mnt/seed/user-data)
        [ -n "$v" ] && NAME=$v
        v=$(value kvmstate_dirty /mnt/seed/user-data)
        [ -n "$v" ] && DIRTY=$v
    fi
    umount /mnt/seed
    say "seed $SEED"
else
    say "no cidata seed"
fi
case "$NAME" in
    "") ;;
    *[!A-Za-z0-9.-]* | -* | .*) say "seed hostname rejected (not a host name)" ;;
    *) hostname "$NAME"; echo "$NAME" > /etc/hostname; say "hostname $NAME" ;;
esac
case "$DIRTY" in "" | *[!0-9]*) say "dirty rate $DIRTY rejected"; DIRTY={DEFAULT_DIRTY_MIB} ;; esac

# The counter continues from the disk's record, so a restart or a crash does not reset it:
# each record is flushed (fsync: a virtio flush, so QEMU commits the qcow2 metadata of a
# newly written cluster too), as a database would, or a power loss could take it back.
n=0
if [ -n "$DISK" ]; then
    set -- $(dd if="$DISK" bs=512 skip={COUNTER_SECTOR} count=1 2>/dev/null |
        tr -d '\\000' | head -n 1)
    if [ "$1" = "{DISK_MAGIC}" ]; then
        case "$2" in "" | *[!0-9]*) ;; *) n=$2; say "counter continues from $n ($3)" ;; esac
    fi
fi
counter() {{
    while true; do
        n=$((n + 1))
        if [ -n "$DISK" ]; then
            printf '{DISK_MAGIC} %d boot=%s\\n' "$n" "$BOOT" |
                dd of="$DISK" bs=512 seek={COUNTER_SECTOR} count=1 conv=sync,notrunc,fsync \\
                    oflag=direct 2>/dev/null
        fi
        echo "{COUNTER_PREFIX} $n boot=$BOOT"
        sleep 1
    done
}}
counter &
echo $! > /run/counter.pid

ip link set lo up
for path in /sys/class/net/*; do
    nic=${{path##*/}}
    [ "$nic" = lo ] && continue
    ip link set "$nic" up
    udhcpc -f -i "$nic" -s /etc/udhcpc.script -x "hostname:$(hostname)" >/dev/null 2>&1 &
done

# Rewrite DIRTY MiB of RAM per second; each round shifts the source by one more byte so every
# page changes content (zero-page and delta detection cannot skip it), and takes the other
# half of a 2 x DIRTY buffer: a dirty-rate measurement over up to 2 s (QEMU's migration sync
# period, calc-dirty-rate) counts DIRTY MiB of distinct pages per second, not the same pages
# twice. Needs ~3x DIRTY of RAM.
dirty() {{
    dd if=/dev/urandom of=/tmp/seed bs=1048576 count="$1" 2>/dev/null &&
        dd if=/dev/urandom bs=4096 count=1 2>/dev/null >> /tmp/seed &&
        dd if=/tmp/seed of=/tmp/dirty bs=1048576 count="$1" 2>/dev/null &&
        dd if=/tmp/seed of=/tmp/dirty bs=1048576 count="$1" seek="$1" 2>/dev/null || {{
        say "dirty $1 MiB/s failed (not enough RAM?)"
        return
    }}
    say "dirty $1 MiB/s"
    r=0
    while true; do
        sleep 1 &
        s=$!
        r=$(((r + 1) % 4093))
        dd if=/tmp/seed of=/tmp/dirty bs=1048576 count="$1" iflag=skip_bytes skip=$r \\
            seek=$(((r % 2) * $1)) conv=notrunc 2>/dev/null
        wait $s
    done
}}
if [ "$DIRTY" -gt 0 ]; then
    dirty "$DIRTY" &
    echo $! > /run/dirty.pid
else
    say "dirty 0 MiB/s"
fi
while true; do
    wait
    sleep 60
done
"""

POWER_BUTTON = f"""#!/bin/sh
# busybox acpid runs this on the ACPI power button (PWRF): stop the workers, sync, power off.
exec > /dev/console 2>&1
for f in /run/counter.pid /run/dirty.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null
done
echo "{GUEST_PREFIX} clean shutdown"
sync
poweroff -f
"""

UDHCPC_SCRIPT = f"""#!/bin/sh
# udhcpc event script: configure the address and print it on the console.
case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound | renew)
        if ! ip -4 addr show dev "$interface" | grep -q "inet $ip/"; then
            ip -4 addr flush dev "$interface"
            ip addr add "$ip/${{mask:-24}}" dev "$interface"
            for r in $router; do
                ip route add default via "$r" dev "$interface" && break
            done
            : > /etc/resolv.conf
            for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
            echo "{GUEST_PREFIX} address $ip" > /dev/console
        fi
        ;;
esac
exit 0
"""


def kernel_cmdline(dirty_mib: int = DEFAULT_DIRTY_MIB) -> str:
    if dirty_mib < 0:
        raise ValueError("dirty_mib must be >= 0")
    return f"console=ttyS0,115200 kvmstate.dirty={dirty_mib}"


def syslinux_cfg(append: str) -> str:
    """The boot menu: no prompt, straight into Debian's kernel and the busybox initramfs."""
    return (
        "SERIAL 0 115200\n"
        "DEFAULT kvmstate\n"
        "PROMPT 0\n"
        "TIMEOUT 0\n"
        "LABEL kvmstate\n"
        "  KERNEL /vmlinuz\n"
        "  INITRD /initrd.img\n"
        f"  APPEND {append}\n"
    )


def parse_syslinux_append(cfg: str) -> str | None:
    m = re.search(r"^\s*APPEND\s+(.*?)\s*$", cfg, re.MULTILINE | re.IGNORECASE)
    return m.group(1) if m else None


def _chs(lba: int) -> bytes:
    """CHS address of ``lba`` in the 255-head/63-sector geometry (capped at 1023/254/63)."""
    cyl, rest = divmod(lba, 255 * 63)
    head, sec = divmod(rest, 63)
    if cyl > 1023:
        cyl, head, sec = 1023, 254, 62
    return bytes((head, (sec + 1) | ((cyl >> 2) & 0xC0), cyl & 0xFF))


def mbr(boot_code: bytes, start: int, sectors: int, ptype: int, disk_id: int) -> bytes:
    """A 512-byte MBR: ``boot_code`` (<= 440 bytes), one active partition, the signature."""
    if len(boot_code) > 440:
        raise ValueError(f"MBR boot code is {len(boot_code)} bytes (at most 440)")
    entry = (
        b"\x80"
        + _chs(start)
        + bytes((ptype,))
        + _chs(start + sectors - 1)
        # the partition's first sector and length, little-endian
        + struct.pack("<II", start, sectors)
    )
    return (
        boot_code.ljust(440, b"\0")
        + struct.pack("<IH", disk_id, 0)
        + entry
        + b"\0" * 48
        + b"\x55\xaa"
    )


def parse_mbr_partitions(sector: bytes) -> list[tuple[bool, int, int, int]]:
    """(active, type, first sector, sectors) of each used primary partition."""
    if len(sector) < 512 or sector[510:512] != b"\x55\xaa":
        return []
    out = []
    for i in range(4):
        e = sector[446 + 16 * i : 462 + 16 * i]
        start, count = struct.unpack("<II", e[8:16])
        if e[4]:
            out.append((e[0] == 0x80, e[4], start, count))
    return out


def module_depends(ko: bytes) -> list[str]:
    """The ``depends=`` of a kernel module's .modinfo, names normalized to underscores."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    if not m:
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",") if d]


def module_order(
    wanted: Iterable[str], depends: Mapping[str, list[str]], builtin: frozenset[str] = frozenset()
) -> list[str]:
    """``wanted`` and what they depend on, each after its dependencies (insmod order).

    Raises :class:`LabError` naming a module that is neither in ``depends`` nor built in.
    """
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == 2 or name in builtin:
            return
        if state.get(name) == 1:
            raise LabError(f"kernel module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in depends:
            via = f" (needed by {chain[-1]})" if chain else ""
            raise LabError(f"kernel module {name}{via} is not in the kernel package")
        state[name] = 1
        for dep in depends[name]:
            visit(dep, (*chain, name))
        state[name] = 2
        order.append(name)

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return order


def module_files(moddir: Path) -> dict[str, Path]:
    """Every module file under ``lib/modules/VERSION/kernel`` by normalized name."""
    return {p.name.split(".ko")[0].replace("-", "_"): p for p in moddir.rglob("*.ko*")}


def module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        raise LabError(f"{path.name}: zstd-compressed modules are not supported")
    return data


def builtin_modules(moddir: Path) -> frozenset[str]:
    """Names in ``modules.builtin`` next to ``moddir`` (built into the kernel: no insmod)."""
    try:
        text = (moddir.parent / "modules.builtin").read_text()
    except OSError:
        return frozenset()
    return frozenset(
        line.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_") for line in text.split()
    )


IMAGE_VERSION = hashlib.sha256(
    "\0".join((INIT, POWER_BUTTON, UDHCPC_SCRIPT, syslinux_cfg(""), *MODULES)).encode()
).hexdigest()[:16]


def tool(name: str) -> str:
    found = shutil.which(name, path=TOOL_PATH)
    if found is None:
        raise LabError(
            f"{name} is not installed (Debian package {TOOLS.get(name, name)}; "
            "run `kvmstate lab install`)"
        )
    return found


def build_initramfs(
    root: Path, modules: Mapping[str, Path], out: Path, builtin: frozenset[str] = frozenset()
) -> list[str]:
    """The disk guest's initramfs (gzip newc cpio) at ``out``; returns the insmod order."""
    for d in ("bin", "dev", "proc", "sys", "tmp", "run", "etc/acpi/PWRF", "lib/modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    busybox = Path("/usr/bin/busybox")
    if not busybox.exists():
        raise LabError("busybox-static is not installed (run `kvmstate lab install`)")
    shutil.copy2(busybox, root / "bin" / "busybox")
    os.symlink("busybox", root / "bin" / "sh")
    depends: dict[str, list[str]] = {}
    data: dict[str, bytes] = {}
    pending = list(MODULES)  # read only the modules reached from MODULES
    while pending:
        name = pending.pop()
        if name in data or name not in modules:
            continue  # done, or missing/built in: module_order says which
        data[name] = module_bytes(modules[name])
        depends[name] = module_depends(data[name])
        pending.extend(depends[name])
    order = module_order(MODULES, depends, builtin)
    for name in order:
        (root / "lib" / "modules" / f"{name}.ko").write_bytes(data[name])
    (root / "lib" / "modules" / "order").write_text("\n".join(order) + "\n")
    for rel, text in (
        ("init", INIT),
        ("etc/acpi/PWRF/00000080", POWER_BUTTON),
        ("etc/udhcpc.script", UDHCPC_SCRIPT),
    ):
        (root / rel).write_text(text)
        (root / rel).chmod(0o755)
    pack_initramfs(root, out)
    return order


def pack_initramfs(root: Path, out: Path) -> None:
    """``root`` as a gzipped newc cpio archive (an initramfs), owned by root:root, in ``out``
    (no timestamp in the gzip header: the same tree gives the same bytes)."""
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    cpio = subprocess.run(
        [tool("cpio"), "--quiet", "-o", "-H", "newc", "-R", "0:0"],
        input="\n".join(names).encode() + b"\n",
        cwd=root,
        capture_output=True,
        check=False,
    )
    if cpio.returncode != 0:
        raise LabError(f"cpio failed: {cpio.stderr.decode().strip()}")
    out.write_bytes(gzip.compress(cpio.stdout, compresslevel=6, mtime=0))


def write_disk_image(
    out: Path,
    vmlinuz: Path,
    modules: Mapping[str, Path],
    *,
    builtin: frozenset[str] = frozenset(),
    dirty_mib: int = DEFAULT_DIRTY_MIB,
    size_mib: int = DEFAULT_SIZE_MIB,
    initrd_out: Path | None = None,
) -> list[str]:
    """Build the bootable qcow2 at ``out`` (replaced atomically). Returns the module order.

    ``initrd_out``, if given, receives a copy of the initramfs (the same guest, for a
    direct kernel boot with ``kvmstate.dirty=`` on ``<cmdline>``).

    No mounts and no loop devices: mkfs.fat, ``syslinux --install`` and mcopy all work on the
    raw file at the partition's offset; ``qemu-img convert`` makes the (sparse) qcow2.
    """
    if size_mib < 16:
        raise ValueError("the disk image needs at least 16 MiB")
    if not SYSLINUX_MBR.exists():
        raise LabError(f"{SYSLINUX_MBR} is missing (Debian package syslinux-common)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".disk-") as tmp:
        work = Path(tmp)
        initrd = work / "initrd.img"
        order = build_initramfs(work / "root", modules, initrd, builtin)
        shutil.copy2(vmlinuz, work / "vmlinuz")
        (work / "syslinux.cfg").write_text(syslinux_cfg(kernel_cmdline(dirty_mib)))
        raw = work / "disk.raw"
        total = size_mib * 1024 * 1024 // SECTOR
        part = total - PARTITION_START
        with raw.open("wb") as f:
            f.truncate(total * SECTOR)
            f.write(
                mbr(SYSLINUX_MBR.read_bytes()[:440], PARTITION_START, part, FAT16_LBA, 0x4B564D53)
            )
        offset = PARTITION_START * SECTOR
        run(
            [
                tool("mkfs.fat"), "-F", "16", "-n", VOLUME_LABEL, "-i", VOLUME_ID,
                "-h", str(PARTITION_START), "--offset", str(PARTITION_START),
                str(raw), str(part * SECTOR // 1024),
            ]
        )  # fmt: skip
        run([tool("syslinux"), "--install", "--offset", str(offset), str(raw)])
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "PATH": TOOL_PATH}
        run(
            [
                tool("mcopy"), "-o", "-i", f"{raw}@@{offset}",
                str(work / "syslinux.cfg"), str(work / "vmlinuz"), str(initrd), "::",
            ],
            env=env,
        )  # fmt: skip
        tmp_out = work / "disk.qcow2"
        run([tool("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp_out)])
        tmp_out.chmod(0o644)
        if initrd_out is not None:
            initrd.chmod(0o644)
            os.replace(initrd, initrd_out)
        os.replace(tmp_out, out)
    return order
