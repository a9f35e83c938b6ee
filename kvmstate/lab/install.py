"""``kvmstate lab install``: the Debian packages and the guest kernel + initramfs."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from kvmstate.lab import guest
from kvmstate.lab.config import LabConfig
from kvmstate.lab.proc import LabError

log = logging.getLogger(__name__)

DEPS_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install-system-deps.sh"


def install_packages() -> None:
    """Run the project's ``scripts/install-system-deps.sh`` (idempotent)."""
    if not DEPS_SCRIPT.exists():
        raise LabError(
            f"{DEPS_SCRIPT} not found: install the packages it lists with apt-get "
            "(libvirt-daemon-system qemu-system-x86 openssh-server btrfs-progs nfs-ganesha-vfs ...)"
        )
    log.info("installing Debian packages (%s)", DEPS_SCRIPT)
    proc = subprocess.run(["bash", str(DEPS_SCRIPT)], check=False)
    if proc.returncode != 0:
        raise LabError(f"{DEPS_SCRIPT} failed (exit {proc.returncode})")


def install(cfg: LabConfig) -> None:
    install_packages()
    guest.install(cfg.guest_dir)
