"""pytest plugin: the real lab for tests marked ``lab`` (loaded with ``-p kvmstate.lab.testing``).

Fixtures:

- ``lab`` (session): a running :class:`kvmstate.lab.lab.Lab`, brought up once per session, the
  first time a test asks for it, and torn down at the end of the session, even on failure.
- ``bare_lab`` (function): the same lab, reset to BARE before the test (daemons running; no
  subvolume, export, NFS mount, pool or domain; fstab and exports files as installed).

When the lab cannot come up (not root, packages missing...) the fixtures FAIL with the
reason: lab tests are the real proof and are never skipped.

Importing this module is cheap and needs no root: the lab itself is imported lazily.
Set ``KVMSTATE_LAB_DIR`` to use another lab directory than ``/var/lib/kvmstate-lab``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from kvmstate.lab.lab import Lab

log = logging.getLogger(__name__)

_STARTUP_ERROR = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "lab: runs against the real multi-host lab (root, namespaces, libvirtd, sshd, btrfs, NFS)",
    )


def lab_dir() -> Path:
    from kvmstate.lab.config import DEFAULT_DIR

    return Path(os.environ.get("KVMSTATE_LAB_DIR", str(DEFAULT_DIR)))


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The running lab (session-scoped): up once, down at the end of the session."""
    previous = request.config.stash.get(_STARTUP_ERROR, None)
    if previous is not None:
        pytest.fail(previous, pytrace=False)
    if os.geteuid() != 0:
        msg = "the kvmstate lab needs root: run the lab tests as root (e.g. sudo make test-lab)"
        request.config.stash[_STARTUP_ERROR] = msg
        pytest.fail(msg, pytrace=False)
    from kvmstate.lab.lab import Lab
    from kvmstate.lab.proc import LabError

    the_lab = Lab(lab_dir())
    t0 = time.monotonic()
    try:
        the_lab.up()
    except (LabError, OSError) as exc:
        msg = f"the kvmstate lab could not come up: {exc}"
        request.config.stash[_STARTUP_ERROR] = msg
        try:
            the_lab.down()
        finally:
            pytest.fail(msg, pytrace=False)
    log.info("lab up for the test session in %.1f s", time.monotonic() - t0)
    try:
        yield the_lab
    finally:
        the_lab.down()


@pytest.fixture
def bare_lab(lab: Lab, request: pytest.FixtureRequest) -> Lab:
    """The lab, reset to BARE before this test."""
    if request.node.get_closest_marker("lab") is None:
        pytest.fail("tests using the lab must be marked @pytest.mark.lab", pytrace=False)
    lab.reset()  # also brings it back up if a test took it down
    return lab
