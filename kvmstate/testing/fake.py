"""An in-memory cluster for fast tests: fake hosts with a filesystem, a mount table, btrfs
subvolumes and an NFS export table, plus libvirt's real ``test:///`` driver per host.

Each ``FakeHost`` emulates exactly the commands the resources run and rejects anything else
(``FakeCommandError``), so a test fails when a resource runs an unexpected command. ``run_many``
counts as one round trip (``host.round_trips``).

libvirt: ``test:///default`` is one shared instance per process, so every fake host opens
``test:///<tmpfile>.xml`` (an empty ``<node/>``): its own driver. The test driver keeps volumes
in memory and has no files, so ``FakeLibvirt.run`` keeps both worlds consistent at the
``kvmstate.virt`` seam: creating/resizing/deleting a volume also writes/removes its file in the
fake filesystem, ``refresh_pool``/``start_pool`` rescan the (possibly NFS-shared) directory like
a real dir pool, ``resize_volume`` (unsupported by the test driver) is emulated by re-creating
the volume, and ``migrate`` (unsupported, code 3) by define+start on the target and
destroy+undefine on the source. These are the documented compromises of the fake. The fake
does this with plain libvirt calls and its own XML reading (never ``kvmstate.virt``'s or
``kvmstate.virtxml``'s helpers), and its hosts print command output as the real commands do
(see ``fake_cmds``), so kvmstate's parsers and helpers are tested, not mirrored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from kvmstate import virt
from kvmstate.errors import HostUnreachable, TransportError
from kvmstate.resources import prereq, seed
from kvmstate.spec import Spec
from kvmstate.testing.fake_cmds import (
    Fail,
    FakeBtrfs,
    FakeCommandError,
    FakeFile,
    FakeMount,
    is_under,
    octal_escape,
    run_command,
)
from kvmstate.transport.base import CommandResult, Libvirt, Process, Shell, Transports
from kvmstate.transport.libvirt import libvirt_module

T = TypeVar("T")


class FakeHost:
    """One fake machine. Tests set it up and mutate it behind kvmstate's back."""

    def __init__(self, cluster: FakeCluster, name: str, address: str) -> None:
        self.cluster = cluster
        self.name = name
        self.address = address
        self.files: dict[str, FakeFile] = {
            "/etc/fstab": FakeFile(
                "# /etc/fstab: static file system information.\n"
                "UUID=1111-2222 / ext4 errors=remount-ro 0 1\n"
            ),
        }
        self.dirs: set[str] = {"/", "/etc", "/run", "/var", "/var/lib", "/var/lib/libvirt", "/srv"}
        self.mounts: list[FakeMount] = [FakeMount("/dev/vda1", "/", "ext4", ("rw", "relatime"))]
        self.btrfs: dict[str, FakeBtrfs] = {}
        self.exports_live: dict[tuple[str, str], frozenset[str]] = {}
        self.bridges: set[str] = set()
        self.enslaved: dict[str, str] = {}  # tap -> bridge, from `ip link set ... master`
        self.users: set[str] = {"root"}
        self.groups: set[str] = {"root"}
        self.mem_available = 8 * 1024**3
        self.missing: set[str] = set()  # prerequisite probes that fail ("cmd:btrfs")
        self.packages: set[str] = set()  # installed Debian packages (dpkg knows every name)
        self.apt_lists_fresh = True  # False: apt-get install fails until apt-get update
        self.nfs_as_fuse = False  # show NFS mounts as fuse.glusterfs (the lab's client)
        self.reachable = True
        self.failures: dict[tuple[str, ...], tuple[int, str, str]] = {}
        self.lock_holder: str | None = None  # the cluster lock script's holder line, while held
        self.ignores_acpi: set[str] = set()  # domains whose guest ignores the power button
        self.shutdown_requests: list[str] = []  # domains asked to shut down (ACPI / agent)
        self.round_trips = 0
        self.history: list[tuple[str, ...]] = []
        fd, self._xml = tempfile.mkstemp(prefix=f"kvmstate-fake-{name}-", suffix=".xml")
        with os.fdopen(fd, "w") as f:
            f.write("<node/>")
        self.uri = f"test://{self._xml}"
        self._conn: Any = None

    # --- setup helpers for tests ---------------------------------------------------------------
    def add_btrfs(self, node: str, label: str | None = None, uuid: str = "") -> FakeBtrfs:
        fs = FakeBtrfs(node, label, uuid or f"uuid-{len(self.btrfs)}")
        self.btrfs[node] = fs
        return fs

    def install(self, packages: Sequence[str]) -> None:
        """Install ``packages``: what each provides (prereq.REQUIREMENTS) stops being missing."""
        self.packages.update(packages)
        for r in prereq.REQUIREMENTS.values():
            if r.package in packages:
                self.missing.discard(prereq.probe_of(r))

    def fail(self, argv_prefix: Sequence[str], stderr: str = "failed", status: int = 1) -> None:
        """Make every command starting with ``argv_prefix`` fail."""
        self.failures[tuple(argv_prefix)] = (status, "", stderr)

    def respond(self, argv_prefix: Sequence[str], stdout: str, status: int = 0) -> None:
        """Make every command starting with ``argv_prefix`` print ``stdout`` (hostile host)."""
        self.failures[tuple(argv_prefix)] = (status, stdout, "")

    def read(self, path: str) -> str | None:
        host, p = self.resolve(path)
        f = host.files.get(p)
        return None if f is None else f.content

    def write(self, path: str, content: str) -> None:
        host, p = self.resolve(path)
        host.files[p] = FakeFile(content, size=len(content))

    def mount_at(self, mountpoint: str) -> FakeMount | None:
        found = None
        for m in self.mounts:
            if m.mountpoint == mountpoint:
                found = m
        return found

    def conn(self) -> Any:
        if self._conn is None:
            self._conn = libvirt_module().open(self.uri)
        return self._conn

    # --- filesystem --------------------------------------------------------------------------
    def resolve(self, path: str) -> tuple[FakeHost, str]:
        """Follow an NFS mount covering ``path`` to the server's filesystem."""
        best: FakeMount | None = None
        for m in self.mounts:
            nfs = is_under(path, m.mountpoint) and m.source.count(":") == 1
            if nfs and (best is None or len(m.mountpoint) >= len(best.mountpoint)):
                best = m
        if best is None:
            return self, path
        server, _, base = best.source.partition(":")
        host = self.cluster.by_address(server)
        rest = path[len(best.mountpoint) :].lstrip("/")
        return host, (base.rstrip("/") + "/" + rest) if rest else base

    def is_dir(self, path: str) -> bool:
        host, p = self.resolve(path)
        return p in host.dirs

    def listdir(self, path: str) -> list[str]:
        host, p = self.resolve(path)
        prefix = p.rstrip("/") + "/"
        names = {x[len(prefix) :].split("/")[0] for x in [*host.files, *host.dirs]}
        return sorted(
            n
            for n in names
            if n and any(y.startswith(prefix + n) for y in [*host.files, *host.dirs])
        )

    def proc_mountinfo(self) -> str:
        lines = []
        for i, m in enumerate(self.mounts):
            lines.append(
                f"{20 + i} 1 0:{30 + i} {octal_escape(m.root)} {octal_escape(m.mountpoint)} "
                f"{','.join(m.options)} - {m.fstype} {octal_escape(m.source)} "
                f"{','.join(m.super_options) or 'rw'}"
            )
        return "\n".join(lines) + "\n"

    # --- running commands ----------------------------------------------------------------------
    def execute(self, argv: Sequence[str], input: str | None = None) -> CommandResult:
        argv = tuple(argv)
        self.history.append(argv)
        for prefix, (status, stdout, stderr) in self.failures.items():
            if argv[: len(prefix)] == prefix:
                return CommandResult(self.name, argv, status, stdout, stderr)
        try:
            out = run_command(self, argv, input)
        except FakeCommandError:
            raise
        except Fail as e:
            return CommandResult(self.name, argv, e.status, e.stdout, e.stderr)
        return CommandResult(self.name, argv, 0, out, "")

    def end(self, argv: tuple[str, ...]) -> None:
        """A started command's stdin was closed: it exits (the cluster lock is released)."""
        if argv[:2] == ("sh", "-c") and argv[3:4] == ("kvmstate-lock",) and self.lock_holder:
            self.lock_holder = None
        if argv[:2] == ("sh", "-c") and argv[3:4] == ("kvmstate-lockprobe",):
            for key in [k for k, v in self.cluster.flocks.items() if v == self.name]:
                del self.cluster.flocks[key]

    def check_reachable(self) -> None:
        if not self.reachable:
            raise HostUnreachable(self.name, "connection refused (fake host marked unreachable)")


