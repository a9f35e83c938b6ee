"""The real shell: one asyncssh connection per host, reused by every command of a run.

* ``SSHHost`` owns the connection to one host: opened lazily on first use; concurrent first
  users await one shared attempt (and share its failure); counted in ``HostStats``. Host keys
  are verified against known_hosts unless the spec turns that off for the host, and every way
  of failing to connect becomes ``HostUnreachable`` with a message a user can act on. At most
  ``max_sessions`` channels are open at once (OpenSSH's ``MaxSessions`` defaults to 10).
* ``SSHShell`` implements the ``Shell`` protocol on it. ``run_many`` runs many argv lists in
  ONE exec channel: a fixed POSIX-sh wrapper (sent on stdin to ``sh -s``) runs each command
  with stdin from /dev/null, its stdout and stderr into files of a private temp dir; then it
  prints the exit statuses, the sizes (one ``wc -c``) and all the bytes (one ``base64``),
  between header lines that carry a random per-call nonce. Command output can contain anything
  (binary, no final newline, text that looks like our headers) and cannot forge a header.

Commands run under ``LC_ALL=C`` so parsers see stable, untranslated output. With
``sudo: true`` every command is prefixed with ``sudo -n --`` (never prompts).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvmstate.errors import HostUnreachable, ParseError, TransportError
from kvmstate.spec import SSHSettings
from kvmstate.transport.base import CommandResult, quote_argv
from kvmstate.transport.batch import (
    batch_script,
    parse_batch_output,
    remote_command,
)
from kvmstate.transport.sshlib import asyncssh

log = logging.getLogger(__name__)

#: OpenSSH's default ``MaxSessions`` is 10 sessions per connection; stay under it.
DEFAULT_MAX_SESSIONS = 8


@dataclass
class HostStats:
    """What one host cost: SSH connections opened, exec channels (shell round trips), Unix
    socket forwards set up, libvirt calls made (each one RPC round trip or more)."""

    connections: int = 0
    channels: int = 0
    forwards: int = 0
    libvirt_calls: int = 0
    connect_seconds: float = 0.0

    def as_dict(self) -> dict[str, int]:
        return {"connections": self.connections, "channels": self.channels}

    def detail(self) -> dict[str, float]:
        return {
            "connections": self.connections,
            "channels": self.channels,
            "forwards": self.forwards,
            "libvirt_calls": self.libvirt_calls,
            "connect_seconds": round(self.connect_seconds, 6),
        }


@dataclass(frozen=True)
class SSHTarget:
    """Where and how to reach one host.

    ``explicit`` names the SSH settings the spec set on purpose (not defaults): those win over
    ``~/.ssh/config``; for the others, ssh_config (User, Port, IdentityFile, HostName) wins
    over the spec's defaults.
    """

    host: str
    address: str
    settings: SSHSettings
    explicit: frozenset[str] = field(default_factory=frozenset)


def _ssh_config_paths(settings: SSHSettings) -> list[str]:
    if settings.config:
        return [settings.config]
    default = os.path.expanduser("~/.ssh/config")
    return [default] if os.access(default, os.R_OK) else []


def _config_lookup(paths: list[str], address: str) -> dict[str, object]:
    """The ssh_config options that apply to ``address`` (User, Port, HostName, ...)."""
    if not paths:
        return {}
    try:
        cfg = asyncssh.config.SSHClientConfig.load(
            None, paths, False, False, False, getpass.getuser(), (), address, ()
        )
    except (OSError, ValueError, asyncssh.Error) as e:
        raise HostUnreachable(
            address, f"cannot read ssh config {paths}: {e}", temporary=False
        ) from e
    wanted = ("User", "Port", "HostName", "IdentityFile", "UserKnownHostsFile")
    return {k: v for k in wanted if (v := cfg.get(k)) is not None}


@dataclass(frozen=True)
class ConnectPlan:
    """The resolved parameters of one connect (what the spec and ssh_config ask for)."""

    host: str
    address: str
    port: int | tuple[()]
    username: str | tuple[()]
    config: list[str]
    known_hosts: str | None
    client_keys: list[str] | tuple[()]
    connect_timeout: float
    keepalive_interval: float

    def describe(self) -> str:
        user = f"{self.username}@" if isinstance(self.username, str) else ""
        port = f":{self.port}" if isinstance(self.port, int) else ""
        return f"{user}{self.address}{port}"


def plan_connect(target: SSHTarget) -> ConnectPlan:
    """Resolve spec settings against ssh_config. Spec values set on purpose win."""
    s = target.settings
    paths = _ssh_config_paths(s)
    cfg = _config_lookup(paths, target.address)
    username: str | tuple[()] = s.user
    if "user" not in target.explicit and "User" in cfg:
        username = ()
    port: int | tuple[()] = s.port
    if "port" not in target.explicit and "Port" in cfg:
        port = ()
    client_keys: list[str] | tuple[()] = list(s.identity) if s.identity else ()
    for key in client_keys:
        if not os.access(key, os.R_OK):
            raise HostUnreachable(
                target.host,
                f"identity file {key} does not exist or is not readable",
                temporary=False,
            )
    known_hosts: str | None = None
    if s.verify_host_key:
        if s.known_hosts:
            known_hosts = s.known_hosts
        elif isinstance(cfg.get("UserKnownHostsFile"), list) and cfg["UserKnownHostsFile"]:
            known_hosts = os.path.expanduser(str(cfg["UserKnownHostsFile"][0]))  # type: ignore[index]
        else:
            known_hosts = os.path.expanduser("~/.ssh/known_hosts")
        if not os.path.exists(known_hosts):
            raise HostUnreachable(
                target.host,
                f"cannot verify the host key of {target.address}: known_hosts file {known_hosts} "
                "does not exist (add the host's key to it, or set verify_host_key: false)",
                temporary=False,
            )
    return ConnectPlan(
        host=target.host,
        address=target.address,
        port=port,
        username=username,
        config=paths,
        known_hosts=known_hosts,
        client_keys=client_keys,
        connect_timeout=s.connect_timeout,
        keepalive_interval=s.keepalive_interval,
    )


def _host_key_reason(plan: ConnectPlan) -> str:
    """Tell an unknown host from a changed key, by looking the host up in known_hosts."""
    path = plan.known_hosts or "known_hosts"
    known = False
    try:
        kh = asyncssh.read_known_hosts(path)
        port = plan.port if isinstance(plan.port, int) and plan.port != 22 else None
        match = kh.match(plan.address, plan.address, port)
        known = bool(match[0] or match[1])
    except (OSError, ValueError, asyncssh.Error):
        pass
    if known:
        return (
            f"host key for {plan.address} does not match known_hosts ({path}): refusing to "
            "connect (if the host was reinstalled, verify its new key and replace the old one)"
        )
    return (
        f"host key for {plan.address} is not in known_hosts ({path}): refusing to connect to an "
        "unknown host (verify its key and add it, e.g. from ssh-keyscan)"
    )


# AES-GCM first: asyncssh's chacha20-poly1305 costs several cipher contexts per packet, which
# showed as CPU time at 200 hosts (bench B3); the others stay for servers without AES-GCM.
ENCRYPTION_ALGS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)

_known_hosts_cache: dict[tuple[str, int, int], object] = {}


def known_hosts_for(path: str | None) -> object:
    """known_hosts parsed once per file version, not once per connection (bench B3: the
    re-parse was ~18% of a 200-host plan)."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return path  # let asyncssh report it
    key = (path, st.st_mtime_ns, st.st_size)
    parsed = _known_hosts_cache.get(key)
    if parsed is None:
        parsed = asyncssh.read_known_hosts(path)
        _known_hosts_cache[key] = parsed
    return parsed


