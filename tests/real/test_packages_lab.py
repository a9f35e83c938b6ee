"""hosts.NAME.packages on the real lab: `kvmstate apply` installs a Debian package with the
host's own apt and dpkg, and the next plan is empty.

The package is built here (`dpkg-deb --build`) and served from a local file repository. apt on
kvm-2 is pointed at that repository only, with its own lists and cache directories, through a
config file in kvm-2's private /etc: nothing leaves the machine, and the machine's own apt lists
are not touched. kvm-2's lists start empty, so apply also goes through apt's "Unable to locate
package" -> `apt-get update` -> install path. The package is purged and the files removed at
the end.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from labkit import LAB_SPEC, cli, converge, plan, variant

from kvmstate.lab.lab import Lab

pytestmark = pytest.mark.lab

PKG = "kvmstate-lab-probe"
HOST = "kvm-2"
APT_CONF = "/etc/apt/apt.conf.d/99kvmstate-lab-test"
MARKER = f"/usr/share/{PKG}/marker"


def _build_deb(where: Path) -> Path:
    root = where / "pkgroot"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr/share" / PKG).mkdir(parents=True)
    (root / "usr/share" / PKG / "marker").write_text("installed by kvmstate's lab test\n")
    (root / "DEBIAN/control").write_text(
        f"Package: {PKG}\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: kvmstate tests <root@localhost>\n"
        "Description: marker package for kvmstate's lab test\n"
    )
    deb = where / "repo" / f"{PKG}_1.0_all.deb"
    deb.parent.mkdir()
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)], check=True)
    return deb


def _index(deb: Path) -> None:
    """The repository's Packages file: the control fields plus where and what the file is."""
    control = subprocess.run(
        ["dpkg-deb", "--field", str(deb)], check=True, capture_output=True, text=True
    ).stdout.rstrip("\n")
    data = deb.read_bytes()
    (deb.parent / "Packages").write_text(
        f"{control}\nFilename: ./{deb.name}\nSize: {len(data)}\n"
        f"SHA256: {hashlib.sha256(data).hexdigest()}\n\n"
    )


@pytest.fixture
def local_repo(lab: Lab) -> Iterator[Path]:
    base = lab.dir / "apt-test"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir()
    try:
        _index(_build_deb(base))
        for d in ("lists/partial", "cache/archives/partial", "sources.d"):
            (base / d).mkdir(parents=True)
        (base / "sources.list").write_text(f"deb [trusted=yes] file:{base}/repo ./\n")
        conf = (
            f'Dir::Etc::SourceList "{base}/sources.list";\n'
            f'Dir::Etc::SourceParts "{base}/sources.d";\n'
            f'Dir::State::Lists "{base}/lists";\n'
            f'Dir::Cache "{base}/cache";\n'
        )
        lab.run(HOST, ["sh", "-c", 'cat > "$0"', APT_CONF], input=conf)
        yield base
    finally:
        lab.run(HOST, ["rm", "-f", "--", APT_CONF], check=False)
        subprocess.run(["dpkg", "--purge", PKG], check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _installed(lab: Lab, host: str) -> bool:
    r = lab.run(host, ["dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "--", PKG], check=False)
    return r.returncode == 0 and r.stdout.startswith("ii")


def test_apply_installs_the_hosts_packages(lab: Lab, local_repo: Path, tmp_path: Path) -> None:
    converge(LAB_SPEC)
    assert not _installed(lab, HOST)
    spec = variant(
        tmp_path,
        "packages",
        lambda t: t.replace(
            "  kvm-2: {address: 10.77.0.12}\n",
            f"  kvm-2: {{address: 10.77.0.12, packages: [qemu-utils, {PKG}]}}\n",
        ),
    )
    before = plan(spec)
    [change] = [c for c in before.changes if not c.is_noop]
    assert (str(change.id), change.reason) == (f"packages:{HOST}:{HOST}", f"apt-get install {PKG}")

    r = cli("apply", spec, "--auto-approve")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _installed(lab, HOST)
    assert lab.run(HOST, ["cat", MARKER]).stdout == "installed by kvmstate's lab test\n"
    # apt found nothing in the empty lists first, updated them from the local repository only
    assert any("_Packages" in p.name for p in (local_repo / "lists").iterdir())
    assert "~ packages:kvm-2:kvm-2" in r.stdout and "Apply complete: 1 changed" in r.stdout

    after = plan(spec)
    assert not after.has_changes and not after.errors
    noop = {str(c.id): c.reason for c in after.changes}
    assert noop[f"packages:{HOST}:{HOST}"] == f"installed: qemu-utils {PKG}"
    r = cli("plan", spec)
    assert r.returncode == 0 and "No changes" in r.stdout, r.stdout + r.stderr
