"""libvirt over the host's SSH connection: the one module that imports ``libvirt``.

``connect()`` forwards a local Unix socket (in a private 0700 temp dir) over the host's
existing asyncssh connection to the host's ``/run/libvirt/libvirt-sock``, then opens
``qemu+unix:///system?socket=LOCAL``: no second SSH client, no second handshake.

Thread model: each host's libvirt connection gets its own small thread pool (``threads``,
default 4), and every call on that connection (open, ``run(fn, ...)``, close) runs there, never
on the event loop, which stays free to carry the forwarded bytes while a call blocks. Why not
``asyncio.to_thread``: its default pool is shared by all hosts and small (6 threads on 2 cores),
so 200 hosts would queue behind each other. Why not one thread per connection: libvirt's public
API is thread safe since 0.6.0 (errors are kept per thread; libvirt-python releases the GIL
around each call and reads the error in the same thread), and its remote driver interleaves
concurrent RPC calls on the one socket. So concurrent observations of one host overlap their
round trips, and a long call (``migrate3`` of one domain) does not block every other call to
that host. Calls awaited one after another still run in order. ``threads=1`` serializes.

Errors: ``libvirtError`` becomes ``LibvirtError`` (a ``TransportError``) with the libvirt error
``code`` kept; ``not_found`` is true for "no such domain/pool/volume/..." so callers can treat
it as absent. Code running inside a call (``kvmstate.virt``, the fake, the lab) gets the module,
its flags and its exception class from ``libvirt_module()`` and the error codes from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlencode

from kvmstate.errors import HostUnreachable, TransportError
from kvmstate.spec import SSHSettings

if TYPE_CHECKING:
    from kvmstate.transport.ssh import SSHHost, UnixForward

log = logging.getLogger(__name__)
T = TypeVar("T")

REMOTE_SOCKET = "/run/libvirt/libvirt-sock"

# libvirt's virErrorNumber values (checked against the libvirt module in the tests): known
# without importing libvirt, which is imported on first use only (see ``libvirt_module``).
VIR_ERR_NO_SUPPORT = 3
VIR_ERR_NO_CONNECT = 5
VIR_ERR_SYSTEM_ERROR = 38
VIR_ERR_RPC = 39
VIR_ERR_NO_DOMAIN = 42
VIR_ERR_NO_NETWORK = 43
VIR_ERR_AUTH_FAILED = 45
VIR_ERR_NO_STORAGE_POOL = 49
VIR_ERR_NO_STORAGE_VOL = 50
VIR_ERR_NO_NODE_DEVICE = 53
VIR_ERR_OPERATION_INVALID = 55
VIR_ERR_NO_INTERFACE = 57
VIR_ERR_NO_NWFILTER = 62
VIR_ERR_NO_SECRET = 66
VIR_ERR_OPERATION_TIMEOUT = 68
VIR_ERR_NO_DOMAIN_SNAPSHOT = 72

NOT_FOUND_CODES = frozenset(
    {
        VIR_ERR_NO_DOMAIN,
        VIR_ERR_NO_NETWORK,
        VIR_ERR_NO_STORAGE_POOL,
        VIR_ERR_NO_STORAGE_VOL,
        VIR_ERR_NO_NODE_DEVICE,
        VIR_ERR_NO_INTERFACE,
        VIR_ERR_NO_NWFILTER,
        VIR_ERR_NO_SECRET,
        VIR_ERR_NO_DOMAIN_SNAPSHOT,
    }
)
TEMPORARY_CODES = frozenset(
    {VIR_ERR_NO_CONNECT, VIR_ERR_SYSTEM_ERROR, VIR_ERR_RPC, VIR_ERR_OPERATION_TIMEOUT}
)
VIR_ERR_INTERNAL_ERROR = 1
# The connection's socket was already closed when the call was made (libvirt's client saw the
# EOF first): an internal error by code, a lost connection by nature. Which of the two errors
# a call meets after the connection drops depends on which thread sees the EOF first.
CLOSED_SOCKET = "client socket is closed"


def is_temporary(code: int, message: str) -> bool:
    return code in TEMPORARY_CODES or (code == VIR_ERR_INTERNAL_ERROR and CLOSED_SOCKET in message)


class LibvirtError(TransportError):
    """A libvirt call failed. ``code`` is libvirt's ``virErrorNumber``."""

    def __init__(self, host: str, call: str, code: int, message: str) -> None:
        super().__init__(
            host, f"libvirt {call}", None, message, temporary=is_temporary(code, message)
        )
        self.code = code
        self.call = call

    @property
    def not_found(self) -> bool:
        return self.code in NOT_FOUND_CODES


