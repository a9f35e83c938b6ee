"""Small helpers shared by the resource kinds (fstab edits, option sets, diff building)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from kvmstate import hostfacts
from kvmstate.model import DriftClass, FieldDiff
from kvmstate.resources.base import RunContext
from kvmstate.transport.base import read_file, write_file

FSTAB = "/etc/fstab"

# Mount options the kernel shows in mountinfo when set; others (defaults, auto, _netdev, ...)
# only live in fstab and are compared there.
VISIBLE_OPTIONS = frozenset(
    {"ro", "noatime", "nodiratime", "relatime", "strictatime", "nosuid", "nodev", "noexec"}
)


async def set_fstab_line(
    ctx: RunContext, host: str, mountpoint: str, line: str | None, log: logging.LoggerAdapter[Any]
) -> bool:
    """Replace (or remove) the entry for ``mountpoint``; keeps every other line byte for byte.
    Reads the file fresh (not from the fact cache) right before the atomic write."""
    shell = ctx.shell(host)
    current = await read_file(shell, FSTAB)
    new = hostfacts.fstab_with(current, mountpoint, line)
    if new == (current or ""):
        return False
    log.info(
        "%s: %s %s", host, "writing /etc/fstab entry" if line else "removing fstab entry", line
    )
    await write_file(shell, FSTAB, new)
    return True


async def mkdir_p(ctx: RunContext, host: str, path: str, log: logging.LoggerAdapter[Any]) -> None:
    log.info("%s: mkdir -p %s", host, path)
    await ctx.shell(host).run(["mkdir", "-p", "--", path])


def fstab_line(source: str, mountpoint: str, fstype: str, options: Iterable[str]) -> str:
    opts = ",".join(options) or "defaults"
    return (
        f"{hostfacts.fstab_escape(source)} {hostfacts.fstab_escape(mountpoint)} {fstype} {opts} 0 0"
    )


def describe_fstab(entry: hostfacts.FstabEntry | None) -> str | None:
    if entry is None:
        return None
    return f"{entry.source} {entry.mountpoint} {entry.fstype} {','.join(entry.options)}"


def option_set(options: Iterable[str]) -> frozenset[str]:
    """Options as a set; ``defaults`` adds nothing when other options are given."""
    s = frozenset(o for o in options if o)
    return s - {"defaults"} if len(s) > 1 else s


def diff(field: str, before: Any, after: Any, drift: DriftClass = "config") -> FieldDiff:
    return FieldDiff(field, before, after, drift)
