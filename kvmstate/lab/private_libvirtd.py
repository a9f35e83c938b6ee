"""A private libvirtd for tests and benchmarks that need a real daemon but not the lab: started
in its own mount + network namespace (tmpfs over its state dirs, a copy of /etc/libvirt with
no autostart), so nothing of the machine's or the lab's libvirt is touched; stopped by its PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from kvmstate.lab.proc import stop

RUN = """set -e
mount -t tmpfs tmpfs /run
mkdir -p /run/libvirt
mount --bind {root}/sock /run/libvirt
mount --bind {root}/etc /etc/libvirt
for d in /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; do
  [ -d "$d" ] && mount -t tmpfs tmpfs "$d"
done
mkdir -p /var/log/libvirt/qemu
exec /usr/sbin/libvirtd -f /etc/libvirt/libvirtd.conf
"""


def unavailable() -> str | None:
    """Why a private libvirtd cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root"
    if not shutil.which("unshare") or not os.path.exists("/usr/sbin/libvirtd"):
        return "needs unshare and /usr/sbin/libvirtd"
    return None


@contextlib.contextmanager
def private_libvirtd(root: Path) -> Iterator[tuple[str, int]]:
    """Yields the daemon's socket path and PID (``unshare`` and ``sh`` exec into it); raises
    ``RuntimeError`` with the end of its log when it does not come up."""
    (root / "sock").mkdir(parents=True)
    shutil.copytree("/etc/libvirt", root / "etc")
    for autostart in (root / "etc").glob("**/autostart"):
        shutil.rmtree(autostart)
        autostart.mkdir()
    with (root / "etc" / "libvirtd.conf").open("a") as f:
        f.write(
            f'\nauth_unix_rw = "none"\nhost_uuid = "{uuid.uuid4()}"\n'
            "max_clients = 5000\nmax_workers = 40\nmax_client_requests = 20\n"
        )
    with (root / "etc" / "qemu.conf").open("a") as f:
        f.write(
            '\nuser = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\n'
            'security_driver = "none"\ncgroup_controllers = [ ]\nnamespaces = [ ]\n'
            # no virtlogd in the private namespace: QEMU's console log goes to a file
            'stdio_handler = "file"\n'
        )
    (root / "run.sh").write_text(RUN.format(root=root))
    log = root / "libvirtd.log"
    argv = ["unshare", "--mount", "--net", "--propagation", "private", "--"]
    with log.open("wb") as fh:
        proc = subprocess.Popen([*argv, "sh", str(root / "run.sh")], stdout=fh, stderr=fh)
    sock = root / "sock" / "libvirt-sock"
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd did not start: {log.read_text()[-500:]}")
            time.sleep(0.05)
        time.sleep(0.2)
        yield str(sock), proc.pid
    finally:
        stop(proc)