class LibvirtUnreachable(HostUnreachable):
    """The host answers SSH, but its libvirtd cannot be reached through it."""


_module_lock = threading.Lock()
_module: Any = None


def libvirt_module() -> Any:
    """The ``libvirt`` module, imported when a libvirt call is first made, not when kvmstate is
    imported: validate, a plan of hosts without libvirt resources and the start of every
    command do without it. Its default error handler (prints every error to stderr; errors are
    raised as exceptions anyway) is replaced once per process, here and nowhere else."""
    global _module
    with _module_lock:
        if _module is None:
            import libvirt

            libvirt.registerErrorHandler(_silence, None)
            _module = libvirt
        return _module


def _silence(_ctx: object, _err: object) -> None:
    return None


def silence_libvirt_stderr() -> None:
    """Replace libvirt's default handler (prints every error to stderr); once per process."""
    libvirt_module()


def is_not_found(e: BaseException) -> bool:
    """Is ``e`` a raw ``libvirtError`` saying "no such domain/pool/volume/..."?"""
    return isinstance(e, libvirt_module().libvirtError) and e.get_error_code() in NOT_FOUND_CODES


def unix_uri(local_socket: str, driver: str = "qemu") -> str:
    """``qemu+unix:///system?socket=LOCAL`` for a local (forwarded) libvirtd socket."""
    return f"{driver}+unix:///system?socket={quote(local_socket, safe='/')}"


def ssh_uri(address: str, settings: SSHSettings, driver: str = "qemu") -> str:
    """A ``qemu+ssh://`` URI (for libvirt-managed connections, e.g. peer-to-peer migration).

    With ``VIR_MIGRATE_PEER2PEER`` it is the SOURCE host's libvirtd that opens this URI, so the
    keyfile and known_hosts paths must exist there. Client-managed ``dom.migrate3(dconn, ...)``
    with both connections opened here (over the forwarded sockets) needs no such URI."""
    host = f"[{address}]" if ":" in address else address
    params: dict[str, str] = {}
    if settings.identity:
        params["keyfile"] = settings.identity[0]
    if settings.known_hosts:
        params["known_hosts"] = settings.known_hosts
    if not settings.verify_host_key:
        params["no_verify"] = "1"
    params["no_tty"] = "1"
    query = urlencode(params, safe="/")
    return f"{driver}+ssh://{quote(settings.user)}@{host}:{settings.port}/system?{query}"


def _describe(fn: Callable[..., Any], args: tuple[Any, ...]) -> str:
    """``lookupByName('web1')``: the call as a user would recognize it (long args cut)."""
    name = getattr(fn, "__name__", None) or repr(fn)
    shown = []
    for a in args:
        r = repr(a)
        shown.append(r if len(r) <= 60 else r[:57] + "...")
    return f"{name}({', '.join(shown)})"


class SocketDir:
    """A private (0700) directory for the local ends of libvirt forwards: made on first use,
    removed by ``remove``. One per run (``RealTransports``) rather than one per host: making
    and removing a directory per host was most of the forward's cost at 200 hosts."""

    def __init__(self) -> None:
        self._path: str | None = None

    def socket(self, name: str) -> str:
        if self._path is None:
            self._path = tempfile.mkdtemp(prefix="kvmstate-")
            os.chmod(self._path, 0o700)
        return os.path.join(self._path, name)

    def remove(self) -> None:
        if self._path is not None:
            shutil.rmtree(self._path, ignore_errors=True)
            self._path = None


