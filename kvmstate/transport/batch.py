"""The wire format of one exec channel: a command's exec string, and the ``run_many`` batch
(many argv lists run by one fixed POSIX-sh wrapper, their outputs framed by a per-call nonce
so that no command output can forge a header). Pure: no connection here; ``ssh.SSHShell``
sends and reads it."""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Sequence

from kvmstate.errors import ParseError
from kvmstate.transport.base import CommandResult, quote_argv

SUDO_PREFIX = ("sudo", "-n", "--")


# --- commands ----------------------------------------------------------------------------------


def remote_command(argv: Sequence[str], *, sudo: bool = False) -> str:
    """The exec string sent for one argv (``LC_ALL=C``, ``sudo -n --`` when asked)."""
    if not argv:
        raise ValueError("empty command")
    full = [*SUDO_PREFIX, *argv] if sudo else list(argv)
    return "LC_ALL=C " + quote_argv(full)


# The run_many wrapper: fixed text except the ``_k`` lines, whose words all come from
# quote_argv. The commands are independent reads, so they run CONCURRENTLY, up to ``_m`` at a
# time: the batch takes as long as its slowest read (``blkid`` probing disks, ``exportfs -v``
# on a busy server), not the sum of all. Each runs in the background (a subshell: a builtin
# like ``exit`` cannot end the batch) with its stdout and stderr in files of a private temp
# dir, and ``wait PID`` collects the exit statuses in the commands' order. At the end ONE
# ``wc -c`` gives every size and ONE ``base64`` carries all the bytes. About one fork per
# command plus five.
_BATCH_PREAMBLE = r"""LC_ALL=C; export LC_ALL
umask 077
d="${TMPDIR:-/tmp}/kvmstate-batch-$D"
mkdir -- "$d" || exit 125
trap 'rm -rf -- "$d"' EXIT
_s=; _f=; _p=; _c=0; _m=16
_w() {
  for _x in $_p; do wait "$_x"; _s="$_s $?"; done
  _p=; _c=0
}
_k() {
  _i=$1; shift
  "$@" </dev/null >"$d/$_i.o" 2>"$d/$_i.e" &
  _p="$_p $!"; _f="$_f $_i.o $_i.e"; _c=$((_c + 1))
  [ "$_c" -lt "$_m" ] || _w
}
"""

_BATCH_EPILOGUE = r"""_w
printf '\n%s status%s\n' "$N" "$_s"
cd -- "$d" || exit 125
printf '%s sizes\n' "$N"
wc -c -- $_f
printf '%s data\n' "$N"
cat -- $_f | base64
printf '%s end\n' "$N"
"""


def batch_script(argvs: Sequence[Sequence[str]], nonce: str, dir_token: str | None = None) -> str:
    """The POSIX sh script that runs ``argvs`` (concurrently, see above) and frames their
    output.

    The temp dir is named by a second random token, so a command that lists /tmp never sees
    the nonce (not that it could forge anything: all output is base64-encoded)."""
    token = dir_token if dir_token is not None else secrets.token_hex(8)
    for value in (nonce, token):
        if not re.fullmatch(r"[0-9a-f]{16,64}", value):
            raise ValueError("nonce and dir token must be 16-64 lowercase hex digits")
    lines = [f"N=KVMSTATE-{nonce}", f"D={token}", _BATCH_PREAMBLE]
    for i, argv in enumerate(argvs):
        if not argv:
            raise ValueError(f"empty command at index {i}")
        lines.append(f"_k {i} {quote_argv(argv)}")
    lines.append(_BATCH_EPILOGUE)
    return "\n".join(lines)


def parse_batch_output(
    host: str, argvs: Sequence[Sequence[str]], nonce: str, output: bytes
) -> list[CommandResult]:
    """Split the framed output of ``batch_script`` back into one result per command.

    Anything before the status header (e.g. noise printed by a login script) is ignored; a
    missing or truncated section, or sizes that do not add up, raise ``ParseError``.
    """
    marker = f"KVMSTATE-{nonce}"
    what = "a batched command"
    lines = output.decode("ascii", errors="replace").split("\n")
    try:
        start = next(i for i, x in enumerate(lines) if x.startswith(f"{marker} status"))
    except StopIteration:
        raise ParseError(host, what, "no status line (the wrapper did not finish)") from None
    statuses = lines[start].removeprefix(f"{marker} status").split()
    if len(statuses) != len(argvs) or not all(x.isdigit() for x in statuses):
        raise ParseError(host, what, f"expected {len(argvs)} exit statuses: {lines[start]!r}")

    def expect(i: int, tag: str) -> int:
        if i >= len(lines) or lines[i] != f"{marker} {tag}":
            raise ParseError(host, what, f"missing {tag!r} section (output truncated?)")
        return i + 1

    pos = expect(start + 1, "sizes")
    sizes: dict[str, int] = {}
    while pos < len(lines) and not lines[pos].startswith(marker):
        parts = lines[pos].split()
        if len(parts) == 2 and parts[0].isdigit():
            sizes[parts[1]] = int(parts[0])
        elif lines[pos].strip():
            raise ParseError(host, what, f"bad size line {lines[pos]!r}")
        pos += 1
    pos = expect(pos, "data")
    chunks: list[str] = []
    while pos < len(lines) and not lines[pos].startswith(marker):
        chunks.append(lines[pos])
        pos += 1
    expect(pos, "end")
    try:
        blob = base64.b64decode("".join(chunks), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ParseError(host, what, f"bad base64 data: {e}") from None
    names = [f"{i}.{k}" for i in range(len(argvs)) for k in ("o", "e")]
    if any(n not in sizes for n in names) or sum(sizes[n] for n in names) != len(blob):
        raise ParseError(host, what, "sizes do not match the data")
    results: list[CommandResult] = []
    offset = 0
    for i, argv in enumerate(argvs):
        out = blob[offset : offset + sizes[f"{i}.o"]]
        offset += sizes[f"{i}.o"]
        err = blob[offset : offset + sizes[f"{i}.e"]]
        offset += sizes[f"{i}.e"]
        results.append(
            CommandResult(
                host=host,
                argv=tuple(argv),
                exit_status=int(statuses[i]),
                stdout=out.decode("utf-8", errors="replace"),
                stderr=err.decode("utf-8", errors="replace"),
            )
        )
    return results


# --- connecting --------------------------------------------------------------------------------