class FakeShell:
    def __init__(self, host: FakeHost) -> None:
        self._host = host
        self.host = host.name

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
        timeout: float | None = None,
    ) -> CommandResult:
        self._host.check_reachable()
        self._host.round_trips += 1
        res = self._host.execute(argv, input)
        return res.check() if check else res

    async def run_many(self, argvs: Sequence[Sequence[str]]) -> list[CommandResult]:
        self._host.check_reachable()
        self._host.round_trips += 1
        return [self._host.execute(a) for a in argvs]

    async def start(self, argv: Sequence[str]) -> FakeProcess:
        self._host.check_reachable()
        self._host.round_trips += 1
        return FakeProcess(self._host, self._host.execute(argv))


class FakeProcess:
    """A started command: its output is what ``execute`` printed; a command that succeeded
    keeps running until ``close`` (then ``FakeHost.end``), one that failed has exited."""

    def __init__(self, host: FakeHost, result: CommandResult) -> None:
        self._host = host
        self._result = result
        self._lines = result.stdout.splitlines(keepends=True)
        self._closed = False

    async def readline(self) -> str:
        return self._lines.pop(0) if self._lines else ""

    async def finish(self) -> CommandResult:
        rest, self._lines = "".join(self._lines), []
        self._closed = True
        r = self._result
        return CommandResult(r.host, r.argv, r.exit_status, rest, r.stderr)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._result.ok:
                self._host.end(self._result.argv)