class LibvirtOverSSH:
    """``Libvirt`` for one host, carried over its shared SSH connection."""

    def __init__(
        self,
        ssh: SSHHost,
        *,
        remote_socket: str = REMOTE_SOCKET,
        driver: str = "qemu",
        direct_uri: str | None = None,
        threads: int = 4,
        sockets: SocketDir | None = None,
    ) -> None:
        """``direct_uri`` opens that URI instead of forwarding (e.g. ``test:///default``);
        ``sockets``: where the forward's local socket goes (default: a directory of its own)."""
        self.ssh = ssh
        self.host = ssh.host
        self.remote_socket = remote_socket
        self.driver = driver
        self.direct_uri = direct_uri
        self._executor = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix=f"libvirt-{ssh.host}"
        )
        self._lock = asyncio.Lock()
        self._conn: Any = None
        self._forward: UnixForward | None = None
        self._own_sockets = sockets is None
        self._sockets = sockets if sockets is not None else SocketDir()
        self.local_socket: str | None = None

    @property
    def uri(self) -> str | None:
        if self.direct_uri is not None:
            return self.direct_uri
        return unix_uri(self.local_socket, self.driver) if self.local_socket else None

    async def forward(self) -> str:
        """Forward a private local socket to the host's libvirtd socket; its path."""
        if self.local_socket is not None and self._forward is not None:
            if await self._forward.current():
                return self.local_socket
            await self._teardown()  # the SSH connection was replaced: forward again
        else:
            await self.ssh.connection()  # unreachable: HostUnreachable, not LibvirtUnreachable
        local = self._sockets.socket(f"{self.host}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(local)  # left by this host's previous forward in this run
        try:
            forward = await self.ssh.forward_unix(local, self.remote_socket)
        except HostUnreachable:
            self._remove_socket(local)
            raise
        except Exception as e:
            self._remove_socket(local)
            raise LibvirtUnreachable(
                self.host, f"cannot forward a local socket to {self.remote_socket}: {e}"
            ) from e
        self._forward, self.local_socket = forward, local
        return local

    async def connect(self) -> Any:
        if self._conn is not None:
            return self._conn
        async with self._lock:
            if self._conn is not None:
                return self._conn
            start = time.perf_counter()
            if self.direct_uri is not None:
                uri = self.direct_uri
            else:
                uri = unix_uri(await self.forward(), self.driver)

            uri_where = self.remote_socket if self.direct_uri is None else uri

            def _open() -> Any:
                libvirt = libvirt_module()
                try:
                    return libvirt.open(uri)
                except libvirt.libvirtError as e:
                    msg = e.get_error_message() or str(e)
                    if self.direct_uri is not None:
                        hint = ""
                    elif "ermission denied" in msg:
                        hint = (
                            f" (the SSH user {self.ssh.target.settings.user!r} needs access to "
                            f"{self.remote_socket}: root, or a member of the 'libvirt' group)"
                        )
                    else:
                        hint = " (is libvirtd running, and does sshd allow Unix socket forwarding?)"
                    raise LibvirtUnreachable(
                        self.host,
                        f"libvirtd on {self.ssh.target.address} ({uri_where}) is not "
                        f"answering: {msg}{hint}",
                    ) from None

            loop = asyncio.get_running_loop()
            self._conn = await loop.run_in_executor(self._executor, _open)
            log.debug("%s: libvirt open over ssh in %.3fs", self.host, time.perf_counter() - start)
            return self._conn

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        await self.connect()
        host = self.host
        name = _describe(fn, args)

        libvirt = libvirt_module()

        def _call() -> T:
            try:
                return fn(*args)
            except libvirt.libvirtError as e:
                code = e.get_error_code() or 0
                raise LibvirtError(
                    host, name, int(code), str(e) or "unknown libvirt error"
                ) from None

        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        self.ssh.stats.libvirt_calls += 1
        try:
            return await loop.run_in_executor(self._executor, functools.partial(_call))
        except LibvirtError as e:
            if e.temporary:
                await self._reset_if_dead()
            raise
        finally:
            log.debug("%s: libvirt %s in %.3fs", host, name, time.perf_counter() - start)

    async def _reset_if_dead(self) -> None:
        """After an RPC/system error: if the connection died (e.g. the SSH connection under it
        was lost), drop it so the next call forwards and opens again."""
        conn = self._conn
        if conn is None:
            return

        libvirt = libvirt_module()

        def _alive() -> bool:
            try:
                return bool(conn.isAlive())
            except libvirt.libvirtError:
                return False

        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(self._executor, _alive):
            log.debug("%s: libvirt connection is dead; will reopen on next use", self.host)
            await self._teardown()

    async def _teardown(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            libvirt = libvirt_module()

            def _close() -> None:
                try:
                    conn.close()
                except libvirt.libvirtError as e:
                    log.debug("%s: closing libvirt: %s", self.host, e)

            await asyncio.get_running_loop().run_in_executor(self._executor, _close)
        forward, self._forward = self._forward, None
        if forward is not None:
            await forward.close()
        if self.local_socket is not None:
            self._remove_socket(self.local_socket)
            self.local_socket = None

    def _remove_socket(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        if self._own_sockets:
            self._sockets.remove()

    async def close(self) -> None:
        """Close the libvirt connection and the forward, remove the socket; not reusable."""
        await self._teardown()
        self._executor.shutdown(wait=False)
