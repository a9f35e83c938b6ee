"""The cluster lock: held on one host of the cluster for the whole of an apply.

The local lock (``runlock.py``) serializes runs on one machine; this one serializes runs from
different machines. A small fixed script takes ``flock`` on ``/run/kvmstate.lock`` on the lock
host, writes who holds it, prints ``LOCKED`` and then waits on its stdin, which is kvmstate's
SSH channel. When kvmstate closes the channel, or dies (even SIGKILL: the TCP connection
drops and sshd ends the session), the process exits and the kernel releases the lock. A lock
can therefore never outlive its holder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

from kvmstate.errors import KvmstateError
from kvmstate.ops.runlock import LockTimeout, describe_holder, holder_info
from kvmstate.spec import Spec
from kvmstate.transport.base import Transports

log = logging.getLogger(__name__)

LOCK_FILE = "/run/kvmstate.lock"
HOLDER_FILE = "/run/kvmstate.holder"

# "$1" is the holder description (JSON); nothing from the spec is spliced into the text.
LOCK_SCRIPT = (
    f"exec 9>>{LOCK_FILE} || exit 3; "
    f"if ! flock -n 9; then cat {HOLDER_FILE} 2>/dev/null; exit 75; fi; "
    f'printf "%s\\n" "$1" > {HOLDER_FILE}; echo LOCKED; exec cat >/dev/null'
)


def lock_host(spec: Spec) -> str:
    """The host that holds the cluster lock: the storage host (first export's, else first
    subvolume's), else the first host of the spec."""
    for section in (spec.exports, spec.subvolumes):
        for item in section.values():
            if item.state == "present":
                return item.host
    return next(iter(spec.hosts))


@contextlib.asynccontextmanager
async def cluster_lock(
    transports: Transports,
    spec: Spec,
    *,
    command: str,
    timeout: float = 0.0,
    on_wait: Callable[[str], None] | None = None,
) -> AsyncIterator[str]:
    """Hold the cluster lock for the block; yields the lock host. Waits up to ``timeout``.

    The lock script runs through the host's ``Shell`` (``start``: one channel held open on
    the run's SSH connection, with ``sudo`` when the spec asks for it)."""
    host = lock_host(spec)
    shell = transports.shell(host)
    argv = ["sh", "-c", LOCK_SCRIPT, "kvmstate-lock", json.dumps(holder_info(command))]
    started = time.monotonic()
    while True:
        proc = await shell.start(argv)
        first = await proc.readline()
        if first.strip() == "LOCKED":
            break
        done = await proc.finish()
        rest = first + done.stdout
        if done.exit_status != 75:
            raise KvmstateError(
                f"{host}: cannot take the cluster lock {LOCK_FILE}: exit {done.exit_status} "
                f"{done.stderr.strip() or rest.strip()}"
            )
        holder = f"{describe_holder(rest)} (cluster lock on {host})"
        if time.monotonic() - started >= timeout:
            raise LockTimeout("the cluster lock", holder, time.monotonic() - started)
        if on_wait is not None:
            on_wait(holder)
            on_wait = None
        await asyncio.sleep(1.0)
    log.debug("cluster lock held on %s", host)
    try:
        yield host
    finally:
        await proc.close()
