"""Fixtures of the transport tests: a real in-process SSH server (see ``sshd_server.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sshd_server import LocalSSHD


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[LocalSSHD]:
    yield LocalSSHD(tmp_path)
