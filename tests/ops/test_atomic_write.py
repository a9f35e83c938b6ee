"""write_file on a real POSIX shell: atomic, keeps mode/owner, and a transfer cut short (the
sender killed mid-write) leaves the old file untouched."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from kvmstate.errors import TransportError
from kvmstate.transport.base import ATOMIC_WRITE_SCRIPT, CommandResult, read_file, write_file


class LocalShell:
    host = "localhost"

    def __init__(self, cwd: Path | None = None) -> None:
        self.cwd = cwd

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
        timeout: float | None = None,
    ) -> CommandResult:
        p = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, check=False, cwd=self.cwd
        )
        res = CommandResult(self.host, tuple(argv), p.returncode, p.stdout, p.stderr)
        return res.check() if check else res

    async def run_many(self, argvs: Sequence[Sequence[str]]) -> list[CommandResult]:
        return [await self.run(a, check=False) for a in argvs]


def test_write_replaces_atomically_and_keeps_the_mode(tmp_path: Path) -> None:
    target = tmp_path / "exports"
    target.write_text("old\n")
    target.chmod(0o600)
    asyncio.run(write_file(LocalShell(), str(target), "new line\nsecond\n"))
    assert target.read_text() == "new line\nsecond\n"
    assert (target.stat().st_mode & 0o777) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["exports"]  # no temp file left
    assert asyncio.run(read_file(LocalShell(), str(target))) == "new line\nsecond\n"
    assert asyncio.run(read_file(LocalShell(), str(tmp_path / "missing"))) is None


def test_new_file_gets_the_requested_mode(tmp_path: Path) -> None:
    target = tmp_path / "new"
    asyncio.run(write_file(LocalShell(), str(target), "x\n", mode="0640"))
    assert (target.stat().st_mode & 0o777) == 0o640


def test_a_cut_transfer_leaves_the_old_file_untouched(tmp_path: Path) -> None:
    target = tmp_path / "fstab"
    target.write_text("UUID=1 / ext4 defaults 0 1\n")
    full = "UUID=1 / ext4 defaults 0 1\nserver:/x /mnt nfs vers=4 0 0\n"
    cut = full[:20]  # what arrived before the sender died
    p = subprocess.run(
        ["sh", "-c", ATOMIC_WRITE_SCRIPT, "kvmstate-write", str(target), "0644", str(len(full))],
        input=cut,
        capture_output=True,
        text=True,
        check=False,
    )
    assert p.returncode == 1
    assert "left it unchanged" in p.stderr
    assert target.read_text() == "UUID=1 / ext4 defaults 0 1\n"
    assert sorted(os.listdir(tmp_path)) == ["fstab"]


def test_paths_are_arguments_never_script_text(tmp_path: Path) -> None:
    evil = tmp_path / "x; touch pwned1; $(touch pwned2); `touch pwned3`\ntouch pwned4"
    asyncio.run(write_file(LocalShell(cwd=tmp_path), str(evil), "data\n"))
    assert evil.read_text() == "data\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [evil.name]


def test_write_into_a_missing_directory_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="localhost"):
        asyncio.run(write_file(LocalShell(), str(tmp_path / "nope" / "file"), "x\n"))
