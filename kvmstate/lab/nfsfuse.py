"""The lab's NFSv3 client: libnfs (ctypes) exposed through FUSE (mfusepy), run as ``mount.nfs``.

The machine has no kernel NFS client, so inside the lab's KVM hosts ``/sbin/mount.nfs`` is
this program. ``mount -t nfs -o vers=3,nolock SERVER:/PATH DIR`` and fstab entries work
unchanged. The FUSE mount is made with ``fsname=SERVER:/PATH,subtype=glusterfs``: libvirt
treats ``fuse.glusterfs`` as shared storage, so live migration needs no ``VIR_MIGRATE_UNSAFE``
(exactly as with a kernel NFS mount).

One libnfs context serves a single-threaded FUSE loop (one context per FUSE thread leaks
connections when libfuse starts and ends threads). ``nfs_set_timeout`` keeps callers from
hanging when the server goes away.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import stat
import sys
import time
from collections.abc import Sequence
from ctypes import (
    POINTER,
    Structure,
    byref,
    c_char_p,
    c_int,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EX_USAGE = 1
EX_FAIL = 32  # mount(8): "mount failure"
DEFAULT_TIMEOUT_MS = 10_000
LOG_DIR = Path("/run/kvmstate-nfsfuse")


class NfsStat64(Structure):
    _fields_ = [
        (name, c_uint64)
        for name in [
            "nfs_dev",
            "nfs_ino",
            "nfs_mode",
            "nfs_nlink",
            "nfs_uid",
            "nfs_gid",
            "nfs_rdev",
            "nfs_size",
            "nfs_blksize",
            "nfs_blocks",
            "nfs_atime",
            "nfs_mtime",
            "nfs_ctime",
            "nfs_atime_nsec",
            "nfs_mtime_nsec",
            "nfs_ctime_nsec",
            "nfs_used",
        ]
    ]


class NfsStatvfs64(Structure):
    _fields_ = [
        (name, c_uint64)
        for name in [
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_fsid",
            "f_flag",
            "f_namemax",
        ]
    ]


class NfsDirent(Structure):
    # Only the leading members are used; their layout is stable across libnfs versions.
    _fields_ = [
        ("next", c_void_p),
        ("name", c_char_p),
        ("inode", c_uint64),
        ("type", c_uint32),
        ("mode", c_uint32),
    ]


class Timeval(Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


# NF3 file types (ftype3) -> S_IF* bits.
_NF3_TYPES = {
    1: stat.S_IFREG,
    2: stat.S_IFDIR,
    3: stat.S_IFBLK,
    4: stat.S_IFCHR,
    5: stat.S_IFLNK,
    6: stat.S_IFSOCK,
    7: stat.S_IFIFO,
}


def _load_libnfs() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libnfs.so.13")
    except OSError as exc:
        raise NfsError(
            errno.ENOENT, "libnfs13 is not installed (run `kvmstate lab install`)"
        ) from exc
    ctx = c_void_p
    fh = c_void_p
    sigs: dict[str, tuple[Any, list[Any]]] = {
        "nfs_init_context": (ctx, []),
        "nfs_destroy_context": (None, [ctx]),
        "nfs_get_error": (c_char_p, [ctx]),
        "nfs_set_version": (c_int, [ctx, c_int]),
        "nfs_set_timeout": (None, [ctx, c_int]),
        "nfs_set_dircache": (None, [ctx, c_int]),
        "nfs_set_pagecache": (None, [ctx, c_uint32]),
        "nfs_set_uid": (None, [ctx, c_int]),
        "nfs_set_gid": (None, [ctx, c_int]),
        "nfs_umask": (c_uint16, [ctx, c_uint16]),
        "nfs_mount": (c_int, [ctx, c_char_p, c_char_p]),
        "nfs_umount": (c_int, [ctx]),
        "nfs_lstat64": (c_int, [ctx, c_char_p, POINTER(NfsStat64)]),
        "nfs_fstat64": (c_int, [ctx, fh, POINTER(NfsStat64)]),
        "nfs_statvfs64": (c_int, [ctx, c_char_p, POINTER(NfsStatvfs64)]),
        "nfs_opendir": (c_int, [ctx, c_char_p, POINTER(c_void_p)]),
        "nfs_readdir": (POINTER(NfsDirent), [ctx, c_void_p]),
        "nfs_closedir": (None, [ctx, c_void_p]),
        "nfs_open": (c_int, [ctx, c_char_p, c_int, POINTER(fh)]),
        "nfs_create": (c_int, [ctx, c_char_p, c_int, c_int, POINTER(fh)]),
        "nfs_close": (c_int, [ctx, fh]),
        "nfs_pread": (c_int, [ctx, fh, c_uint64, c_uint64, c_void_p]),
        "nfs_pwrite": (c_int, [ctx, fh, c_uint64, c_uint64, c_char_p]),
        "nfs_fsync": (c_int, [ctx, fh]),
        "nfs_truncate": (c_int, [ctx, c_char_p, c_uint64]),
        "nfs_ftruncate": (c_int, [ctx, fh, c_uint64]),
        "nfs_mkdir2": (c_int, [ctx, c_char_p, c_int]),
        "nfs_rmdir": (c_int, [ctx, c_char_p]),
        "nfs_unlink": (c_int, [ctx, c_char_p]),
        "nfs_rename": (c_int, [ctx, c_char_p, c_char_p]),
        "nfs_symlink": (c_int, [ctx, c_char_p, c_char_p]),
        "nfs_readlink": (c_int, [ctx, c_char_p, c_char_p, c_int]),
        "nfs_chmod": (c_int, [ctx, c_char_p, c_int]),
        "nfs_lchown": (c_int, [ctx, c_char_p, c_int, c_int]),
        "nfs_lutimes": (c_int, [ctx, c_char_p, POINTER(Timeval)]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


class NfsError(OSError):
    """A libnfs call failed; ``strerror`` carries libnfs's own message."""


