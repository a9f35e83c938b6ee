"""NFS export tables: /etc/exports (+ /etc/exports.d) lines and the live ``exportfs -v`` table.

Pure parsers and editors (no I/O); the facts that read them live in ``hostfacts``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from kvmstate.errors import ParseError
from kvmstate.tabfiles import escape_octal, replace_lines, unescape_octal

# A fixed script (no spec value in it): every /etc/exports.d/*.exports with a header line.
EXPORTS_D_SCRIPT = (
    'for f in /etc/exports.d/*.exports; do [ -f "$f" ] || continue; '
    'printf "==> %s <==\\n" "$f"; cat -- "$f"; done'
)


# --- /etc/exports ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportLine:
    path: str
    clients: tuple[tuple[str, tuple[str, ...]], ...]  # (client, options)
    source: str = "/etc/exports"


def _logical_lines(text: str) -> list[str]:
    out: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0] if not raw.lstrip().startswith('"') else raw
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            out.append(buf.strip())
        buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out


def parse_exports(text: str, source: str = "/etc/exports") -> list[ExportLine]:
    """exports(5): path, optional ``-defaults``, then ``client(options)`` items."""
    out: list[ExportLine] = []
    for line in _logical_lines(text):
        if line.startswith('"'):
            end = line.find('"', 1)
            if end < 0:
                raise ParseError("-", source, f"unterminated quote: {line!r}")
            path, rest = line[1:end], line[end + 1 :].split()
        else:
            first, *rest = line.split()
            path = first
        path = unescape_octal(path)
        defaults: tuple[str, ...] = ()
        clients: list[tuple[str, tuple[str, ...]]] = []
        for item in rest:
            if item.startswith("-"):
                defaults = tuple(o for o in item[1:].split(",") if o)
                continue
            m = re.fullmatch(r"([^()]*)(?:\(([^()]*)\))?", item)
            if m is None:
                raise ParseError("-", source, f"bad client {item!r} in {line!r}")
            opts = tuple(o for o in (m.group(2) or "").split(",") if o)
            clients.append((m.group(1) or "*", defaults + opts))
        out.append(ExportLine(path, tuple(clients), source))
    return out


def parse_exports_d(text: str) -> list[ExportLine]:
    """Output of ``EXPORTS_D_SCRIPT``: ``==> FILE <==`` headers followed by each file."""
    out: list[ExportLine] = []
    for m in re.finditer(r"^==> (.+?) <==\n(.*?)(?=^==> |\Z)", text, re.M | re.S):
        out.extend(parse_exports(m.group(2), m.group(1)))
    return out


def export_line(path: str, clients: Iterable[tuple[str, Iterable[str]]]) -> str:
    items = " ".join(f"{c}({','.join(opts)})" for c, opts in clients)
    return f"{escape_octal(path)} {items}"


def exports_with(text: str | None, path: str, new_line: str | None) -> str:
    """/etc/exports with the line(s) for ``path`` replaced; every other line kept byte for byte.
    Only single physical lines are replaced (kvmstate writes no continuations)."""

    def matches(_: int, line: str) -> bool:
        parsed = parse_exports(line) if not line.rstrip().endswith("\\") else []
        return bool(parsed) and parsed[0].path == path

    return replace_lines((text or "").splitlines(keepends=True), matches, new_line)


# --- exportfs -v -------------------------------------------------------------------------------

# exportfs prints "<world>" for '*' and omits options that are defaults in some versions;
# these are the defaults implied when an option's opposite is absent.
_IMPLIED = (
    ("async", "sync"),
    ("ro", "rw"),
    ("insecure", "secure"),
    ("all_squash", "no_all_squash"),
    ("nohide", "hide"),
    ("no_root_squash", "root_squash"),
    ("no_subtree_check", "subtree_check"),
)


def parse_exportfs_v(text: str) -> dict[tuple[str, str], frozenset[str]]:
    """``exportfs -v`` (nfs-utils dump()): ``PATH<pad>\\tCLIENT(opts)``, with paths longer than
    14 characters wrapped onto their own line and the client on the next one after two tabs."""
    out: dict[tuple[str, str], frozenset[str]] = {}
    pending: str | None = None
    for raw in text.splitlines():
        if not raw.strip():
            continue
        if raw.startswith("\t"):
            if pending is None:
                raise ParseError("-", "exportfs -v", f"client line without a path: {raw!r}")
            path, rest = pending, raw.strip()
            pending = None
        else:
            parts = raw.split(None, 1)
            if len(parts) == 1:
                pending = parts[0]
                continue
            path, rest = parts[0], parts[1].strip()
        m = re.fullmatch(r"(\S+?)\(([^()]*)\)", rest)
        if m is None:
            raise ParseError("-", "exportfs -v", f"bad line {raw!r}")
        client = "*" if m.group(1) == "<world>" else m.group(1)
        out[(unescape_octal(path), client)] = normalize_export_options(m.group(2).split(","))
    if pending is not None:
        raise ParseError("-", "exportfs -v", f"path {pending!r} without a client")
    return out


def normalize_export_options(opts: Iterable[str]) -> frozenset[str]:
    """Add the defaults implied by an option's absence (no ``async`` means ``sync``...)."""
    s = {o for o in opts if o}
    for opposite, default in _IMPLIED:
        if opposite not in s and default not in s:
            s.add(default)
    return frozenset(s)
