"""Run one daemon as the child of a subreaper that reaps every orphan below it at once.

libvirtd daemonizes QEMU and sshd sessions start FUSE NFS clients that detach: such orphans
go to the nearest "child subreaper" ancestor, else to PID 1. When PID 1 reaps lazily (as in
some containers), a dead QEMU stays a zombie and libvirt, which polls ``kill(pid, 0)``,
waits for it: ``virDomainDestroy`` then takes over a second. Under this reaper it does not.

Usage: ``python -m kvmstate.lab.reaper -- ARGV...``. Signals are forwarded to the daemon;
the reaper exits with the daemon's status.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Sequence

PR_SET_CHILD_SUBREAPER = 36


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        print("usage: python -m kvmstate.lab.reaper -- ARGV...", file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"reaper: prctl: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
    child = os.fork()
    if child == 0:  # pragma: no cover - replaced by exec
        try:
            os.execvp(args[0], args)  # noqa: S606 (argv list, no shell)
        finally:
            os._exit(127)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, forward)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 0
        if pid == child:
            return os.waitstatus_to_exitcode(status) & 0xFF


if __name__ == "__main__":
    sys.exit(main())
