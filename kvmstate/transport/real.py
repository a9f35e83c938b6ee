"""``RealTransports``: the real ``Transports`` of a run (asyncssh + libvirt over it).

One SSH connection per host per run, opened on first use; concurrent first users of a host
share that one connect. The host's libvirt connection is carried over the same SSH connection.
``stats()`` says what each host cost (connections, exec channels = round trips) for the
benchmarks and the tests.
"""

from __future__ import annotations

import asyncio
import logging

from kvmstate.spec import Spec, SSHOverrides
from kvmstate.transport.base import Libvirt, Process, Shell, Transports
from kvmstate.transport.libvirt import REMOTE_SOCKET, LibvirtOverSSH, SocketDir
from kvmstate.transport.ssh import DEFAULT_MAX_SESSIONS, SSHHost, SSHProcess, SSHShell, SSHTarget

log = logging.getLogger(__name__)


def explicit_ssh_fields(spec: Spec, host: str) -> frozenset[str]:
    """The SSH settings the spec sets on purpose for ``host`` (not left to defaults)."""
    explicit = set(spec.ssh.model_fields_set)
    overrides = spec.hosts[host].ssh
    if overrides is not None:
        explicit |= {k for k in SSHOverrides.model_fields if getattr(overrides, k) is not None}
    return frozenset(explicit)


def target_for(spec: Spec, host: str) -> SSHTarget:
    if host not in spec.hosts:
        raise KeyError(f"unknown host {host!r} (hosts: {', '.join(sorted(spec.hosts))})")
    return SSHTarget(
        host=host,
        address=spec.hosts[host].address,
        settings=spec.ssh_for(host),
        explicit=explicit_ssh_fields(spec, host),
    )


class RealTransports:
    """Shells and libvirt connections to the spec's hosts, one SSH connection per host."""

    def __init__(
        self,
        spec: Spec,
        *,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        libvirt_socket: str = REMOTE_SOCKET,
        libvirt_threads: int = 4,
    ) -> None:
        self.spec = spec
        self.max_sessions = max_sessions
        self.libvirt_socket = libvirt_socket
        self.libvirt_threads = libvirt_threads
        self._hosts: dict[str, SSHHost] = {}
        self._shells: dict[str, SSHShell] = {}
        self._libvirts: dict[str, LibvirtOverSSH] = {}
        self._sockets = SocketDir()  # the local ends of every host's libvirt forward

    def ssh_host(self, host: str) -> SSHHost:
        ssh = self._hosts.get(host)
        if ssh is None:
            ssh = SSHHost(target_for(self.spec, host), max_sessions=self.max_sessions)
            self._hosts[host] = ssh
        return ssh

    def shell(self, host: str) -> SSHShell:
        shell = self._shells.get(host)
        if shell is None:
            shell = self._shells[host] = SSHShell(self.ssh_host(host))
        return shell

    def libvirt(self, host: str) -> LibvirtOverSSH:
        lv = self._libvirts.get(host)
        if lv is None:
            lv = LibvirtOverSSH(
                self.ssh_host(host),
                remote_socket=self.libvirt_socket,
                threads=self.libvirt_threads,
                sockets=self._sockets,
            )
            self._libvirts[host] = lv
        return lv

    async def connect_all(self, hosts: list[str] | None = None) -> None:
        """Open the SSH connections of ``hosts`` (default: all) in parallel; raises the first
        ``HostUnreachable`` after all attempts finished."""
        names = list(self.spec.hosts) if hosts is None else hosts
        results = await asyncio.gather(
            *(self.ssh_host(h).connection() for h in names), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r

    def stats(self) -> dict[str, dict[str, int]]:
        """Per host: SSH ``connections`` opened and exec ``channels`` (round trips)."""
        return {h: s.stats.as_dict() for h, s in self._hosts.items()}

    def detailed_stats(self) -> dict[str, dict[str, float]]:
        """``stats()`` plus forwards, libvirt calls and seconds spent connecting, per host."""
        return {h: s.stats.detail() for h, s in self._hosts.items()}

    async def close(self) -> None:
        libvirts, self._libvirts = list(self._libvirts.values()), {}
        hosts, self._hosts = list(self._hosts.values()), {}
        self._shells = {}
        errors = await asyncio.gather(*(lv.close() for lv in libvirts), return_exceptions=True)
        self._sockets.remove()
        errors += await asyncio.gather(*(h.close() for h in hosts), return_exceptions=True)
        for e in errors:
            if isinstance(e, BaseException):
                log.debug("error while closing transports: %s", e)

    async def __aenter__(self) -> RealTransports:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _conforms(t: RealTransports, p: SSHProcess) -> tuple[Transports, Shell, Libvirt, Process]:
    """Never called: lets mypy check that the real classes satisfy the protocols."""
    return t, t.shell(""), t.libvirt(""), p