@dataclass(frozen=True)
class Source:
    server: str
    path: str

    @classmethod
    def parse(cls, spec: str) -> Source:
        server, sep, path = spec.partition(":")
        if not sep or not server or not path.startswith("/"):
            raise ValueError(f"{spec!r}: expected SERVER:/PATH")
        return cls(server, path)

    def __str__(self) -> str:
        return f"{self.server}:{self.path}"


class NfsClient:
    """One mounted libnfs context (NFSv3). Methods raise ``OSError`` with the errno."""

    def __init__(self, source: Source, timeout_ms: int = DEFAULT_TIMEOUT_MS) -> None:
        self.lib = _load_libnfs()
        self.source = source
        ctx = self.lib.nfs_init_context()
        if not ctx:
            raise NfsError(errno.ENOMEM, "nfs_init_context failed")
        self.ctx = c_void_p(ctx)
        self.lib.nfs_set_version(self.ctx, 3)
        self.lib.nfs_set_timeout(self.ctx, timeout_ms)
        # No client-side caches: other hosts (and a migrated guest) must see writes at once.
        self.lib.nfs_set_dircache(self.ctx, 0)
        self.lib.nfs_set_pagecache(self.ctx, 0)
        self.lib.nfs_umask(self.ctx, 0)
        ret = self.lib.nfs_mount(self.ctx, source.server.encode(), source.path.encode())
        if ret < 0:
            msg = self.error()
            self.lib.nfs_destroy_context(self.ctx)
            self.ctx = c_void_p()
            raise NfsError(-ret, msg)

    def error(self) -> str:
        raw = self.lib.nfs_get_error(self.ctx)
        return raw.decode(errors="replace") if raw else "unknown libnfs error"

    def close(self) -> None:
        if self.ctx:
            self.lib.nfs_destroy_context(self.ctx)
            self.ctx = c_void_p()

    def check(self, ret: int, what: str) -> int:
        if ret < 0:
            log.debug("%s: %s", what, self.error())
            raise OSError(-ret, os.strerror(-ret))
        return ret

    def set_caller(self, uid: int, gid: int) -> None:
        self.lib.nfs_set_uid(self.ctx, uid)
        self.lib.nfs_set_gid(self.ctx, gid)

    def lstat(self, path: str) -> NfsStat64:
        st = NfsStat64()
        self.check(self.lib.nfs_lstat64(self.ctx, path.encode(), byref(st)), "lstat")
        return st

    def fstat(self, fh: c_void_p) -> NfsStat64:
        st = NfsStat64()
        self.check(self.lib.nfs_fstat64(self.ctx, fh, byref(st)), "fstat")
        return st