async def open_connection(target: SSHTarget) -> asyncssh.SSHClientConnection:
    """Connect and authenticate, or raise ``HostUnreachable`` saying why."""
    plan = plan_connect(target)
    where = plan.describe()
    log.debug("%s: connecting to %s", target.host, where)
    try:
        conn = await asyncssh.connect(
            plan.address,
            port=plan.port,
            username=plan.username,
            config=plan.config,
            known_hosts=known_hosts_for(plan.known_hosts),
            client_keys=plan.client_keys,
            encryption_algs=ENCRYPTION_ALGS,
            connect_timeout=plan.connect_timeout,
            keepalive_interval=plan.keepalive_interval,
            keepalive_count_max=3,
        )
    except asyncssh.HostKeyNotVerifiable:
        raise HostUnreachable(target.host, _host_key_reason(plan), temporary=False) from None
    except asyncssh.PermissionDenied:
        keys = ", ".join(plan.client_keys) if plan.client_keys else "ssh-agent and default keys"
        raise HostUnreachable(
            target.host,
            f"permission denied (publickey) for {where} (tried {keys})",
            temporary=False,
        ) from None
    except asyncssh.DisconnectError as e:
        raise HostUnreachable(target.host, f"ssh to {where} failed: {e.reason}") from None
    except TimeoutError:
        raise HostUnreachable(
            target.host, f"connection to {where} timed out after {plan.connect_timeout:g}s"
        ) from None
    except OSError as e:
        if isinstance(e, socket.gaierror):
            why = f"cannot resolve {plan.address}: {e.strerror}"
        else:
            why = os.strerror(e.errno) if e.errno and e.errno > 0 else (e.strerror or str(e))
        raise HostUnreachable(target.host, f"cannot connect to {where}: {why}") from None
    except (ValueError, asyncssh.KeyImportError) as e:
        raise HostUnreachable(
            target.host, f"bad ssh settings for {where}: {e}", temporary=False
        ) from None
    return conn