class FakeLibvirt:
    """libvirt's test driver for one fake host, kept consistent with the fake filesystem."""

    def __init__(self, host: FakeHost) -> None:
        self._host = host
        self.host = host.name

    async def connect(self) -> Any:
        self._host.check_reachable()
        return self._host.conn()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        self._host.check_reachable()
        try:
            return await asyncio.to_thread(self._call, fn, *args)
        except libvirt_module().libvirtError as e:
            raise TransportError(self.host, getattr(fn, "__name__", "libvirt"), None, str(e)) from e

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        h = self._host
        if fn is virt.resize_volume:
            _, pool, name, capacity = args
            lvpool = h.conn().storagePoolLookupByName(pool)
            vol = lvpool.storageVolLookupByName(name)
            path = vol.path()
            vol.delete(0)
            lvpool.createXML(_volume_xml(name, capacity), 0)
            fh, p = h.resolve(path)
            fh.files.setdefault(p, FakeFile()).size = capacity
            return None  # type: ignore[return-value]
        if fn is virt.migrate:
            self._migrate(*args)
            return None  # type: ignore[return-value]
        if fn is virt.shutdown_domain:
            return self._shutdown(*args)  # type: ignore[return-value]
        if fn is seed.write_seed_volume:
            self._write_seed(*args)
            return None  # type: ignore[return-value]
        if fn in (virt.refresh_pool, virt.start_pool):
            self._sync_pool(args[1], starting=fn is virt.start_pool)
        if fn is virt.upload_volume:
            return self._upload(*args)  # type: ignore[return-value]
        result = fn(*args)
        if fn in (virt.create_upload_target, virt.create_overlay):
            pool, name, size = args[1], args[2], args[3]
            path = h.conn().storagePoolLookupByName(pool).storageVolLookupByName(name).path()
            fh, p = h.resolve(path)
            fh.files[p] = FakeFile(size=size, mode="0600")
        elif fn is virt.clone_volume:
            _, pool, name, _fmt, base_pool, base = args
            lvpool = h.conn().storagePoolLookupByName(base_pool)
            bfh, bp = h.resolve(lvpool.storageVolLookupByName(base).path())
            path = h.conn().storagePoolLookupByName(pool).storageVolLookupByName(name).path()
            fh, p = h.resolve(path)
            fh.files[p] = dataclasses.replace(bfh.files[bp], mode="0600")
        if fn is virt.create_volume:
            _, pool, name, _fmt, capacity = args
            path = h.conn().storagePoolLookupByName(pool).storageVolLookupByName(name).path()
            fh, p = h.resolve(path)
            fh.files[p] = FakeFile(size=capacity, mode="0600")
        elif fn is virt.delete_volume:
            _, pool, name = args
            pool_path = _pool_path(h.conn().storagePoolLookupByName(pool))
            fh, p = h.resolve(f"{pool_path}/{name}")
            fh.files.pop(p, None)
        return result

    def _upload(self, conn: Any, pool: str, name: str, chunks: Any, length: int) -> int:
        """The test driver has no upload stream: take the bytes as libvirt would, write the
        file, and show the volume as libvirt does after it probed what was sent."""
        data = b"".join(chunks)
        if len(data) != length:
            raise ValueError(f"the source gave {len(data)} bytes, {length} were announced")
        lvpool = conn.storagePoolLookupByName(pool)
        vol = lvpool.storageVolLookupByName(name)
        fh, p = self._host.resolve(vol.path())
        f = FakeFile(data=data, size=len(data), mode="0600")
        fh.files[p] = f
        vol.delete(0)
        fmt, capacity = _probe(name, f)
        lvpool.createXML(_volume_xml(name, capacity, fmt), 0)
        return length

    def _sync_pool(self, name: str, starting: bool) -> None:
        h = self._host
        pools = {p.name(): p for p in h.conn().listAllStoragePools(0)}
        pool = pools.get(name)
        if pool is None:
            return
        path = _pool_path(pool)
        if starting and not h.is_dir(path):
            raise libvirt_module().libvirtError(
                f"cannot open directory '{path}': No such file or directory"
            )
        if not pool.isActive() and not starting:
            return
        if starting:
            pool.create(0)
        fh, base = h.resolve(path)
        present = {n: fh.files[f"{base}/{n}"] for n in h.listdir(path) if f"{base}/{n}" in fh.files}
        for vol in pool.listVolumes():
            if vol not in present:
                pool.storageVolLookupByName(vol).delete(0)
        have = set(pool.listVolumes())
        for n, f in present.items():
            if n not in have:
                pool.createXML(_volume_xml(n, *_probe(n, f)[::-1]), 0)

    def _shutdown(self, conn: Any, name: str, agent: bool) -> bool:
        """The test driver's shutdownFlags takes no flags (ACPI, agent): a guest that answers
        powers off at once (flags 0); one in ``ignores_acpi`` does nothing."""
        dom = conn.lookupByName(name)
        if not dom.isActive():
            return False
        self._host.shutdown_requests.append(name)
        if name not in self._host.ignores_acpi:
            dom.shutdown()
        return True

    def _write_seed(self, conn: Any, pool_name: str, name: str, seed_: Any) -> None:
        """The test driver has no virStorageVolUpload: the volume is created (mode 0600, like
        the real call's XML asks) and the bytes land in the fake file."""
        image: bytes = seed_.image
        pool = conn.storagePoolLookupByName(pool_name)
        if name not in pool.listVolumes():
            pool.createXML(_volume_xml(name, len(image)), 0)
        h = self._host
        fh, p = h.resolve(f"{_pool_path(pool)}/{name}")
        old = fh.files.get(p)
        mode = old.mode if old is not None and old.size == len(image) else "0600"
        fh.files[p] = FakeFile(size=len(image), mode=mode, data=image)

    def _migrate(self, src: Any, dst: Any, name: str, params: Any, flags: int) -> None:
        lv = libvirt_module()
        dom = src.lookupByName(name)
        dst.defineXML(dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE | lv.VIR_DOMAIN_XML_SECURE))
        dst.lookupByName(name).create()
        if dom.isActive():
            dom.destroy()
        dom.undefine()


