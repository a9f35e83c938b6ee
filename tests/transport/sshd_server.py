"""A real in-process SSH server on 127.0.0.1 for the transport tests (no mocks).

``LocalSSHD`` listens on port 0 with a generated ed25519 host key, accepts one generated client
key, and really runs each exec request with ``/bin/sh -c`` as the current user in a temp dir
(the way sshd hands a command to the login shell). It counts connections and sessions, and
allows direct-streamlocal (Unix socket) forwarding like OpenSSH's ``AllowStreamLocalForwarding``.
A ``sudo`` shim first in the server's PATH records that it was used and runs the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

from kvmstate.spec import Spec
from kvmstate.transport.sshlib import asyncssh

SUDO_SHIM = """#!/bin/sh
# records the call, then behaves like `sudo -n -- CMD...` for root
echo "$*" >> "$KVMSTATE_TEST_SUDO_LOG"
[ "$1" = "-n" ] || { echo "sudo: shim wants -n" >&2; exit 1; }
shift
[ "$1" = "--" ] && shift
exec "$@"
"""


class LocalSSHD:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.work = root / "work"
        self.work.mkdir()
        (root / "bin").mkdir()
        shim = root / "bin" / "sudo"
        shim.write_text(SUDO_SHIM)
        shim.chmod(0o755)
        self.sudo_log = root / "sudo.log"
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.identity = root / "id_ed25519"
        self.client_key.write_private_key(str(self.identity))
        self.identity.chmod(0o600)
        self.ssh_config = root / "ssh_config"
        self.ssh_config.write_text("")
        self.known_hosts = root / "known_hosts"
        self.connections = 0
        self.sessions = 0
        self.active = 0
        self.max_active = 0
        self.commands: list[str] = []
        self.unix_forwards: list[str] = []
        self.port = 0
        self._server: Any = None
        self._handlers: set[asyncio.Task[Any]] = set()

    # -- known_hosts variants ---------------------------------------------------------------

    def known_hosts_line(self, key: asyncssh.SSHKey | None = None) -> str:
        pub = (key or self.host_key).export_public_key().decode().strip()
        return f"[127.0.0.1]:{self.port} {pub}\n"

    def write_wrong_known_hosts(self) -> Path:
        path = self.root / "known_hosts.wrong"
        path.write_text(self.known_hosts_line(asyncssh.generate_private_key("ssh-ed25519")))
        return path

    def write_unknown_known_hosts(self) -> Path:
        path = self.root / "known_hosts.other"
        other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
        path.write_text(f"[10.99.99.99]:{self.port} {other}")
        return path

    # -- spec -------------------------------------------------------------------------------

    def spec(self, hosts: int = 1, **ssh: Any) -> Spec:
        settings: dict[str, Any] = {
            "port": self.port,
            "identity": str(self.identity),
            "known_hosts": str(self.known_hosts),
            "config": str(self.ssh_config),
            "connect_timeout": 5,
            "keepalive_interval": 30,
        }
        settings.update(ssh)
        return Spec.model_validate(
            {
                "version": 1,
                "ssh": settings,
                "hosts": {f"h{i + 1}": {"address": "127.0.0.1"} for i in range(hosts)},
            }
        )

    # -- server -----------------------------------------------------------------------------

    async def _handle(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        command = process.command or "true"
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        self.sessions += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.commands.append(command)
        env = dict(os.environ)
        env["PATH"] = f"{self.root / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        env["KVMSTATE_TEST_SUDO_LOG"] = str(self.sudo_log)
        local = await asyncio.create_subprocess_shell(
            command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=self.work,
            env=env,
            start_new_session=True,  # so a kill reaches the whole command, like sshd's
        )

        def kill() -> None:
            if local.returncode is not None:
                return  # reaped: never signal a group id that may be reused
            with contextlib.suppress(ProcessLookupError):
                os.killpg(local.pid, signal.SIGKILL)

        assert local.stdin and local.stdout and local.stderr
        stdin = local.stdin

        async def pump_in() -> None:
            with contextlib.suppress(OSError, asyncssh.Error):
                while data := await process.stdin.read(65536):
                    stdin.write(data)
                    await stdin.drain()
            stdin.close()

        async def pump_out(src: asyncio.StreamReader, dst: Any) -> None:
            while data := await src.read(65536):
                dst.write(data)

        async def kill_when_channel_closes() -> None:
            def closing() -> bool:
                try:
                    return process.is_closing()
                except AssertionError:  # the channel is already gone
                    return True

            while not closing():
                await asyncio.sleep(0.05)
            kill()

        feeder = asyncio.ensure_future(pump_in())
        watcher = asyncio.ensure_future(kill_when_channel_closes())
        try:
            await asyncio.gather(
                pump_out(local.stdout, process.stdout), pump_out(local.stderr, process.stderr)
            )
            status = await local.wait()
            process.exit(status if status >= 0 else 128 - status)
        except (asyncssh.Error, OSError):
            pass
        finally:
            feeder.cancel()
            watcher.cancel()
            kill()
            await local.wait()
            process.close()
            self.active -= 1

    def _server_factory(self) -> asyncssh.SSHServer:
        sshd = self

        class Server(asyncssh.SSHServer):
            def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
                sshd.connections += 1

            def unix_connection_requested(self, dest_path: str) -> bool:
                sshd.unix_forwards.append(dest_path)
                return True

        return Server()

    async def start(self, port: int = 0) -> None:
        self._server = await asyncssh.listen(
            "127.0.0.1",
            port,
            server_host_keys=[self.host_key],
            authorized_client_keys=asyncssh.import_authorized_keys(
                self.client_key.export_public_key().decode()
            ),
            server_factory=self._server_factory,
            process_factory=self._handle,
            encoding=None,
            allow_scp=False,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self.known_hosts.write_text(self.known_hosts_line())

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=10)

    async def __aenter__(self) -> LocalSSHD:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