class SSHHost:
    """The one SSH connection to a host: opened on first use, shared, counted, closable."""

    def __init__(self, target: SSHTarget, *, max_sessions: int = DEFAULT_MAX_SESSIONS) -> None:
        self.target = target
        self.host = target.host
        self.stats = HostStats()
        self.sessions = asyncio.Semaphore(max_sessions)
        self._conn: asyncssh.SSHClientConnection | None = None
        self._attempt: asyncio.Future[asyncssh.SSHClientConnection] | None = None
        self._failed: HostUnreachable | None = None

    async def connection(self) -> asyncssh.SSHClientConnection:
        """The open connection; connects on first use. Concurrent callers share one attempt
        and its outcome; a permanent failure (host key, auth, settings) is remembered for the
        run, a temporary one (network) is retried by the next caller."""
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return conn
        if self._failed is not None:
            raise self._failed
        if self._attempt is None:
            self._attempt = asyncio.ensure_future(self._connect())
            # the outcome is always retrieved, even if every waiter was cancelled
            self._attempt.add_done_callback(lambda f: f.cancelled() or f.exception())
        attempt = self._attempt
        try:
            return await asyncio.shield(attempt)
        finally:
            if self._attempt is attempt and attempt.done():
                self._attempt = None

    async def _connect(self) -> asyncssh.SSHClientConnection:
        start = time.perf_counter()
        try:
            conn = await open_connection(self.target)
        except HostUnreachable as e:
            if not e.temporary:
                self._failed = e
            log.debug("%s: connect failed: %s", self.host, e.reason)
            raise
        self.stats.connections += 1
        self.stats.connect_seconds += time.perf_counter() - start
        log.debug(
            "%s: connected to %s in %.3fs",
            self.host,
            self.target.address,
            time.perf_counter() - start,
        )
        self._conn = conn
        return conn

    def lost(self, conn: asyncssh.SSHClientConnection, why: BaseException | str) -> HostUnreachable:
        """Forget a broken connection (the next use reconnects); the error to raise."""
        if self._conn is conn:
            self._conn = None
        return HostUnreachable(self.host, f"connection to {self.target.address} lost: {why}")

    async def forward_unix(self, local: str, remote: str) -> UnixForward:
        """Listen on the local Unix socket ``local`` and carry each connection to it over this
        host's SSH connection to the host's Unix socket ``remote`` (direct-streamlocal)."""
        conn = await self.connection()
        listener = await conn.forward_local_path(local, remote)
        self.stats.forwards += 1
        return UnixForward(self, conn, listener)

    async def close(self) -> None:
        attempt, self._attempt = self._attempt, None
        if attempt is not None and not attempt.done():
            attempt.cancel()
            with contextlib.suppress(asyncio.CancelledError, HostUnreachable):
                await attempt
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            await conn.wait_closed()


