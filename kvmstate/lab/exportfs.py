"""The storage host's ``exportfs``: ``/etc/exports`` driving NFS-Ganesha.

Ganesha does not read ``/etc/exports``. This stand-in (first in the storage host's PATH)
keeps the ordinary admin path working: it parses ``/etc/exports`` and
``/etc/exports.d/*.exports``, keeps the live export table (what is exported now, distinct
from the files, as the kernel's etab is), renders it as ganesha ``EXPORT`` blocks, reloads
ganesha with SIGHUP and waits until the server's MOUNT service lists exactly that table.

Supported: ``exportfs`` / ``-v`` (list), ``-a``, ``-r``, ``-ra``, ``-u CLIENT:PATH``,
``-ua``, ``-o OPTS CLIENT:PATH``. Output follows nfs-utils' format.
"""

from __future__ import annotations

import argparse
import glob
import ipaddress
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

EXPORTS = Path("/etc/exports")
EXPORTS_D = Path("/etc/exports.d")
LIVE_TABLE = Path("/var/lib/nfs/kvmstate-etab.json")
GANESHA_EXPORTS = Path("/etc/ganesha/exports.conf")
GANESHA_PID = Path("/run/ganesha/ganesha.pid")
SERVER_ADDRESS_FILE = Path("/etc/ganesha/server-address")
GANESHA_LOG = Path("/var/log/ganesha/ganesha.log")
DEFAULT_OPTIONS = ("ro", "sync", "root_squash", "no_subtree_check", "secure", "wdelay", "hide")


@dataclass(frozen=True)
class Export:
    path: str
    client: str
    options: tuple[str, ...]

    def option_map(self) -> dict[str, str | None]:
        """The effective options, nfs-utils defaults first, later options winning."""
        opts: dict[str, str | None] = {}
        opposites = {
            "rw": "ro", "ro": "rw", "sync": "async", "async": "sync",
            "root_squash": "no_root_squash", "no_root_squash": "root_squash",
            "all_squash": "no_all_squash", "no_all_squash": "all_squash",
            "subtree_check": "no_subtree_check", "no_subtree_check": "subtree_check",
            "secure": "insecure", "insecure": "secure", "wdelay": "no_wdelay",
            "no_wdelay": "wdelay", "hide": "nohide", "nohide": "hide",
        }  # fmt: skip
        for opt in (*DEFAULT_OPTIONS, *self.options):
            key, sep, value = opt.partition("=")
            if key in opposites:
                opts.pop(opposites[key], None)
            opts[key] = value if sep else None
        return opts

    def verbose_options(self) -> str:
        """The option list as ``exportfs -v`` prints it (nfs-utils order)."""
        o = self.option_map()
        out = ["async" if "async" in o else "sync"]
        out.append("no_wdelay" if "no_wdelay" in o else "wdelay")
        out.append("nohide" if "nohide" in o else "hide")
        if "crossmnt" in o:
            out.append("crossmnt")
        if "subtree_check" not in o:
            out.append("no_subtree_check")
        if "insecure_locks" in o or "no_auth_nlm" in o:
            out.append("insecure_locks")
        if o.get("fsid") is not None:
            out.append(f"fsid={o['fsid']}")
        for key in ("anonuid", "anongid"):
            if o.get(key) not in (None, "65534"):
                out.append(f"{key}={o[key]}")
        for sec in (o.get("sec") or "sys").split(":"):
            out.append(f"sec={sec}")
            out.append("rw" if "rw" in o else "ro")
            out.append("insecure" if "insecure" in o else "secure")
            out.append("no_root_squash" if "no_root_squash" in o else "root_squash")
            out.append("all_squash" if "all_squash" in o else "no_all_squash")
        return ",".join(out)


def _logical_lines(text: str) -> Iterable[str]:
    buf = ""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            yield buf.strip()
        buf = ""
    if buf.strip():
        yield buf.strip()


def parse_exports(text: str, source: str = "/etc/exports") -> list[Export]:
    """Parse exports(5) text: ``PATH [-DEFAULTS] CLIENT(OPTS) ...``."""
    exports: list[Export] = []
    for n, line in enumerate(_logical_lines(text), 1):
        words = shlex.split(line)
        path, rest = words[0], words[1:]
        if not path.startswith("/"):
            raise ValueError(f"{source}:{n}: bad path {path!r}")
        defaults: tuple[str, ...] = ()
        if rest and rest[0].startswith("-"):
            defaults = tuple(o for o in rest[0][1:].split(",") if o)
            rest = rest[1:]
        if not rest:
            rest = ["*"]
        for item in rest:
            client, _, opts = item.partition("(")
            if opts and not opts.endswith(")"):
                raise ValueError(f"{source}:{n}: bad client entry {item!r}")
            options = defaults + tuple(o for o in opts.rstrip(")").split(",") if o)
            exports.append(Export(path, client or "*", options))
    return exports


