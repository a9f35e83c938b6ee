"""Only kvmstate's own words reach a terminal or a cron mail (issue 14).

asyncssh touches cryptography's DSA names at import, and cryptography 48+ answers with a
``CryptographyDeprecationWarning`` per touch. ``kvmstate.transport.sshlib`` ignores exactly that
category from asyncssh's modules. Each check runs in a new interpreter with no
``PYTHONWARNINGS``, as cron starts kvmstate."""

from __future__ import annotations

import os
import subprocess
import sys

ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60
    )


def test_importing_the_ssh_transport_prints_nothing() -> None:
    r = run("import kvmstate.transport.ssh, kvmstate.transport.real, kvmstate.cli")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_asyncssh_imported_directly_is_still_noisy_so_the_filter_is_what_silences_it() -> None:
    """Guards the test above: with the cryptography this lock installs, a bare import of
    asyncssh does warn (if a release stops warning, this shows the filter is moot)."""
    import cryptography

    major = int(cryptography.__version__.split(".")[0])
    r = run("import asyncssh")
    if major >= 48:
        assert "CryptographyDeprecationWarning" in r.stderr
    r = run("import kvmstate.transport.sshlib; import asyncssh")
    assert r.stderr == ""


def test_kvmstate_own_warnings_and_other_modules_deprecations_still_show() -> None:
    r = run(
        "import warnings, kvmstate.transport.sshlib\n"
        "from cryptography.utils import CryptographyDeprecationWarning\n"
        "warnings.warn('kvmstate says this', UserWarning)\n"
        "warnings.warn('not from asyncssh', CryptographyDeprecationWarning)\n"
    )
    assert r.returncode == 0
    assert "UserWarning: kvmstate says this" in r.stderr
    assert "CryptographyDeprecationWarning: not from asyncssh" in r.stderr


def test_no_module_of_kvmstate_imports_asyncssh_but_sshlib() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "kvmstate"
    offenders = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if p.name != "sshlib.py"
        and any(
            line.strip().startswith(("import asyncssh", "from asyncssh"))
            for line in p.read_text().splitlines()
        )
    ]
    assert offenders == []
