"""Concrete facts about a host: a command plus a pure parser (pyinfra style).

Parsers take text and return small frozen values; they raise ``ParseError`` on output they do
not understand, and never turn a failure into "absent". Every fact here is read in one batch
per host by ``FactCache`` (one round trip).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from kvmstate.errors import ParseError
from kvmstate.facts import Fact
from kvmstate.nfsexports import EXPORTS_D_SCRIPT, ExportLine, parse_exportfs_v, parse_exports_d
from kvmstate.tabfiles import escape_octal, replace_lines, unescape_octal
from kvmstate.transport.base import CommandResult

T = TypeVar("T")

# --- helpers -----------------------------------------------------------------------------------


def _file_text(res: CommandResult, what: str) -> str | None:
    """``cat`` output; None when the file does not exist; ParseError for any other failure."""
    if res.ok:
        return res.stdout
    if "No such file" in res.stderr:
        return None
    raise ParseError(res.host, what, f"exit {res.exit_status}: {res.stderr.strip()}")


# --- fstab -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FstabEntry:
    source: str
    mountpoint: str
    fstype: str
    options: tuple[str, ...]
    line: int  # 0-based index in the file's lines


def parse_fstab(text: str) -> list[FstabEntry]:
    out: list[FstabEntry] = []
    for i, raw in enumerate(text.splitlines()):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 3:
            raise ParseError("-", "/etc/fstab", f"line {i + 1}: too few fields: {raw!r}")
        opts = tuple(fields[3].split(",")) if len(fields) > 3 else ("defaults",)
        out.append(
            FstabEntry(unescape_octal(fields[0]), unescape_octal(fields[1]), fields[2], opts, i)
        )
    return out


def fstab_entry_for(text: str | None, mountpoint: str) -> FstabEntry | None:
    for entry in parse_fstab(text or ""):
        if entry.mountpoint == mountpoint:
            return entry
    return None


def fstab_with(text: str | None, mountpoint: str, new_line: str | None) -> str:
    """The fstab with the entry for ``mountpoint`` replaced by ``new_line`` (None: removed,
    appended when missing). Every other line is kept byte for byte."""
    text = text or ""
    targets = {e.line for e in parse_fstab(text) if e.mountpoint == mountpoint}
    return replace_lines(text.splitlines(keepends=True), lambda i, _: i in targets, new_line)


def fstab_escape(path: str) -> str:
    return escape_octal(path)


# --- /proc/self/mountinfo ----------------------------------------------------------------------


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    root: str  # path inside the filesystem (btrfs: /subvolume)
    mountpoint: str
    mount_options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]

    @property
    def options(self) -> frozenset[str]:
        return frozenset(self.mount_options) | frozenset(self.super_options)

    def super_option(self, key: str) -> str | None:
        for opt in self.super_options:
            k, _, v = opt.partition("=")
            if k == key:
                return v
        return None


def parse_mountinfo(text: str) -> list[MountEntry]:
    out: list[MountEntry] = []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        left, sep, right = raw.partition(" - ")
        a, b = left.split(), right.split()
        if not sep or len(a) < 6 or len(b) < 2:
            raise ParseError("-", "/proc/self/mountinfo", f"bad line {raw!r}")
        try:
            mid, pid = int(a[0]), int(a[1])
        except ValueError:
            raise ParseError("-", "/proc/self/mountinfo", f"bad ids in {raw!r}") from None
        sopts = tuple(b[2].split(",")) if len(b) > 2 else ()
        out.append(
            MountEntry(
                mid,
                pid,
                unescape_octal(a[3]),
                unescape_octal(a[4]),
                tuple(a[5].split(",")),
                b[0],
                unescape_octal(b[1]),
                sopts,
            )
        )
    return out


def mounted_at(mounts: list[MountEntry], mountpoint: str) -> MountEntry | None:
    """The top-most mount on ``mountpoint`` (the last one in mountinfo order)."""
    found = None
    for m in mounts:
        if m.mountpoint == mountpoint:
            found = m
    return found


def same_source(a: str, b: str) -> bool:
    """``10.0.0.1:/srv/x`` equals ``10.0.0.1:/srv/x/``; IPv6 brackets ignored."""

    def norm(s: str) -> str:
        host, sep, path = s.rpartition(":")
        if not sep:
            return s.rstrip("/") or "/"
        return f"{host.strip('[]')}:{path.rstrip('/') or '/'}"

    return norm(a) == norm(b)


# --- btrfs, block devices, bridges, meminfo ------------------------------------------------------


def parse_btrfs_list(text: str) -> dict[str, int]:
    """``btrfs subvolume list PATH`` -> {path relative to the top level: subvolume id}."""
    out: dict[str, int] = {}
    for raw in text.splitlines():
        if not raw.strip():
            continue
        m = re.match(r"^ID (\d+) gen \d+ (?:cgen \d+ )?top level \d+ (?:.*?)path (.+)$", raw)
        if m is None:
            raise ParseError("-", "btrfs subvolume list", f"bad line {raw!r}")
        out[m.group(2).removeprefix("<FS_TREE>/")] = int(m.group(1))
    return out


def parse_bridges(text: str) -> frozenset[str]:
    """``ip -o link show type bridge`` -> bridge names."""
    out = set()
    for raw in text.splitlines():
        m = re.match(r"^\d+:\s+([^:@\s]+)[@:]", raw)
        if m:
            out.add(m.group(1))
    return frozenset(out)


def parse_meminfo_available(text: str) -> int:
    m = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M)
    if m is None:
        raise ParseError("-", "/proc/meminfo", "no MemAvailable line")
    return int(m.group(1)) * 1024


def device_argv(device: str) -> tuple[str, ...]:
    """How to resolve a btrfs device spec to the node mountinfo shows."""
    if "=" in device.split("/", 1)[0]:
        return ("blkid", "-o", "device", "-t", device)
    return ("readlink", "-e", "--", device)


# --- the facts ---------------------------------------------------------------------------------


def file_fact(path: str) -> Fact[str | None]:
    return Fact(f"file:{path}", ("cat", "--", path), lambda r: _file_text(r, path))


def _fstab(res: CommandResult) -> str | None:
    text = _file_text(res, "/etc/fstab")
    if text is not None:
        _parsed(res, "/etc/fstab", parse_fstab)  # fail early, naming the host
    return text


FSTAB: Fact[str | None] = Fact("file:/etc/fstab", ("cat", "--", "/etc/fstab"), _fstab)
EXPORTS = file_fact("/etc/exports")
MEM_AVAILABLE: Fact[int] = Fact(
    "meminfo",
    ("cat", "--", "/proc/meminfo"),
    lambda r: _parsed(r, "/proc/meminfo", parse_meminfo_available),
)
MOUNTINFO: Fact[list[MountEntry]] = Fact(
    "mountinfo",
    ("cat", "--", "/proc/self/mountinfo"),
    lambda r: _parsed(r, "/proc/self/mountinfo", parse_mountinfo),
)
EXPORTFS: Fact[dict[tuple[str, str], frozenset[str]]] = Fact(
    "exportfs", ("exportfs", "-v"), lambda r: _parsed(r, "exportfs -v", parse_exportfs_v)
)
EXPORTS_D: Fact[list[ExportLine]] = Fact(
    "exports.d",
    ("sh", "-c", EXPORTS_D_SCRIPT),
    lambda r: _parsed(r, "/etc/exports.d", parse_exports_d),
)
BRIDGES: Fact[frozenset[str]] = Fact(
    "bridges",
    ("ip", "-o", "link", "show", "type", "bridge"),
    lambda r: _parsed(r, "ip link", parse_bridges),
)


def _parsed(res: CommandResult, what: str, parse: Callable[[str], T]) -> T:
    """Run ``parse`` on a command's output; any failure names the host and the command."""
    if not res.ok:
        raise ParseError(res.host, what, f"exit {res.exit_status}: {res.stderr.strip()}")
    try:
        return parse(res.stdout)
    except ParseError as e:
        raise ParseError(res.host, what, _detail(e)) from None


