"""The lab's test guest: Debian's kernel plus a busybox initramfs that proves continuity.

``/init`` increments a counter in RAM every second, dirties a few MiB of RAM, writes the
counter to sector 0 of ``/dev/vda`` with O_DIRECT and prints it on the serial console. A
live migration that loses memory or disk state shows up as a counter that restarts or stalls.

Nothing is installed on the machine: ``apt-get download`` + ``dpkg -x`` into the lab dir.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

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
COUNTER_PREFIX = "kvmstate-counter"
DEFAULT_GUEST_DEBS = Path("/var/lib/kvmstate-lab/guest/debs")
DISK_MAGIC = "KVMSTATE-COUNTER"

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
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
echo "kvmstate-guest: booted, disk: $(ls /dev/vda 2>/dev/null || echo none)"
n=0
while true; do
    n=$((n + 1))
    dd if=/dev/urandom of=/tmp/dirty bs=1048576 count=4 2>/dev/null
    if [ -b /dev/vda ]; then
        printf '{DISK_MAGIC} %d\\n' "$n" |
            dd of=/dev/vda bs=512 count=1 conv=sync oflag=direct 2>/dev/null
    fi
    echo "{COUNTER_PREFIX} $n"
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


def install(guest_dir: Path, force: bool = False) -> None:
    """Kernel + initramfs into ``guest_dir`` (cached: a no-op when already there)."""
    if installed(guest_dir) and not force:
        return
    default = DEFAULT_GUEST_DEBS.parent
    if not force and guest_dir != default and installed(default):  # another lab's, same build
        guest_dir.mkdir(parents=True, exist_ok=True)
        for name in ("vmlinuz", "initrd.img", "guest.json"):
            shutil.copy2(default / name, guest_dir / name)
        return
    if not Path("/usr/bin/busybox").exists():
        raise LabError("busybox-static is not installed (run `kvmstate lab install`)")
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
        modules = {p.name.split(".ko")[0]: p for p in moddir.rglob("*.ko*")}
        initrd = Path(tmp) / "initrd"
        image = build_initramfs(initrd, modules)
        shutil.copy2(vmlinuz[-1], kernel_path(guest_dir))
        shutil.copy2(image, initrd_path(guest_dir))
    (guest_dir / "guest.json").write_text(
        json.dumps({"kernel": version, "deb": deb.name, "init": STAMP_VERSION}, indent=2) + "\n"
    )
    for p in (kernel_path(guest_dir), initrd_path(guest_dir)):
        p.chmod(0o644)
    log.info("guest kernel %s and initramfs in %s", version, guest_dir)


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
        data = src.read_bytes()
        if src.name.endswith(".xz"):
            import lzma

            data = lzma.decompress(data)
        elif src.name.endswith(".zst"):
            raise LabError(f"{src.name}: zstd-compressed modules are not supported")
        (root / "lib" / "modules" / f"{name}.ko").write_bytes(data)
    init = root / "init"
    init.write_text(INIT)
    init.chmod(0o755)
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    cpio = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
        input="\n".join(names).encode() + b"\n",
        cwd=root,
        capture_output=True,
        check=False,
    )
    if cpio.returncode != 0:
        raise LabError(f"cpio failed: {cpio.stderr.decode().strip()}")
    image = root.parent / "initrd.cpio.gz"
    image.write_bytes(gzip.compress(cpio.stdout, compresslevel=6))
    return image


def parse_serial_counter(text: str) -> int | None:
    """The last counter value printed on the serial console, if any."""
    last = None
    for m in re.finditer(rf"{COUNTER_PREFIX} (\d+)", text):
        last = int(m.group(1))
    return last


def parse_disk_counter(sector: bytes) -> int | None:
    m = re.match(rb"KVMSTATE-COUNTER (\d+)\n", sector)
    return int(m.group(1)) if m else None