class UnixForward:
    """A local Unix socket forwarded over one SSH connection (``SSHHost.forward_unix``)."""

    def __init__(
        self, ssh: SSHHost, conn: asyncssh.SSHClientConnection, listener: asyncssh.SSHListener
    ) -> None:
        self._ssh = ssh
        self._conn = conn
        self._listener = listener

    async def current(self) -> bool:
        """Is it carried by the host's current connection (connecting if there is none)? False
        once that connection was replaced: the forward went with the old one."""
        return await self._ssh.connection() is self._conn

    async def close(self) -> None:
        self._listener.close()
        with contextlib.suppress(Exception):
            await self._listener.wait_closed()


# --- the shell ---------------------------------------------------------------------------------


def _status(proc: asyncssh.SSHCompletedProcess) -> int:
    if proc.exit_status is not None and proc.exit_status >= 0:
        return proc.exit_status
    return 255  # killed by a signal or no status sent, as OpenSSH's client reports it


def _as_bytes(data: object) -> bytes:
    if data is None:
        return b""
    if isinstance(data, bytes):
        return data
    return str(data).encode("utf-8", errors="replace")


class SSHShell:
    """``Shell`` over the host's shared SSH connection."""

    def __init__(self, ssh: SSHHost) -> None:
        self.ssh = ssh
        self.host = ssh.host

    @property
    def sudo(self) -> bool:
        return self.ssh.target.settings.sudo

    async def _exec(
        self, command: str, stdin: bytes | None, timeout: float | None
    ) -> asyncssh.SSHCompletedProcess:
        """One exec channel: send ``stdin`` (then EOF), collect output and exit status."""
        conn = await self.ssh.connection()
        async with self.ssh.sessions:
            self.ssh.stats.channels += 1
            try:
                proc = await conn.create_process(command, encoding=None)
                if stdin:
                    proc.stdin.write(stdin)
                proc.stdin.write_eof()
                try:
                    done = await proc.wait(check=False, timeout=timeout)
                except asyncssh.TimeoutError:
                    with contextlib.suppress(Exception):
                        proc.send_signal("KILL")  # honoured by OpenSSH >= 7.9
                    proc.close()
                    raise
                if done.exit_status is None and done.exit_signal is None:
                    # no exit report: the channel or the connection went away under it
                    if conn.is_closed():
                        raise self.ssh.lost(conn, "closed while a command was running")
                    raise TransportError(
                        self.host,
                        command,
                        None,
                        "the session ended without an exit status",
                        temporary=True,
                    )
                return done
            except asyncssh.ChannelOpenError as e:
                raise TransportError(
                    self.host, command, None, f"cannot open a session: {e.reason}", temporary=True
                ) from None
            except (asyncssh.ConnectionLost, asyncssh.DisconnectError, BrokenPipeError) as e:
                raise self.ssh.lost(conn, e) from None

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
        timeout: float | None = None,
    ) -> CommandResult:
        command = remote_command(argv, sudo=self.sudo)
        start = time.perf_counter()
        try:
            proc = await self._exec(
                command, input.encode("utf-8") if input is not None else None, timeout
            )
        except asyncssh.TimeoutError:
            raise TransportError(
                self.host, argv, None, f"timed out after {timeout:g}s", temporary=True
            ) from None
        result = CommandResult(
            host=self.host,
            argv=tuple(argv),
            exit_status=_status(proc),
            stdout=_as_bytes(proc.stdout).decode("utf-8", errors="replace"),
            stderr=_as_bytes(proc.stderr).decode("utf-8", errors="replace"),
        )
        log.debug(
            "%s: %s -> exit %d in %.3fs",
            self.host,
            quote_argv(argv),
            result.exit_status,
            time.perf_counter() - start,
        )
        return result.check() if check else result

    async def run_many(
        self, argvs: Sequence[Sequence[str]], *, timeout: float | None = None
    ) -> list[CommandResult]:
        """Run the argvs in ONE exec channel, concurrently (they must not depend on each
        other: reads); one result per argv, in order, never raises for a command's non-zero
        exit (check each result)."""
        if not argvs:
            return []
        if len(argvs) == 1:
            # one command needs no wrapper (its temp dir, wc and base64 cost more than the
            # command): the same channel, result and "never raises for an exit status"
            return [await self.run(argvs[0], check=False, timeout=timeout)]
        nonce = secrets.token_hex(16)
        script = batch_script(argvs, nonce)
        # The script goes on stdin (no argument-length limit); every command's stdin is /dev/null.
        command = remote_command(["sh", "-s"], sudo=self.sudo)
        start = time.perf_counter()
        try:
            proc = await self._exec(command, script.encode("utf-8"), timeout)
        except asyncssh.TimeoutError:
            raise TransportError(
                self.host,
                "batch of commands",
                None,
                f"timed out after {timeout:g}s",
                temporary=True,
            ) from None
        out = _as_bytes(proc.stdout)
        try:
            results = parse_batch_output(self.host, argvs, nonce, out)
        except ParseError:
            # The wrapper itself failed (no sh/base64/mktemp, sudo refused): say so plainly.
            err = _as_bytes(proc.stderr).decode("utf-8", errors="replace")
            raise TransportError(
                self.host,
                f"batch of {len(argvs)} commands ({quote_argv(argvs[0])} ...)",
                _status(proc),
                err or "batch output did not parse",
            ) from None
        log.debug(
            "%s: batch of %d commands in %.3fs: exits %s",
            self.host,
            len(argvs),
            time.perf_counter() - start,
            [r.exit_status for r in results],
        )
        return results

    async def start(self, argv: Sequence[str]) -> SSHProcess:
        """Leave ``argv`` running in an exec channel of its own (outside ``max_sessions``: it
        is held for as long as the caller needs it, e.g. the cluster lock for a whole apply)."""
        conn = await self.ssh.connection()
        self.ssh.stats.channels += 1
        try:
            proc = await conn.create_process(remote_command(argv, sudo=self.sudo))
        except asyncssh.ChannelOpenError as e:
            raise TransportError(
                self.host, argv, None, f"cannot open a session: {e.reason}", temporary=True
            ) from None
        except (asyncssh.ConnectionLost, asyncssh.DisconnectError, BrokenPipeError) as e:
            raise self.ssh.lost(conn, e) from None
        return SSHProcess(self, argv, proc)


class SSHProcess:
    """``Process``: one exec channel left open on the host's shared connection."""

    def __init__(
        self, shell: SSHShell, argv: Sequence[str], proc: asyncssh.SSHClientProcess[str]
    ) -> None:
        self._shell = shell
        self._argv = tuple(argv)
        self._proc = proc

    async def readline(self) -> str:
        return await self._proc.stdout.readline()

    async def finish(self) -> CommandResult:
        rest = await self._proc.stdout.read()
        # wait() collects what is left unread (stderr here): reading stderr after it gets ""
        done = await self._proc.wait(check=False)
        err = done.stderr if isinstance(done.stderr, str) else ""
        return CommandResult(self._shell.host, self._argv, _status(done), rest, err)

    async def close(self, timeout: float = 5.0) -> None:
        self._proc.stdin.write_eof()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._proc.wait(check=False), timeout=timeout)
        self._proc.close()
