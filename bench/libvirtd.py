"""A private libvirtd for B3: started in its own mount + network namespace (tmpfs over its
state dirs, a copy of /etc/libvirt), so nothing of the machine's or the lab's libvirt is
touched; stopped by its PID. Then preloaded with the pools, volumes and (shut-off) domains
the simulated spec asks for, built with kvmstate's own XML builders.
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
from typing import Any

from bench.common import stop

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


def available() -> str | None:
    """Why a private libvirtd cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root"
    if not shutil.which("unshare") or not os.path.exists("/usr/sbin/libvirtd"):
        return "needs unshare and /usr/sbin/libvirtd"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "needs libvirt-python"
    return None


@contextlib.contextmanager
def private_libvirtd(root: Path) -> Iterator[tuple[str, int]]:
    """Yields the daemon's socket path and PID (``unshare`` and ``sh`` exec into it)."""
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


def preload(sock: str, spec: Any) -> dict[str, int]:
    """Define/start/autostart every pool, create every volume, define every domain (shut off,
    no autostart) of ``spec`` in the private libvirtd. Idempotent."""
    import libvirt

    from kvmstate import virt
    from kvmstate.resources.domain import disk_sources
    from kvmstate.transport.libvirt import unix_uri
    from kvmstate.virtxml import build_domain_xml, desired_config

    conn = libvirt.open(unix_uri(sock))
    counts = {"pools": 0, "volumes": 0, "domains": 0}
    try:
        have_pools = set(conn.listStoragePools()) | set(conn.listDefinedStoragePools())
        for name, p in spec.pools.items():
            Path(p.path).mkdir(parents=True, exist_ok=True)
            if name not in have_pools:
                virt.define_pool(conn, name, p.path)
                virt.start_pool(conn, name)
                virt.set_pool_autostart(conn, name, p.autostart)
                counts["pools"] += 1
        for name, v in spec.volumes.items():
            pool = conn.storagePoolLookupByName(v.pool)
            if name not in pool.listVolumes():
                virt.create_volume(conn, v.pool, name, v.format, v.capacity)
                counts["volumes"] += 1
        have_doms = {d.name() for d in conn.listAllDomains(0)}
        for name, d in spec.domains.items():
            if name not in have_doms:
                want = desired_config(d, disk_sources(spec, d))
                virt.define_domain(conn, build_domain_xml(name, want))
                counts["domains"] += 1
    finally:
        conn.close()
    return counts
