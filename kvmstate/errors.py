"""The error hierarchy. Every error a user can see carries enough context to act on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class KvmstateError(Exception):
    """Base of every error kvmstate raises on purpose."""


def printable(text: str) -> str:
    """Escape control characters so one problem is always one line of output."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass(frozen=True)
class Problem:
    """One finding about a spec: where it is and what is wrong."""

    file: str
    line: int | None
    loc: tuple[str | int, ...]
    message: str
    severity: str = "error"  # "error" | "warning"

    @property
    def field(self) -> str:
        return printable(".".join(str(p) for p in self.loc))

    def __str__(self) -> str:
        where = f"{printable(self.file)}:{self.line}" if self.line else printable(self.file)
        field = f" {self.field}:" if self.loc else ""
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{where}:{field} {prefix}{printable(self.message)}"


class SpecError(KvmstateError, ValueError):
    """The spec is invalid. Holds every problem found, not only the first."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class TransportError(KvmstateError):
    """A command or API call on a host failed."""

    def __init__(
        self,
        host: str,
        argv: Sequence[str] | str,
        exit_status: int | None,
        stderr: str,
        *,
        temporary: bool = False,
    ) -> None:
        self.host = host
        self.argv = argv if isinstance(argv, str) else list(argv)
        self.exit_status = exit_status
        self.stderr = stderr
        self.temporary = temporary
        cmd = argv if isinstance(argv, str) else " ".join(argv)
        status = f"exit {exit_status}" if exit_status is not None else "failed"
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else "no error output"
        super().__init__(f"{host}: `{cmd}` {status}: {detail}")


class HostUnreachable(KvmstateError):
    """A host could not be reached or refused the connection (auth, host key, network)."""

    def __init__(self, host: str, reason: str, *, temporary: bool = True) -> None:
        self.host = host
        self.reason = reason
        self.temporary = temporary
        super().__init__(f"{host}: unreachable: {reason}")


class ParseError(KvmstateError):
    """Output of a command on a host did not parse. Never treated as 'absent'."""

    def __init__(self, host: str, what: str, detail: str) -> None:
        self.host = host
        self.what = what
        super().__init__(f"{host}: cannot parse output of {what}: {detail}")


class TemporaryError(KvmstateError):
    """Worth retrying after a delay (a daemon restarting, a lock held)."""

    def __init__(self, message: str, delay: float = 1.0) -> None:
        self.delay = delay
        super().__init__(message)


class RefusedError(KvmstateError):
    """kvmstate refuses to do what the plan would need, to lose nothing (e.g. unmount in use)."""


class ConflictError(KvmstateError):
    """The world moved away from the plan between planning and applying."""


def line_of(lines: dict[tuple[str | int, ...], int], loc: tuple[str | int, ...]) -> int | None:
    """Line of the deepest known prefix of ``loc`` in a spec's {location: line} map."""
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None