def read_configured() -> list[Export]:
    exports: list[Export] = []
    files = [EXPORTS, *sorted(Path(p) for p in glob.glob(str(EXPORTS_D / "*.exports")))]
    for f in files:
        if f.exists():
            exports.extend(parse_exports(f.read_text(), str(f)))
    return exports


def read_live() -> list[Export]:
    try:
        data = json.loads(LIVE_TABLE.read_text())
    except (OSError, ValueError):
        return []
    return [Export(d["path"], d["client"], tuple(d["options"])) for d in data]


def write_live(exports: Sequence[Export]) -> None:
    LIVE_TABLE.parent.mkdir(parents=True, exist_ok=True)
    data = [{"path": e.path, "client": e.client, "options": list(e.options)} for e in exports]
    tmp = LIVE_TABLE.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(LIVE_TABLE)


def format_list(exports: Sequence[Export], verbose: bool) -> str:
    """``exportfs`` / ``exportfs -v`` output, as nfs-utils prints it."""
    lines = []
    for e in exports:
        client = "<world>" if e.client == "*" else e.client
        head = f"{e.path:<14}\n\t\t{client}" if len(e.path) > 14 else f"{e.path:<14}\t{client}"
        lines.append(head + (f"({e.verbose_options()})" if verbose else ""))
    return "".join(line + "\n" for line in lines)


def _ganesha_client(e: Export) -> str:
    o = e.option_map()
    squash = (
        "All_Squash" if "all_squash" in o
        else "No_Root_Squash" if "no_root_squash" in o
        else "Root_Squash"
    )  # fmt: skip
    clients = "*" if e.client in ("*", "") else e.client
    if not re.fullmatch(r"[A-Za-z0-9.:/*_\-\[\]?]+", clients):
        raise ValueError(f"unsupported client {clients!r}")
    lines = [
        "    CLIENT {",
        f"        Clients = {clients};",
        f"        Access_Type = {'RW' if 'rw' in o else 'RO'};",
        f"        Squash = {squash};",
    ]
    if o.get("anonuid") is not None:
        lines.append(f"        Anonymous_Uid = {o['anonuid']};")
    if o.get("anongid") is not None:
        lines.append(f"        Anonymous_Gid = {o['anongid']};")
    lines.append("    }")
    return "\n".join(lines)


def render_ganesha(exports: Sequence[Export]) -> str:
    """Ganesha EXPORT blocks: nothing is allowed except the listed clients."""
    by_path: dict[str, list[Export]] = {}
    for e in exports:
        by_path.setdefault(e.path, []).append(e)
    blocks = ["# Generated by kvmstate's lab exportfs from the live export table. Do not edit."]
    for export_id, (path, entries) in enumerate(sorted(by_path.items()), start=1):
        quoted = json.dumps(path)
        blocks.append(
            "EXPORT {\n"
            f"    Export_Id = {export_id};\n"
            f"    Path = {quoted};\n"
            f"    Pseudo = {quoted};\n"
            "    Protocols = 3, 4;\n"
            "    Transports = TCP;\n"
            "    Access_Type = None;\n"
            "    Squash = Root_Squash;\n"
            "    SecType = sys;\n"
            + "\n".join(_ganesha_client(e) for e in entries)
            + "\n    FSAL { Name = VFS; }\n}"
        )
    return "\n".join(blocks) + "\n"


def _server_address() -> str:
    try:
        return SERVER_ADDRESS_FILE.read_text().strip()
    except OSError:
        return "127.0.0.1"


def _served_paths() -> set[str] | None:
    out = subprocess.run(
        ["showmount", "--no-headers", "-e", _server_address()],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    )
    if out.returncode != 0:
        return None
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _visible_from_server(e: Export, server: str) -> bool:
    """Whether ganesha lists ``e`` to the server's own address (MNT EXPORT filters by access)."""
    if e.client in ("*", ""):
        return True
    try:
        return ipaddress.ip_address(server) in ipaddress.ip_network(e.client, strict=False)
    except ValueError:
        return False


def _log_size() -> int:
    try:
        return GANESHA_LOG.stat().st_size
    except OSError:
        return 0


