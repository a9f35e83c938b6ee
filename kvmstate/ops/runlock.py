"""Run locking: two applies never run at once against the same cluster.

Two layers:
- a local lock file (``flock``) keyed by the cluster, so two runs on one machine serialize;
- a lock on the cluster itself, held on a host of the cluster by a remote ``flock`` whose
  process lives exactly as long as kvmstate's SSH channel: if the holder dies (even SIGKILL),
  sshd closes the channel, the remote process exits and the kernel releases the lock.

``apply`` takes them exclusive; ``drift``/``plan`` take the local one shared.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from kvmstate.errors import KvmstateError


class LockTimeout(KvmstateError):
    def __init__(self, what: str, holder: str, waited: float) -> None:
        self.holder = holder
        super().__init__(f"{what} is held by {holder}; gave up after waiting {waited:.0f}s")


def state_dir() -> Path:
    base = os.environ.get("KVMSTATE_STATE_DIR")
    if base:
        return Path(base)
    if os.geteuid() == 0:
        return Path("/var/lib/kvmstate")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "kvmstate"


def cluster_key(hosts: dict[str, str]) -> str:
    """A stable name for a cluster: its host names and addresses."""
    text = ",".join(f"{k}={v}" for k, v in sorted(hosts.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def holder_info(command: str) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "user": getpass.getuser(),
        "command": command,
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return (
            f"`{info.get('command', '?')}` (pid {info.get('pid')} on {info.get('host')} "
            f"as {info.get('user')}, since {info.get('since')})"
        )
    except (ValueError, AttributeError):
        return text.strip() or "another kvmstate run"


@contextlib.contextmanager
def local_lock(
    key: str,
    *,
    command: str,
    exclusive: bool = True,
    timeout: float = 0.0,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold ``<state>/locks/<key>.lock`` for the block; wait up to ``timeout`` seconds."""
    directory = state_dir() / "locks"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key}.lock"
    holder_path = directory / f"{key}.holder"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    f: IO[str] = os.fdopen(fd, "r+")
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    try:
        while True:
            try:
                fcntl.flock(f, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                try:
                    holder = describe_holder(holder_path.read_text())
                except OSError:
                    holder = "another kvmstate run"
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        "the cluster's run lock", holder, time.monotonic() - started
                    ) from None
                if on_wait is not None:
                    on_wait(holder)
                    on_wait = None
                time.sleep(0.1)
        if exclusive:
            tmp = holder_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(holder_info(command)))
            tmp.replace(holder_path)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
