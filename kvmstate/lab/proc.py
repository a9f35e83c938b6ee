"""Running commands and daemons for the lab: argv lists only, every daemon PID recorded."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class LabError(RuntimeError):
    """Something the lab needs is missing or failed; the message says what to do."""


class CommandError(LabError):
    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"{' '.join(argv)} exited {returncode}: {stderr.strip()}")


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = 120,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` and capture its output as text; raise :class:`CommandError` on failure."""
    log.debug("run %s", argv)
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            input=input,
            env=env,
            timeout=timeout,
            check=False,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]}: not installed (run `kvmstate lab install`)") from exc
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr or proc.stdout)
    return proc


def stop(proc: subprocess.Popen[Any], timeout: float = 10) -> None:
    """Stop a child of ours by its PID: SIGTERM, then SIGKILL after ``timeout``; reaped."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for(
    what: str,
    ready: Callable[[], bool],
    timeout: float = 20.0,
    alive: Callable[[], bool] = lambda: True,
) -> None:
    """Poll ``ready`` until it is true; fail early when ``alive`` says the daemon died."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not ready():
        if not alive():
            raise LabError(f"{what}: the process died before it was ready")
        if time.monotonic() > deadline:
            raise LabError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.1)


def unix_socket_ready(path: Path) -> Callable[[], bool]:
    def ready() -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(path))
            except OSError:
                return False
            return True

    return ready


def tcp_port_ready(netns_path: Path, address: str, port: int) -> Callable[[], bool]:
    """True once something listens on ``address:port`` inside a network namespace."""

    def ready() -> bool:
        out = run(
            ["nsenter", f"--net={netns_path}", "ss", "-Hltn", f"src {address}:{port}"],
            check=False,
        )
        return bool(out.stdout.strip())

    return ready


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (identifies it across PID reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int, started: int | None = None) -> bool:
    st = start_time(pid)
    if st is None:
        return False
    if started is not None and st != started:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass(frozen=True)
class Daemon:
    name: str
    host: str
    pid: int
    started: int | None


class PidRegistry:
    """The PIDs of every daemon the lab started, kept in ``pids.json`` in the lab dir."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[Daemon]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        return [Daemon(d["name"], d["host"], int(d["pid"]), d.get("started")) for d in data]

    def add(self, daemon: Daemon) -> None:
        daemons = [*self.load(), daemon]
        self._save(daemons)

    def _save(self, daemons: list[Daemon]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps([d.__dict__ for d in daemons], indent=2) + "\n")
        tmp.replace(self.path)

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def spawn(
    registry: PidRegistry,
    name: str,
    host: str,
    argv: Sequence[str],
    logfile: Path,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a foreground daemon in its own session, its output appended to ``logfile``.

    The PID is recorded before this returns, so ``lab down`` can stop exactly this process.
    """
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    registry.add(Daemon(name, host, proc.pid, start_time(proc.pid)))
    log.debug("started %s on %s: pid %d", name, host, proc.pid)
    return proc


def gone(pid: int, started: int | None = None) -> bool:
    """True once ``pid`` has left the process table: exited AND reaped (a zombie is not gone:
    ``ps`` still lists it). A PID reused by a newer process counts as gone."""
    st = start_time(pid)
    return st is None or (started is not None and st != started)


def kill_pids(
    pids: Sequence[tuple[int, int | None]],
    timeout: float = 5.0,
    reap_timeout: float = 10.0,
    names: Mapping[int, str] | None = None,
) -> list[str]:
    """SIGTERM the given (pid, start time) pairs, SIGKILL what still runs after ``timeout``,
    and return only when every one of them has left the process table (or ``reap_timeout``
    later, saying which did not; 0 = do not wait for that). Our own children are reaped
    here; an orphan is reaped by init, which on some machines does so a second or two late:
    waiting for that is what makes "down returned" mean "nothing of it is left". Returns
    what had to be SIGKILLed, as "NAME (pid N)"."""
    label = names or {}
    live = [(p, s) for p, s in pids if pid_alive(p, s)]
    waiting = [(p, s) for p, s in pids if not gone(p, s)]
    for pid, _ in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    live = _wait(live, timeout, lambda p, s: not pid_alive(p, s))
    killed = [f"{label.get(pid, _comm(pid))} (pid {pid})" for pid, _ in live]
    for pid, _ in live:
        log.warning("pid %d (%s) ignored SIGTERM for %.0f s; killing it", pid, _comm(pid), timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if reap_timeout > 0:
        wait_gone(waiting, reap_timeout, label)
    return killed


def wait_gone(
    pids: Sequence[tuple[int, int | None]],
    timeout: float = 10.0,
    names: Mapping[int, str] | None = None,
) -> list[int]:
    """Wait until each (pid, start time) has left the process table; returns those still there
    after ``timeout`` (each logged)."""
    left = _wait([(p, s) for p, s in pids if not gone(p, s)], timeout, gone)
    for pid, _ in left:
        what = (names or {}).get(pid, _comm(pid))
        log.warning("pid %d (%s) is still in the process table after %.0f s", pid, what, timeout)
    return [p for p, _ in left]


def _wait(
    pids: list[tuple[int, int | None]],
    timeout: float,
    done: Callable[[int, int | None], bool],
) -> list[tuple[int, int | None]]:
    """Poll until ``done`` holds for every pid (reaping our own children); returns the rest."""
    deadline = time.monotonic() + timeout
    while pids:
        _reap([p for p, _ in pids])
        pids = [(p, s) for p, s in pids if not done(p, s)]
        if not pids or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    return pids


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _reap(pids: Sequence[int]) -> None:
    """Collect those of ``pids`` that are exited children of this process (no zombies)."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