def _log_since(offset: int) -> str:
    try:
        with open(GANESHA_LOG, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def apply_live(exports: Sequence[Export], timeout: float = 10.0) -> int:
    """Make ganesha export exactly ``exports`` and wait until its reload is done.

    Done means: ganesha logged the end of its export reload, logged no error about it, and
    its MOUNT service lists every export the server's own address may see (ganesha hides
    the others from us) and nothing else.
    """
    status = 0
    usable: list[Export] = []
    for e in exports:
        if not os.path.isdir(e.path):
            print(f"exportfs: Failed to stat {e.path}: No such file or directory", file=sys.stderr)
            status = 1
            continue
        usable.append(e)
    try:
        rendered = render_ganesha(usable)
    except ValueError as exc:
        print(f"exportfs: {exc}", file=sys.stderr)
        return 1
    write_live(usable)
    GANESHA_EXPORTS.write_text(rendered)
    offset = _log_size()
    try:
        pid = int(GANESHA_PID.read_text().split()[0])
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError, IndexError):
        print("exportfs: the NFS server (ganesha) is not running", file=sys.stderr)
        return 1
    deadline = time.monotonic() + timeout
    while "Reread exports complete" not in _log_since(offset):
        if time.monotonic() > deadline:
            print("exportfs: the NFS server did not reload its exports", file=sys.stderr)
            return 1
        time.sleep(0.02)
    server = _server_address()
    want = {e.path for e in usable}
    visible = {e.path for e in usable if _visible_from_server(e, server)}
    served: set[str] | None = None
    while time.monotonic() < deadline:
        served = _served_paths()
        if served is not None and visible <= served <= want:
            break
        time.sleep(0.05)
    errors = [
        line
        for line in _log_since(offset).splitlines()
        if (":CRIT :" in line or ":MAJ :" in line) and "DBUS" not in line
    ]
    if errors:
        print("exportfs: the NFS server reported errors:", file=sys.stderr)
        for line in errors:
            print("  " + line.split("] ", 1)[-1], file=sys.stderr)
        return 1
    if served is None or not (visible <= served <= want):
        print(
            f"exportfs: the NFS server did not take the exports: want {sorted(visible)}, "
            f"serving {sorted(served or set())} (see /var/log/ganesha/ganesha.log)",
            file=sys.stderr,
        )
        return 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="exportfs", add_help=True)
    p.add_argument("-a", action="store_true", help="export all entries of /etc/exports")
    p.add_argument("-r", action="store_true", help="re-export all: sync the live table")
    p.add_argument("-u", action="store_true", help="unexport")
    p.add_argument("-v", action="store_true", help="verbose")
    p.add_argument("-f", action="store_true", help="flush (accepted, no-op)")
    p.add_argument("-s", action="store_true", help="list /etc/exports entries")
    p.add_argument("-o", dest="options", help="options for CLIENT:PATH")
    p.add_argument("entries", nargs="*", metavar="CLIENT:PATH")
    args = p.parse_args(argv)

    live = read_live()
    if args.s:
        sys.stdout.write(format_list(read_configured(), verbose=True))
        return 0
    if not (args.a or args.r or args.u or args.entries):
        sys.stdout.write(format_list(live, verbose=args.v))
        return 0
    try:
        configured = read_configured()
    except ValueError as exc:
        print(f"exportfs: {exc}", file=sys.stderr)
        return 1

    if args.u:
        if args.a:
            new: list[Export] = []
        else:
            targets = {_split_entry(x) for x in args.entries}
            new = [e for e in live if (e.client, e.path) not in targets]
            for client, path in targets:
                if not any((e.client, e.path) == (client, path) for e in live):
                    print(
                        f"exportfs: Could not find '{client}:{path}' to unexport.", file=sys.stderr
                    )
        if args.v:
            for e in live:
                if e not in new:
                    print(f"unexporting {e.client}:{e.path}")
        return apply_live(new)

    if args.r:
        new = list(configured)
    elif args.a:
        new = list(live) + [e for e in configured if e not in live]
    else:
        new = list(live)
    for item in args.entries:
        client, path = _split_entry(item)
        opts = tuple(o for o in (args.options or "").split(",") if o)
        new = [e for e in new if (e.client, e.path) != (client, path)]
        new.append(Export(path, client, opts))
    if args.v:
        for e in new:
            print(f"exporting {e.client}:{e.path}")
    return apply_live(_dedupe(new))


def _split_entry(item: str) -> tuple[str, str]:
    client, sep, path = item.rpartition(":")
    if not sep:
        return "*", item
    return client or "*", path


def _dedupe(exports: Iterable[Export]) -> list[Export]:
    seen: dict[tuple[str, str], Export] = {}
    for e in exports:
        seen[(e.path, e.client)] = e
    return list(seen.values())


if __name__ == "__main__":
    sys.exit(main())
