"""Line-oriented system tables (/etc/fstab, /etc/exports, /proc/self/mountinfo, ``exportfs
-v``): the octal escapes they share and the one editor that replaces a line in them.

Pure text helpers with no kvmstate import: ``hostfacts`` (fstab, mountinfo) and ``nfsexports``
(exports) both build on this module, and neither imports the other for it.
"""

from __future__ import annotations

import re
from collections.abc import Callable


def unescape_octal(text: str) -> str:
    """``/a\\040b`` -> ``/a b`` (fstab, mountinfo, exports and exportfs escape with \\ooo)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def escape_octal(path: str) -> str:
    """A path as one whitespace-free field: backslash, space and tab as \\ooo."""
    return path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")


def replace_lines(
    lines: list[str], matches: Callable[[int, str], bool], new_line: str | None
) -> str:
    """``lines`` with the ones ``matches`` selects replaced by ``new_line`` (in place of the
    first; None: removed) or, when none matches, ``new_line`` appended. Every other line is
    kept byte for byte. Shared by the fstab and /etc/exports editors."""
    out: list[str] = []
    placed = False
    for i, line in enumerate(lines):
        if matches(i, line):
            if new_line is not None and not placed:
                out.append(new_line + "\n")
                placed = True
            continue
        out.append(line)
    if new_line is not None and not placed:
        if out and not out[-1].endswith("\n"):
            out[-1] += "\n"
        out.append(new_line + "\n")
    return "".join(out)
