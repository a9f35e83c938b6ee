"""The lab's disk guest boots from its own disk on real QEMU (TCG), without the lab.

No namespaces, no libvirt: ``qemu-system-x86_64 -accel tcg -machine pc`` with the template
(behind a qcow2 overlay) as a virtio disk, a NoCloud ``cidata`` ISO on the IDE CD-ROM, a
serial log file and a QMP socket. Every QEMU is stopped by its PID and every file lives in
one temporary directory removed at the end. Waits are bounded but generous (TCG on two busy
cores); nothing asserts how long anything took.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmstate.lab import guest, image
from kvmstate.lab.proc import run, stop

pytestmark = pytest.mark.lab

log = logging.getLogger(__name__)

BOOT_TIMEOUT = 300.0  # seen: ~11 s to the first counter on an idle 2-core machine
EXIT_TIMEOUT = 120.0
TOOLS = ("qemu-system-x86_64", "qemu-img", "qemu-io", "genisoimage", "mtype", "mdir")
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"not installed: {', '.join(missing)} (run scripts/install-system-deps.sh)")
    with tempfile.TemporaryDirectory(prefix="kvmstate-guest-image-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def template(workdir: Path) -> Path:
    """What ``kvmstate lab up`` installs (kernel, initramfs, disk template), in a temp dir."""
    t0 = time.monotonic()
    guest.install(workdir / "guest")
    log.info("guest installed in %.1f s", time.monotonic() - t0)
    return guest.disk_image_path(workdir / "guest")


def make_seed(path: Path, meta_data: str, user_data: str) -> Path:
    """A NoCloud seed: ISO9660 labelled cidata with meta-data and user-data."""
    src = path.with_suffix(".d")
    src.mkdir()
    (src / "meta-data").write_text(meta_data)
    (src / "user-data").write_text(user_data)
    iso = ["genisoimage", "-quiet", "-output", str(path), "-volid", "cidata", "-joliet", "-rock"]
    run([*iso, str(src / "user-data"), str(src / "meta-data")])
    return path


def read_disk_record(disk: Path) -> guest.CounterReading | None:
    read = f"read -v {image.COUNTER_OFFSET} {guest.DISK_RECORD_BYTES}"
    out = run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c", read, str(disk)]).stdout
    return guest.parse_disk_reading(guest.parse_qemu_io_read(out))


class Qemu:
    """One TCG QEMU booting ``disk``; stopped by its PID on exit from the ``with`` block."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        disk: Path,
        seed: Path | None = None,
        nic: bool = False,
        extra: list[str] | None = None,
    ) -> None:
        self.dir = workdir / name
        self.dir.mkdir()
        self.serial = self.dir / "serial.log"
        self.qmp_path = self.dir / "qmp.sock"
        self.output = self.dir / "qemu.out"
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-m", "128",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", f"file:{self.serial}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-drive", f"file={disk},if=virtio,format=qcow2",
        ]  # fmt: skip
        if seed is not None:
            argv += ["-drive", f"file={seed},media=cdrom,if=ide,index=2,format=raw,readonly=on"]
        if nic:
            argv += ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]
        argv += extra or []
        self.started = time.monotonic()
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    def __enter__(self) -> Qemu:
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self.proc, timeout=5)

    def text(self) -> str:
        try:
            return self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _fail(self, what: str) -> None:
        rc = self.proc.poll()
        state = "running" if rc is None else f"exited {rc}"
        tail = "\n".join(self.text().splitlines()[-60:])
        out = self.output.read_text(errors="replace")[-2000:]
        pytest.fail(
            f"{what} (QEMU pid {self.proc.pid} {state})\n--- serial log (tail) ---\n{tail}\n"
            f"--- QEMU output ---\n{out}",
            pytrace=False,
        )

    def wait_for(
        self, what: str, ready: Callable[[list[guest.GuestBoot]], bool], timeout: float
    ) -> guest.GuestBoot:
        """Wait until the serial log's boots satisfy ``ready``; return the last boot."""
        deadline = time.monotonic() + timeout
        while True:
            boots = guest.parse_boots(self.text())
            if boots and ready(boots):
                log.info("%s after %.1f s", what, time.monotonic() - self.started)
                return boots[-1]
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._fail(f"no {what} within {timeout:.0f} s")
            time.sleep(0.2)

    def qmp(self, command: str) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while not self.qmp_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._fail("no QMP socket")
            time.sleep(0.1)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(str(self.qmp_path))
            f = sock.makefile("rw")
            json.loads(f.readline())  # greeting
            reply: dict[str, Any] = {}
            for cmd in ("qmp_capabilities", command):
                f.write(json.dumps({"execute": cmd}) + "\n")
                f.flush()
                while "return" not in (reply := json.loads(f.readline())):
                    if "error" in reply:
                        self._fail(f"QMP {cmd}: {reply['error']}")
            return reply

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._fail(f"QEMU did not exit within {timeout:.0f} s")
            raise  # not reached

    def crash(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def test_template_layout_and_cache(template: Path) -> None:
    out = run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read -v 0 512", str(template)])
    mbr = guest.parse_qemu_io_read(out.stdout)
    assert image.parse_mbr_partitions(mbr) == [
        (True, image.FAT16_LBA, image.PARTITION_START, 128 * 2048 - image.PARTITION_START)
    ]
    assert read_disk_record(template) is None  # a fresh template has no counter yet
    info = json.loads(run(["qemu-img", "info", "--output=json", str(template)]).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 128 * 1024 * 1024
    stamp = json.loads(template.with_name(template.name + ".json").read_text())
    assert stamp["image"] == image.IMAGE_VERSION and "sr_mod" in stamp["modules"]
    mtime = template.stat().st_mtime_ns
    assert guest.build_disk_image(template.parent) == template  # cached: not rebuilt
    assert template.stat().st_mtime_ns == mtime
    # The boot partition's SYSLINUX config, read the way the lab could rewrite it (mtools).
    raw = template.with_suffix(".raw")
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(template), str(raw)])
    try:
        where = f"{raw}@@{image.PARTITION_START * image.SECTOR}"
        cfg = run(["mtype", "-i", where, "::syslinux.cfg"], env=MTOOLS_ENV).stdout
        files = run(["mdir", "-a", "-b", "-i", where, "::"], env=MTOOLS_ENV).stdout.split()
    finally:
        raw.unlink()
    assert image.parse_syslinux_append(cfg) == image.kernel_cmdline(image.DEFAULT_DIRTY_MIB)
    assert {"::/VMLINUZ", "::/INITRD.IMG", "::/LDLINUX.SYS", "::/LDLINUX.C32"} <= {
        f.upper() for f in files
    }


