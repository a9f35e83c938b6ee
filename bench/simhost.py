"""Simulated hosts for B3: in-process asyncssh servers on 127.0.0.0/8 that answer kvmstate's
observation commands like a CONVERGED host would.

One layout (``layout(n)``) is shared by the server side (canned outputs) and the bench side
(the spec), so the two cannot disagree. Every 10th host is a storage host (a btrfs subvolume
mounted on its own path and exported over NFS); the other nine of its group are KVM hosts that
mount the export (and, with libvirt, have a dir pool, a volume and a shut-off domain each).

The server understands exactly two request shapes:
* ``LC_ALL=C sh -s`` with ``run_many``'s batch script on stdin: each ``_k I ARGV...`` line is
  answered from the host's canned table and framed exactly as the real wrapper frames it
  (status line, ``wc -c`` sizes, one base64 blob, end line);
* ``LC_ALL=C ARGV...`` (a single ``Shell.run``).
Anything else, and any argv not in the table, exits 127 ("not found"), so nothing passes
silently. Each exec sleeps ``delay`` seconds before answering (the injected round trip).
A direct-streamlocal forward to ``/run/libvirt/libvirt-sock`` is connected to the one real
libvirtd the bench started (``--libvirt-socket``); without it, forwards are refused.

Run as a process: ``python -m bench.simhost --n N --out ports.json [--libvirt-socket S]
[--pool-dir D] [--delay 0.02]``; it writes {"ports": {...}, "known_hosts": ...} and serves
until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shlex
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GROUP = 10
LIBVIRT_SOCK = "/run/libvirt/libvirt-sock"
EXPORT_OPTS = ["rw", "sync", "no_root_squash", "no_subtree_check"]
EXPORT_NET = "127.0.0.0/8"
MOUNT_OPTS = ["nolock", "_netdev"]
SUBVOL_OPTS = ["defaults", "noatime"]


@dataclass
class SimHost:
    name: str
    address: str
    role: str  # "storage" | "kvm"
    group: int
    storage: str  # the group's storage host name
    storage_address: str
    mountpoint: str  # storage: the subvolume's mountpoint; kvm: the NFS mountpoint
    port: int = 0
    table: dict[tuple[str, ...], tuple[bytes, bytes, int]] = field(default_factory=dict)


def _addr(i: int) -> str:
    return f"127.0.{1 + i // 250}.{1 + i % 250}"


def layout(n: int, pool_dir: str | None = None) -> list[SimHost]:
    """``n`` hosts: in each group of 10, one storage host and nine KVM hosts."""
    hosts: list[SimHost] = []
    for i in range(n):
        g, k = divmod(i, GROUP)
        st_i = g * GROUP
        storage = f"st-g{g:02d}"
        if k == 0:
            mp = f"/srv/images-g{g:02d}"
            hosts.append(SimHost(storage, _addr(i), "storage", g, storage, _addr(st_i), mp))
        else:
            mp = f"{pool_dir}/g{g:02d}" if pool_dir else f"/var/lib/libvirt/images-g{g:02d}"
            hosts.append(SimHost(f"kvm-g{g:02d}-{k}", _addr(i), "kvm", g, storage, _addr(st_i), mp))
    return hosts


def spec_dict(
    hosts: list[SimHost],
    *,
    identity: str,
    known_hosts: str,
    ssh_config: str,
    libvirt: bool,
) -> dict[str, Any]:
    """The kvmstate spec (as a dict, for YAML) whose observed state the simulated hosts have."""
    spec: dict[str, Any] = {
        "version": 1,
        "ssh": {
            "user": "root",
            "identity": identity,
            "known_hosts": known_hosts,
            "config": ssh_config,
            "connect_timeout": 20,
        },
        "hosts": {},
        "subvolumes": {},
        "exports": {},
        "mounts": {},
    }
    if libvirt:
        spec.update({"pools": {}, "volumes": {}, "domains": {}})
    for h in hosts:
        spec["hosts"][h.name] = {"address": h.address, "ssh": {"port": h.port}}
        g = f"g{h.group:02d}"
        if h.role == "storage":
            spec["subvolumes"][f"images-{g}"] = {
                "host": h.name,
                "device": f"LABEL=sim-{g}",
                "toplevel": "/srv/btrfs",
                "mountpoint": h.mountpoint,
                "mount_options": SUBVOL_OPTS,
            }
            spec["exports"][f"images-{g}"] = {
                "host": h.name,
                "path": h.mountpoint,
                "clients": [{"network": EXPORT_NET, "options": EXPORT_OPTS}],
            }
            continue
        m = spec["mounts"].setdefault(
            f"images-{g}",
            {
                "export": f"images-{g}",
                "hosts": [],
                "mountpoint": h.mountpoint,
                "nfs_version": "3",
                "options": MOUNT_OPTS,
            },
        )
        m["hosts"].append(h.name)
        if libvirt:
            spec["pools"][f"p-{h.name}"] = {
                "type": "dir",
                "path": f"{h.mountpoint}/{h.name}",
                "hosts": [h.name],
                "autostart": True,
            }
            spec["volumes"][f"v-{h.name}.qcow2"] = {
                "pool": f"p-{h.name}",
                "format": "qcow2",
                "capacity": "1MiB",
            }
            spec["domains"][f"d-{h.name}"] = {
                "type": "qemu",
                "memory": "64MiB",
                "vcpus": 1,
                "disks": [{"volume": f"v-{h.name}.qcow2", "bus": "virtio", "cache": "none"}],
                "state": "shut-off",
                "host": h.name,
            }
    return spec


# --- canned outputs ------------------------------------------------------------------------------


def fill_table(h: SimHost) -> None:
    """What a converged host answers (texts in the real tools' formats)."""
    from kvmstate.nfsexports import EXPORTS_D_SCRIPT, export_line
    from kvmstate.resources.common import fstab_line

    ok = lambda s: (s.encode(), b"", 0)  # noqa: E731
    root = "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
    proc = "23 22 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:2 - proc proc rw\n"
    t = h.table
    g = f"g{h.group:02d}"
    if h.role == "storage":
        dev = f"/dev/loop{h.group}"
        fstab = (
            "# /etc/fstab: static file system information.\n"
            "/dev/vda1 / ext4 errors=remount-ro 0 1\n"
            + fstab_line(
                f"LABEL=sim-{g}", h.mountpoint, "btrfs", [f"subvol=images-{g}", *SUBVOL_OPTS]
            )
            + "\n"
        )
        mountinfo = (
            root + proc + f"40 22 0:40 / /srv/btrfs rw,relatime shared:20 - btrfs {dev} "
            "rw,space_cache=v2,subvolid=5,subvol=/\n"
            + f"41 22 0:40 /images-{g} {h.mountpoint} rw,noatime shared:21 - btrfs {dev} "
            f"rw,space_cache=v2,subvolid=256,subvol=/images-{g}\n"
        )
        t[("cat", "--", "/etc/fstab")] = ok(fstab)
        t[("cat", "--", "/proc/self/mountinfo")] = ok(mountinfo)
        t[("blkid", "-o", "device", "-t", f"LABEL=sim-{g}")] = ok(dev + "\n")
        t[("btrfs", "subvolume", "list", "/srv/btrfs")] = ok(
            f"ID 256 gen 12 top level 5 path images-{g}\n"
        )
        t[("cat", "--", "/etc/exports")] = ok(
            "# /etc/exports\n" + export_line(h.mountpoint, [(EXPORT_NET, EXPORT_OPTS)]) + "\n"
        )
        t[("sh", "-c", EXPORTS_D_SCRIPT)] = ok("")
        t[("exportfs", "-v")] = ok(
            f"{h.mountpoint}\n\t\t{EXPORT_NET}(sync,wdelay,hide,no_subtree_check,sec=sys,rw,"
            "secure,no_root_squash,no_all_squash)\n"
        )
    else:
        src = f"{h.storage_address}:/srv/images-{g}"
        fstab = (
            "/dev/vda1 / ext4 errors=remount-ro 0 1\n"
            + fstab_line(src, h.mountpoint, "nfs", ["vers=3", *MOUNT_OPTS])
            + "\n"
        )
        mountinfo = (
            root + proc + f"50 22 0:50 / {h.mountpoint} rw,relatime shared:30 - nfs {src} "
            f"rw,vers=3,rsize=1048576,wsize=1048576,hard,nolock,proto=tcp,addr={h.storage_address}\n"
        )
        t[("cat", "--", "/etc/fstab")] = ok(fstab)
        t[("cat", "--", "/proc/self/mountinfo")] = ok(mountinfo)
    t[("true",)] = ok("")


def answer(h: SimHost, argv: tuple[str, ...]) -> tuple[bytes, bytes, int]:
    if argv[:3] == ("sudo", "-n", "--"):
        argv = argv[3:]
    from kvmstate.resources.prereq import CHECK_SCRIPT

    if argv[:4] == ("sh", "-c", CHECK_SCRIPT, "kvmstate-prereq"):
        return b"", b"", 0  # a converged host has every tool
    got = h.table.get(argv)
    if got is None:
        err = f"sh: 1: {argv[0] if argv else ''}: not found ({shlex.join(argv)})\n"
        return b"", err.encode(), 127
    return got


def run_batch(h: SimHost, script: str) -> bytes:
    """Answer a ``run_many`` script, framed like ``kvmstate.transport.ssh._BATCH_EPILOGUE``."""
    marker = None
    results: list[tuple[bytes, bytes, int]] = []
    for line in script.splitlines():
        if line.startswith("N=KVMSTATE-"):
            marker = line[2:]
        elif line.startswith("_k "):
            words = shlex.split(line)
            if int(words[1]) != len(results):
                raise ValueError(f"batch index out of order: {line!r}")
            results.append(answer(h, tuple(words[2:])))
    if marker is None:
        raise ValueError("no N= line in the batch script")
    out = [f"\n{marker} status{''.join(f' {r[2]}' for r in results)}\n", f"{marker} sizes\n"]
    files: list[tuple[str, bytes]] = []
    for i, (o, e, _) in enumerate(results):
        files += [(f"{i}.o", o), (f"{i}.e", e)]
    for name, data in files:
        out.append(f"{len(data)} {name}\n")
    if len(files) > 1:
        out.append(f"{sum(len(d) for _, d in files)} total\n")
    out.append(f"{marker} data\n")
    blob = base64.encodebytes(b"".join(d for _, d in files)).decode()
    out.append(blob)
    out.append(f"{marker} end\n")
    return "".join(out).encode()


# --- the server --------------------------------------------------------------------------------


class Counters:
    def __init__(self) -> None:
        self.connections = 0
        self.execs = 0
        self.forwards = 0
        self.unknown = 0


def _write_ports(path: str, data: dict[str, Any]) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


async def serve(args: argparse.Namespace, authorized_text: str) -> None:
    from kvmstate.transport.sshlib import asyncssh

    hosts = layout(args.n, args.pool_dir)
    for h in hosts:
        fill_table(h)
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    authorized = asyncssh.import_authorized_keys(authorized_text)
    counters = Counters()
    delay = args.delay

    def make_process_factory(h: SimHost) -> Any:
        async def handle(process: asyncssh.SSHServerProcess[bytes]) -> None:
            counters.execs += 1
            try:
                cmd = process.command or ""
                words = shlex.split(cmd)
                if words[:1] == ["LC_ALL=C"]:
                    words = words[1:]
                if words in (["sh", "-s"], ["sudo", "-n", "--", "sh", "-s"]):
                    script = (await process.stdin.read()).decode()
                    await asyncio.sleep(delay)
                    try:
                        process.stdout.write(run_batch(h, script))
                        status = 0
                    except ValueError as bad:
                        process.stderr.write(f"simhost: {bad}\n".encode())
                        status = 125
                else:
                    await asyncio.sleep(delay)
                    out, err, status = answer(h, tuple(words))
                    process.stdout.write(out)
                    process.stderr.write(err)
                if status == 127:
                    counters.unknown += 1
                process.exit(status)
            except (asyncssh.Error, OSError, ValueError):
                process.exit(255)

        return handle

    def make_server_factory() -> Any:
        class Server(asyncssh.SSHServer):
            def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
                counters.connections += 1
                self.conn = conn

            def unix_connection_requested(self, dest_path: str) -> Any:
                if dest_path != LIBVIRT_SOCK or not args.libvirt_socket:
                    return False
                counters.forwards += 1
                return self.conn.forward_unix_connection(args.libvirt_socket)

        return Server

    servers = []
    for h in hosts:
        srv = await asyncssh.listen(
            h.address,
            0,
            server_host_keys=[host_key],
            authorized_client_keys=authorized,
            server_factory=make_server_factory(),
            process_factory=make_process_factory(h),
            encoding=None,
            allow_scp=False,
            keepalive_interval=0,
        )
        h.port = srv.sockets[0].getsockname()[1]
        servers.append(srv)
    pub = host_key.export_public_key().decode().strip()
    known = "".join(f"[{h.address}]:{h.port} {pub}\n" for h in hosts)
    _write_ports(args.out, {"ports": {h.name: h.port for h in hosts}, "known_hosts": known})

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def report() -> None:
        counts = ("connections", "execs", "forwards", "unknown")
        print(json.dumps({k: getattr(counters, k) for k in counts}), flush=True)

    loop.add_signal_handler(signal.SIGUSR1, report)
    await stop.wait()
    for srv in servers:
        srv.close()
    report()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.simhost")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--authorized", required=True, help="the client's public key file")
    p.add_argument("--delay", type=float, default=0.02)
    p.add_argument("--pool-dir")
    p.add_argument("--libvirt-socket")
    args = p.parse_args(argv)
    asyncio.run(serve(args, Path(args.authorized).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
