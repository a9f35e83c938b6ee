"""The storage host's disk: a btrfs filesystem on a loop file, its top level on /srv/btrfs.

The spec names the filesystem ``LABEL=kvmstate-lab``: the loop device number changes from
run to run, the label does not (libblkid finds it by probing, no udev needed).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from kvmstate.lab.config import BTRFS_LABEL, BTRFS_SIZE, BTRFS_TOPLEVEL, HostConfig, LabConfig
from kvmstate.lab.hosts import in_host
from kvmstate.lab.proc import LabError, run

log = logging.getLogger(__name__)


def loop_devices(image: Path) -> list[str]:
    """Loop devices backed by ``image`` (also stale ones from a crashed run)."""
    out = run(["losetup", "-j", str(image)], check=False).stdout
    return [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]


def create_filesystem(cfg: LabConfig) -> str:
    """A fresh, sparse btrfs image attached to a loop device; returns the device."""
    image = cfg.btrfs_image
    for dev in loop_devices(image):
        run(["losetup", "-d", dev], check=False)
    with contextlib.suppress(FileNotFoundError):
        image.unlink()
    with open(image, "wb") as f:
        f.truncate(BTRFS_SIZE)
    run(["mkfs.btrfs", "-q", "-f", "-L", BTRFS_LABEL, str(image)])
    dev = run(["losetup", "-f", "--show", str(image)]).stdout.strip()
    if not dev.startswith("/dev/loop"):
        raise LabError(f"losetup gave no loop device for {image}")
    (cfg.dir / "loopdev").write_text(dev + "\n")
    return dev


def mount_toplevel(host: HostConfig, device: str) -> None:
    host.outside(BTRFS_TOPLEVEL).mkdir(parents=True, exist_ok=True)
    in_host(host, ["mount", "-t", "btrfs", device, BTRFS_TOPLEVEL])


def detach(cfg: LabConfig) -> None:
    for dev in loop_devices(cfg.btrfs_image):
        run(["losetup", "-d", dev], check=False)
    with contextlib.suppress(FileNotFoundError):
        (cfg.dir / "loopdev").unlink()


def host_mounts(host: HostConfig) -> list[tuple[str, str, str]]:
    """(source, mountpoint, fstype) of every mount inside ``host``'s mount namespace."""
    out = in_host(host, ["cat", "/proc/self/mounts"])
    mounts = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            mounts.append((parts[0], _unescape(parts[1]), parts[2]))
    return mounts


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")


def reset(host: HostConfig) -> None:
    """Back to bare: only the top level mounted, no subvolume, nothing else under /srv."""
    srv_mounts = [
        mp for _src, mp, _fs in host_mounts(host) if mp.startswith("/srv/") and mp != BTRFS_TOPLEVEL
    ]
    for mp in sorted(set(srv_mounts), key=len, reverse=True):
        in_host(host, ["umount", mp])
    subvols = []
    out = in_host(host, ["btrfs", "subvolume", "list", BTRFS_TOPLEVEL])
    for line in out.splitlines():
        # "ID 256 gen 7 top level 5 path images"
        path = line.split(" path ", 1)[1] if " path " in line else ""
        if path:
            subvols.append(path)
    for path in sorted(subvols, key=len, reverse=True):
        in_host(host, ["btrfs", "subvolume", "delete", f"{BTRFS_TOPLEVEL}/{path}"])
    # Plain files left at the top level and mount points under /srv.
    for entry in os.scandir(host.outside("/srv")):
        if entry.name != "btrfs":
            run(["rm", "-rf", "--one-file-system", entry.path])
    # The top level is only visible inside the host; clear it there.
    listing = in_host(host, ["ls", "-A", BTRFS_TOPLEVEL]).split()
    for name in listing:
        in_host(host, ["rm", "-rf", "--one-file-system", f"{BTRFS_TOPLEVEL}/{name}"])
