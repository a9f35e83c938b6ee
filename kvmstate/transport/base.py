"""The strict boundary under the resources: a shell and a libvirt connection per host.

Resources never import asyncssh or libvirt; they talk to these protocols. The real
implementations are ``ssh.py`` (asyncssh) and ``libvirt.py`` (libvirt-python over the same SSH
connection); ``kvmstate.testing.fake`` is an in-memory cluster for fast tests.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from kvmstate.errors import TransportError

T = TypeVar("T")


def quote_argv(argv: Sequence[str]) -> str:
    """The one place where an argv becomes a shell string."""
    for arg in argv:
        if "\x00" in arg:
            raise ValueError("NUL byte in a command argument")
    return " ".join(shlex.quote(a) for a in argv)


@dataclass(frozen=True)
class CommandResult:
    host: str
    argv: tuple[str, ...]
    exit_status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def check(self) -> CommandResult:
        if self.exit_status != 0:
            raise TransportError(self.host, self.argv, self.exit_status, self.stderr)
        return self


class Process(Protocol):
    """A command left running on one host (``Shell.start``): its stdout is read as it comes,
    and closing its stdin (``close``) is how it is told to end."""

    async def readline(self) -> str:
        """The next line of stdout ("" at its end)."""
        ...

    async def finish(self) -> CommandResult:
        """Wait for the command to exit by itself: the rest of its stdout, its stderr, status."""
        ...

    async def close(self) -> None:
        """End of stdin, a short wait for the exit, then the channel is closed."""
        ...


class Shell(Protocol):
    """Runs argv lists on one host. ``run_many`` costs one round trip for all of them;
    ``start`` leaves one command running (e.g. holding a lock) until it is closed."""

    host: str

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
        timeout: float | None = None,
    ) -> CommandResult: ...

    async def run_many(self, argvs: Sequence[Sequence[str]]) -> list[CommandResult]: ...

    async def start(self, argv: Sequence[str]) -> Process: ...


class Libvirt(Protocol):
    """A libvirt connection to one host. Blocking libvirt calls run off the event loop."""

    host: str

    async def connect(self) -> Any:
        """The open ``virConnect`` (opened once, reused)."""
        ...

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread; libvirt errors become ``TransportError``."""
        ...


class Transports(Protocol):
    """Hands out one shell and one libvirt connection per host, opened on first use."""

    def shell(self, host: str) -> Shell: ...

    def libvirt(self, host: str) -> Libvirt: ...

    async def connect_all(self) -> None:
        """Open every host's connection now, in parallel (apply does this while it takes the
        cluster lock); a failure is left to the first real use, which reports it."""

    async def close(self) -> None: ...


# A fixed script: the path is "$1", the mode for a new file "$2", and the exact byte count
# "$3" -- never spliced into the script text. If the sender dies mid-transfer, stdin ends
# early: the size check fails and the old file stays untouched (no half-written fstab).
ATOMIC_WRITE_SCRIPT = (
    'set -e; d=$(dirname -- "$1"); t=$(mktemp -- "$d/.kvmstate.XXXXXX"); '
    'trap \'rm -f -- "$t"\' EXIT; cat > "$t"; '
    'n=$(wc -c < "$t"); if [ "$n" -ne "$3" ]; then '
    'echo "kvmstate-write: got $n of $3 bytes for $1; left it unchanged" >&2; exit 1; fi; '
    'if [ -e "$1" ]; then chmod --reference="$1" -- "$t"; chown --reference="$1" -- "$t"; '
    'else chmod "$2" -- "$t"; fi; sync -- "$t" 2>/dev/null || true; mv -f -- "$t" "$1"; trap - EXIT'
)


async def read_file(shell: Shell, path: str) -> str | None:
    """A file's text, or None if it does not exist."""
    res = await shell.run(["cat", "--", path], check=False)
    if res.ok:
        return res.stdout
    if "No such file" in res.stderr:
        return None
    res.check()
    return None


async def write_file(shell: Shell, path: str, content: str, mode: str = "0644") -> None:
    """Write atomically (temp file in the same directory, then rename): never half-written."""
    size = str(len(content.encode("utf-8")))
    await shell.run(
        ["sh", "-c", ATOMIC_WRITE_SCRIPT, "kvmstate-write", path, mode, size], input=content
    )