def test_kernel_command_line_sets_the_dirty_rate(template: Path, workdir: Path) -> None:
    """The same guest booted directly (``<kernel>``/``<initrd>``/``<cmdline>``) on a blank
    disk: ``kvmstate.dirty=`` sets the rate and the counter record goes to its sector."""
    disk = workdir / "blank.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"])
    kernel = ["-kernel", str(guest.kernel_path(template.parent))]
    kernel += ["-initrd", str(guest.disk_initrd_path(template))]
    kernel += ["-append", "console=ttyS0 kvmstate.dirty=12"]
    with Qemu(workdir, "direct", disk, extra=kernel) as vm:
        b = vm.wait_for(
            "2 counters and the dirty rate",
            lambda b: (b[-1].counter or 0) >= 2 and b[-1].dirty_mib is not None,
            BOOT_TIMEOUT,
        )
        assert b.dirty_mib == 12 and b.first_counter == 1 and b.hostname is None
        vm.qmp("system_powerdown")
        vm.wait_for("clean shutdown", lambda b: b[-1].clean_shutdown, EXIT_TIMEOUT)
        assert vm.wait_exit(EXIT_TIMEOUT) == 0
    on_disk = read_disk_record(disk)
    assert on_disk is not None and on_disk.boot == b.boot


def test_disk_guest_boots_names_itself_counts_and_shuts_down_cleanly(
    template: Path, workdir: Path
) -> None:
    disk = workdir / "vm.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(template), "-F", "qcow2", str(disk)])

    # Boot 1: seed with both hostnames (user-data's wins), a NIC, ACPI power button.
    seed1 = make_seed(
        workdir / "seed1.iso",
        "instance-id: vm-1\nlocal-hostname: from-meta-data\n",
        "#cloud-config\nhostname: guest-one\n",
    )
    with Qemu(workdir, "boot1", disk, seed=seed1, nic=True) as vm:
        b1 = vm.wait_for(
            "hostname, address and 3 counters",
            lambda b: (
                b[-1].hostname is not None and bool(b[-1].addresses) and (b[-1].counter or 0) >= 3
            ),
            BOOT_TIMEOUT,
        )
        assert b1.hostname == "guest-one"
        assert b1.addresses[0].startswith("10.0.2.")  # QEMU user networking's DHCP
        assert b1.boot and b1.first_counter == 1 and b1.resumed_from is None
        assert b1.dirty_mib == image.DEFAULT_DIRTY_MIB
        vm.qmp("system_powerdown")
        b1 = vm.wait_for("clean shutdown", lambda b: b[-1].clean_shutdown, EXIT_TIMEOUT)
        assert vm.wait_exit(EXIT_TIMEOUT) == 0
        assert guest.parse_clean_shutdown(vm.text())
        assert len(guest.parse_boots(vm.text())) == 1
    on_disk = read_disk_record(disk)
    assert on_disk is not None and on_disk.boot == b1.boot
    assert b1.counter is not None and on_disk.value in (b1.counter, b1.counter + 1)

    # Boot 2: meta-data's hostname only, a dirty rate from user-data, no NIC; the counter
    # continues from the disk under a new boot id.
    seed2 = make_seed(
        workdir / "seed2.iso",
        'instance-id: vm-2\nlocal-hostname: "meta-only"\n',
        "#cloud-config\nkvmstate_dirty: 8\n",
    )
    with Qemu(workdir, "boot2", disk, seed=seed2) as vm:
        b2 = vm.wait_for(
            "a counter and the dirty rate",
            lambda b: b[-1].counter is not None and b[-1].dirty_mib is not None,
            BOOT_TIMEOUT,
        )
        assert b2.boot and b2.boot != b1.boot
        assert b2.hostname == "meta-only"
        assert b2.resumed_from == on_disk.value and b2.first_counter == on_disk.value + 1
        assert b2.dirty_mib == 8 and not b2.addresses
        vm.qmp("system_powerdown")
        vm.wait_for("clean shutdown", lambda b: b[-1].clean_shutdown, EXIT_TIMEOUT)
        assert vm.wait_exit(EXIT_TIMEOUT) == 0
    on_disk = read_disk_record(disk)
    assert on_disk is not None and on_disk.boot == b2.boot

    # Boot 3: no CD-ROM at all; then a crash (SIGKILL): the record on disk is the last count.
    with Qemu(workdir, "boot3", disk) as vm:
        b3 = vm.wait_for(
            "2 counters", lambda b: b[-1].counter is not None and b[-1].counter >= 2, BOOT_TIMEOUT
        )
        assert "kvmstate-guest: no cidata seed" in vm.text()
        assert b3.hostname is None and b3.resumed_from == on_disk.value
        vm.crash()
        b3 = guest.parse_boots(vm.text())[-1]
    crashed = read_disk_record(disk)
    assert crashed is not None and crashed.boot == b3.boot and b3.counter is not None
    assert crashed.value in (b3.counter, b3.counter + 1)
    assert not b3.clean_shutdown