def _stat_dict(st: NfsStat64) -> dict[str, int]:
    return {
        "st_mode": st.nfs_mode,
        "st_ino": st.nfs_ino or 1,
        "st_nlink": st.nfs_nlink,
        "st_uid": st.nfs_uid,
        "st_gid": st.nfs_gid,
        "st_rdev": st.nfs_rdev,
        "st_size": st.nfs_size,
        "st_blksize": st.nfs_blksize or 4096,
        "st_blocks": st.nfs_used // 512 if st.nfs_used else st.nfs_blocks,
        "st_atime": st.nfs_atime * 10**9 + st.nfs_atime_nsec,
        "st_mtime": st.nfs_mtime * 10**9 + st.nfs_mtime_nsec,
        "st_ctime": st.nfs_ctime * 10**9 + st.nfs_ctime_nsec,
    }


_OPEN_FLAGS = os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_EXCL | os.O_CREAT


def make_operations(client: NfsClient, ready_fd: int | None) -> Any:
    """FUSE operations over ``client`` (mfusepy is imported here: it loads libfuse)."""
    import mfusepy

    class NfsOperations(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True

        def __init__(self) -> None:
            self.c = client
            self.files: dict[int, c_void_p] = {}
            self.next_fh = 1

        def _caller(self) -> None:
            uid, gid, _pid = mfusepy.fuse_get_context()
            self.c.set_caller(uid, gid)

        def _fh(self, fh: int | None) -> c_void_p:
            if fh is None or fh not in self.files:
                raise mfusepy.FuseOSError(errno.EBADF)
            return self.files[fh]

        def _add(self, nfsfh: c_void_p) -> int:
            fh = self.next_fh
            self.next_fh += 1
            self.files[fh] = nfsfh
            return fh

        def init(self, path: str) -> None:
            if ready_fd is not None:
                os.write(ready_fd, b"ok\n")
                os.close(ready_fd)

        def destroy(self, path: str) -> None:
            for nfsfh in self.files.values():
                self.c.lib.nfs_close(self.c.ctx, nfsfh)
            self.files.clear()
            self.c.close()

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            if fh is not None and fh in self.files:
                return _stat_dict(self.c.fstat(self.files[fh]))
            return _stat_dict(self.c.lstat(path))

        def statfs(self, path: str) -> dict[str, int]:
            sv = NfsStatvfs64()
            self.c.check(self.c.lib.nfs_statvfs64(self.c.ctx, path.encode(), byref(sv)), "statvfs")
            return {f[0]: getattr(sv, f[0]) for f in NfsStatvfs64._fields_}

        def readdir(self, path: str, fh: int) -> list[Any]:
            d = c_void_p()
            self.c.check(self.c.lib.nfs_opendir(self.c.ctx, path.encode(), byref(d)), "opendir")
            entries: list[Any] = []
            try:
                while True:
                    ent = self.c.lib.nfs_readdir(self.c.ctx, d)
                    if not ent:
                        break
                    e = ent.contents
                    name = (e.name or b"").decode(errors="surrogateescape")
                    mode = _NF3_TYPES.get(e.type, stat.S_IFREG) | (e.mode & 0o7777)
                    entries.append((name, {"st_mode": mode, "st_ino": e.inode or 1}, 0))
            finally:
                self.c.lib.nfs_closedir(self.c.ctx, d)
            return entries

        def readlink(self, path: str) -> str:
            buf = ctypes.create_string_buffer(4096)
            self.c.check(self.c.lib.nfs_readlink(self.c.ctx, path.encode(), buf, 4096), "readlink")
            return buf.value.decode(errors="surrogateescape")

        def open(self, path: str, flags: int) -> int:
            self._caller()
            nfsfh = c_void_p()
            ret = self.c.lib.nfs_open(self.c.ctx, path.encode(), flags & _OPEN_FLAGS, byref(nfsfh))
            self.c.check(ret, "open")
            return self._add(nfsfh)

        def create(self, path: str, mode: int, flags: int = os.O_RDWR) -> int:
            self._caller()
            nfsfh = c_void_p()
            ret = self.c.lib.nfs_create(
                self.c.ctx, path.encode(), (flags & _OPEN_FLAGS) | os.O_CREAT, mode, byref(nfsfh)
            )
            self.c.check(ret, "create")
            return self._add(nfsfh)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            nfsfh = self._fh(fh)
            buf = ctypes.create_string_buffer(size)
            n = self.c.check(self.c.lib.nfs_pread(self.c.ctx, nfsfh, offset, size, buf), "pread")
            return buf.raw[:n]

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            nfsfh = self._fh(fh)
            done = 0
            while done < len(data):
                chunk = data[done:]
                ret = self.c.lib.nfs_pwrite(self.c.ctx, nfsfh, offset + done, len(chunk), chunk)
                if ret == -errno.EFAULT and self._full(path, len(chunk)):
                    # libnfs 4.0 reports the server's NFS3ERR_NOSPC as -EFAULT ("pwrite call
                    # failed"): say what it is, so qemu-img and libvirt print "No space left".
                    raise mfusepy.FuseOSError(errno.ENOSPC)
                n = self.c.check(ret, "pwrite")
                if n == 0:
                    raise mfusepy.FuseOSError(errno.EIO)
                done += n
            return done

        def _full(self, path: str, need: int) -> bool:
            sv = NfsStatvfs64()
            if self.c.lib.nfs_statvfs64(self.c.ctx, b"/", byref(sv)) < 0:
                return False
            return int(sv.f_bavail) * max(int(sv.f_frsize or sv.f_bsize), 1) < need

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            self._caller()
            if fh is not None and fh in self.files:
                return self.c.check(
                    self.c.lib.nfs_ftruncate(self.c.ctx, self.files[fh], length), "ftruncate"
                )
            return self.c.check(
                self.c.lib.nfs_truncate(self.c.ctx, path.encode(), length), "truncate"
            )

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            return self.c.check(self.c.lib.nfs_fsync(self.c.ctx, self._fh(fh)), "fsync")

        def flush(self, path: str, fh: int) -> int:
            return 0

        def release(self, path: str, fh: int) -> int:
            nfsfh = self.files.pop(fh, None)
            if nfsfh is not None:
                self.c.lib.nfs_close(self.c.ctx, nfsfh)
            return 0

        def mkdir(self, path: str, mode: int) -> int:
            self._caller()
            return self.c.check(self.c.lib.nfs_mkdir2(self.c.ctx, path.encode(), mode), "mkdir")

        def rmdir(self, path: str) -> int:
            self._caller()
            return self.c.check(self.c.lib.nfs_rmdir(self.c.ctx, path.encode()), "rmdir")

        def unlink(self, path: str) -> int:
            self._caller()
            return self.c.check(self.c.lib.nfs_unlink(self.c.ctx, path.encode()), "unlink")

        def rename(self, old: str, new: str) -> int:
            self._caller()
            return self.c.check(
                self.c.lib.nfs_rename(self.c.ctx, old.encode(), new.encode()), "rename"
            )

        def symlink(self, target: str, source: str) -> int:
            # mfusepy: ``target`` is the new link, ``source`` what it points to.
            self._caller()
            return self.c.check(
                self.c.lib.nfs_symlink(self.c.ctx, source.encode(), target.encode()), "symlink"
            )

        def chmod(self, path: str, mode: int) -> int:
            return self.c.check(self.c.lib.nfs_chmod(self.c.ctx, path.encode(), mode), "chmod")

        def chown(self, path: str, uid: int, gid: int) -> int:
            # (uid_t)-1 means "leave unchanged": pass the current owner.
            if uid in (-1, 0xFFFFFFFF) or gid in (-1, 0xFFFFFFFF):
                st = self.c.lstat(path)
                uid = st.nfs_uid if uid in (-1, 0xFFFFFFFF) else uid
                gid = st.nfs_gid if gid in (-1, 0xFFFFFFFF) else gid
            return self.c.check(self.c.lib.nfs_lchown(self.c.ctx, path.encode(), uid, gid), "chown")

        def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
            now = time.time_ns()
            atime, mtime = times if times is not None else (now, now)
            tv = (Timeval * 2)()
            for i, t in enumerate((atime, mtime)):
                tv[i].tv_sec, tv[i].tv_usec = divmod(int(t) // 1000, 10**6)
            return self.c.check(self.c.lib.nfs_lutimes(self.c.ctx, path.encode(), tv), "utimes")

        def access(self, path: str, amode: int) -> int:
            self.c.lstat(path)
            return 0

    return NfsOperations()


# ----------------------------------------------------------------------------------------
# mount.nfs stand-in


@dataclass
class MountRequest:
    source: Source
    mountpoint: str
    options: list[str]
    read_only: bool
    timeout_ms: int


class MountError(Exception):
    def __init__(self, message: str, code: int = EX_FAIL) -> None:
        super().__init__(message)
        self.code = code


def parse_mount_args(prog: str, argv: Sequence[str]) -> MountRequest:
    """Parse ``mount.nfs SPEC DIR [-o OPTS] [-rvwnsfi]`` as mount(8) calls it."""
    if os.path.basename(prog).startswith("mount.nfs4"):
        raise MountError(
            "mount.nfs4: the kvmstate lab's NFS client speaks NFSv3 only; "
            "mount with -t nfs -o vers=3",
            EX_FAIL,
        )
    positional: list[str] = []
    options: list[str] = []
    read_only = False
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-o":
            if i + 1 >= len(args):
                raise MountError("mount.nfs: -o needs an argument", EX_USAGE)
            options.extend(o for o in args[i + 1].split(",") if o)
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            options.extend(o for o in a[2:].split(",") if o)
        elif a == "-t" and i + 1 < len(args):
            i += 2
            continue
        elif a.startswith("-") and len(a) > 1:
            read_only = read_only or "r" in a[1:]
        else:
            positional.append(a)
        i += 1
    if len(positional) != 2:
        raise MountError("usage: mount.nfs SERVER:/PATH DIR [-o OPTIONS]", EX_USAGE)
    try:
        source = Source.parse(positional[0])
    except ValueError as exc:
        raise MountError(f"mount.nfs: {exc}", EX_USAGE) from exc
    timeout_ms = DEFAULT_TIMEOUT_MS
    for opt in options:
        key, _, value = opt.partition("=")
        if key in ("vers", "nfsvers") and value not in ("3",):
            raise MountError(
                f"mount.nfs: {opt}: the kvmstate lab's NFS client speaks NFSv3 only (use vers=3)",
                EX_FAIL,
            )
        if key == "ro":
            read_only = True
        if key == "timeo" and value.isdigit():
            timeout_ms = max(1000, int(value) * 100)  # timeo is in tenths of a second
    return MountRequest(source, positional[1], options, read_only, timeout_ms)


def mount_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mount.nfs`` stand-in."""
    args = list(sys.argv if argv is None else argv)
    prog, rest = args[0], args[1:]
    try:
        req = parse_mount_args(prog, rest)
    except MountError as exc:
        print(exc, file=sys.stderr)
        return exc.code
    if not os.path.isdir(req.mountpoint):
        print(f"mount.nfs: mount point {req.mountpoint} does not exist", file=sys.stderr)
        return EX_FAIL
    # Trial mount before daemonizing, so mount(8) reports the server's answer.
    try:
        NfsClient(req.source, req.timeout_ms).close()
    except NfsError as exc:
        print(
            f"mount.nfs: mounting {req.source} failed, reason given by server: {exc.strerror}",
            file=sys.stderr,
        )
        return EX_FAIL
    return _daemonize_and_serve(req)


def _daemonize_and_serve(req: MountRequest) -> int:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_fd)
        status = _read_status(read_fd, timeout=30.0)
        if status == "ok":
            return 0
        print(f"mount.nfs: mounting {req.source} failed: {status}", file=sys.stderr)
        return EX_FAIL
    # Child: detach, log to a file, serve until unmounted.
    os.close(read_fd)
    code = 0
    try:
        os.setsid()
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        name = req.mountpoint.strip("/").replace("/", "-") or "root"
        logfile = LOG_DIR / f"{name}.log"
        fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(message)s"
        )
        log.info("serving %s on %s (pid %d)", req.source, req.mountpoint, os.getpid())
        serve(req, ready_fd=write_fd)
        log.info("unmounted %s", req.mountpoint)
    except BaseException as exc:  # report to the waiting parent, never return into mount(8)
        with contextlib.suppress(OSError):
            os.write(write_fd, f"{exc}\n".encode())
        log.exception("nfsfuse failed")
        code = 1
    finally:
        os._exit(code)


def _read_status(fd: int, timeout: float) -> str:
    import select

    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timed out waiting for the FUSE mount"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return data.decode().strip() or "the FUSE process exited"
        data += chunk
    os.close(fd)
    return data.decode().strip()


def serve(req: MountRequest, ready_fd: int | None = None) -> None:
    """Mount ``req.source`` on ``req.mountpoint`` and serve it until unmounted."""
    import mfusepy

    client = NfsClient(req.source, req.timeout_ms)
    ops = make_operations(client, ready_fd)
    mfusepy.FUSE(
        ops,
        req.mountpoint,
        foreground=True,
        nothreads=True,
        fsname=str(req.source),
        subtype="glusterfs",
        allow_other=True,
        default_permissions=True,
        use_ino=True,
        ro=req.read_only,
    )


if __name__ == "__main__":
    sys.exit(mount_main())