# The fake's own reading and writing of libvirt XML (not kvmstate.virtxml's, whose bugs the
# fake must not mirror).


def _pool_path(pool: Any) -> str:
    root = ET.fromstring(pool.XMLDesc(0))  # noqa: S314 - from the fake host's own driver
    path = root.findtext("target/path")
    if not path:
        raise AssertionError(f"fake: pool {pool.name()} has no target path")
    return path


def _volume_xml(name: str, capacity: int, fmt: str | None = None) -> str:
    vol = ET.Element("volume")
    ET.SubElement(vol, "name").text = name
    ET.SubElement(vol, "capacity", unit="bytes").text = str(capacity)
    target = ET.SubElement(vol, "target")
    fmt = fmt or ("qcow2" if name.endswith(".qcow2") else "raw")
    ET.SubElement(target, "format", type=fmt)
    return ET.tostring(vol, encoding="unicode")


QCOW2_MAGIC = b"QFI\xfb"


def fake_qcow2(virtual_size: int, payload: bytes = b"") -> bytes:
    """The start of a qcow2 image (magic, version 3, virtual size at offset 24): enough for
    the fake's probe (and libvirt's) to call it qcow2 of that size."""
    header = QCOW2_MAGIC + (3).to_bytes(4, "big") + bytes(16) + virtual_size.to_bytes(8, "big")
    return header + payload