def _detail(e: ParseError) -> str:
    prefix = f"{e.host}: cannot parse output of {e.what}: "
    msg = str(e)
    return msg[len(prefix) :] if msg.startswith(prefix) else msg


def device_fact(device: str) -> Fact[str | None]:
    """The device node of ``device`` (``LABEL=x``, ``UUID=x`` or a path); None if not found."""

    def parse(res: CommandResult) -> str | None:
        lines = res.stdout.split()
        if res.ok and lines:
            return lines[0]
        if res.exit_status in (1, 2) and not res.stdout.strip():
            return None  # blkid: 2 = not found; readlink -e: 1 = missing
        raise ParseError(res.host, f"device {device}", res.stderr.strip() or "no output")

    return Fact(f"device:{device}", device_argv(device), parse)


def btrfs_list_fact(path: str) -> Fact[dict[str, int] | None]:
    """Subvolumes of the btrfs mounted at ``path``; None when ``path`` is not btrfs/mounted."""

    def parse(res: CommandResult) -> dict[str, int] | None:
        if res.ok:
            return _parsed(res, f"btrfs subvolume list {path}", parse_btrfs_list)
        if (
            "Not a Btrfs" in res.stderr
            or "No such file" in res.stderr
            or "not a btrfs" in (res.stderr.lower())
        ):
            return None
        raise ParseError(res.host, f"btrfs subvolume list {path}", res.stderr.strip())

    return Fact(f"btrfs-list:{path}", ("btrfs", "subvolume", "list", path), parse)


def stat_owner_fact(path: str) -> Fact[tuple[str, str] | None]:
    def parse(res: CommandResult) -> tuple[str, str] | None:
        if not res.ok:
            if "No such file" in res.stderr:
                return None
            raise ParseError(res.host, f"stat {path}", res.stderr.strip())
        owner, _, group = res.stdout.strip().partition(":")
        return owner, group

    return Fact(f"owner:{path}", ("stat", "-c", "%U:%G", "--", path), parse)