def _probe(name: str, f: FakeFile) -> tuple[str, int]:
    """What a dir pool shows for a file: libvirt reads a qcow2 header (format and virtual
    size); a file the fake holds no bytes of goes by its name and size."""
    if f.data is not None and f.data[:4] == QCOW2_MAGIC and len(f.data) >= 32:
        return "qcow2", int.from_bytes(f.data[24:32], "big")
    if f.data is not None:
        return "raw", len(f.data)
    return ("qcow2" if name.endswith(".qcow2") else "raw"), f.size


class FakeCluster:
    """``FakeCluster(spec)`` or ``FakeCluster({"name": "address"})``: implements Transports."""

    def __init__(self, spec_or_hosts: Spec | dict[str, str]) -> None:
        hosts = (
            {n: h.address for n, h in spec_or_hosts.hosts.items()}
            if isinstance(spec_or_hosts, Spec)
            else dict(spec_or_hosts)
        )
        self.hosts = {n: FakeHost(self, n, a) for n, a in hosts.items()}
        self.flocks: dict[tuple[str, str], str] = {}  # (host, path) -> holder (lock probes)

    def __getitem__(self, name: str) -> FakeHost:
        return self.hosts[name]

    def by_address(self, address: str) -> FakeHost:
        for h in self.hosts.values():
            if h.address == address or h.name == address:
                return h
        raise Fail(f"mount.nfs: Failed to resolve server {address}", 32)

    def shell(self, host: str) -> FakeShell:
        return FakeShell(self.hosts[host])

    def libvirt(self, host: str) -> FakeLibvirt:
        return FakeLibvirt(self.hosts[host])

    def round_trips(self) -> dict[str, int]:
        return {n: h.round_trips for n, h in self.hosts.items()}

    async def connect_all(self) -> None:
        """Nothing to open: fake hosts are in memory."""

    async def close(self) -> None:
        for h in self.hosts.values():
            if h._conn is not None:
                h._conn.close()
                h._conn = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(h._xml)

    def client_allowed(self, server: FakeHost, path: str, client: FakeHost) -> bool:
        for (p, who), _opts in server.exports_live.items():
            if p != path:
                continue
            if who == "*" or who in (client.address, client.name):
                return True
            try:
                if ipaddress.ip_address(client.address) in ipaddress.ip_network(who, strict=False):
                    return True
            except ValueError:
                continue
        return False


__all__ = [
    "FakeBtrfs",
    "FakeCluster",
    "FakeCommandError",
    "FakeFile",
    "FakeHost",
    "FakeMount",
    "fake_qcow2",
]


def _conforms(c: FakeCluster, p: FakeProcess) -> tuple[Transports, Shell, Libvirt, Process]:
    """Never called: lets mypy check that the fake classes satisfy the protocols."""
    return c, c.shell(""), c.libvirt(""), p
