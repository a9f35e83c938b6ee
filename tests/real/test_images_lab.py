"""Issue 16 "volumes from somewhere" on the real lab: a template image put in the shared pool
three ways (a file on the storage host, copied into the export the KVM hosts mount; an upload
from the control machine through libvirt's stream, with progress; a full clone), linked clones
grown past their base; a wrong sha256 and a URL that answers 404 fail naming the volume and
leave no volume; a changed source keeps the data byte-identical. ``plan`` is empty after each
converging step.

Written for the lab and NOT run by its author (helpers do not use the lab); the lead runs it.
The template is a qcow2 made with qemu-img and qemu-io on the storage host (a data pattern
in it, so a copy is more than a header); booting guests from these disks is the domain work's
lab test.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from labkit import LAB_SPEC, cli, variant

from kvmstate.lab.lab import Lab

pytestmark = pytest.mark.lab

TEMPLATES = "/srv/templates"
EXPORT = "/srv/images"  # the storage host's export, mounted by kvm-1/2 as pool `images`
POOL = "/var/lib/libvirt/images"
HTTP_PORT = 8716


def _sha(lab: Lab, host: str, path: str) -> str:
    return lab.run(host, ["sha256sum", "--", path]).stdout.split()[0]


def _volumes(lab: Lab, host: str = "kvm-1") -> set[str]:
    out = lab.run(host, ["virsh", "-q", "vol-list", "images"]).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _with_volumes(tmp_path: Path, name: str, volumes: str) -> Path:
    """The lab spec with ``volumes`` (YAML, indented) added to its volumes."""
    return variant(tmp_path, name, lambda t: t.replace("\nvolumes:\n", "\nvolumes:\n" + volumes))


@pytest.fixture
def template(bare_lab: Lab, tmp_path: Path) -> Iterator[tuple[Lab, Path, str]]:
    """A 64 MiB qcow2 template on the storage host (and a copy on the control machine); the
    lab spec converged first. Yields (lab, local copy, sha256)."""
    lab = bare_lab
    r = cli("apply", LAB_SPEC, "--auto-approve")
    assert r.returncode == 0, r.stdout + r.stderr
    lab.run("storage", ["mkdir", "-p", "--", TEMPLATES])
    for name, pattern in (("tmpl.qcow2", "0x5a"), ("other.qcow2", "0xa5")):
        path = f"{TEMPLATES}/{name}"
        lab.run("storage", ["qemu-img", "create", "-q", "-f", "qcow2", path, "64M"])
        lab.run("storage", ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} 0 4M", path])
    data = base64.b64decode(lab.run("storage", ["base64", "-w0", f"{TEMPLATES}/tmpl.qcow2"]).stdout)
    local = tmp_path / "tmpl.qcow2"
    local.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    assert sha == _sha(lab, "storage", f"{TEMPLATES}/tmpl.qcow2")
    yield lab, local, sha
    lab.run("storage", ["rm", "-rf", "--", TEMPLATES])


THREE_WAYS = """  from-file.qcow2:
    pool: images
    file: {{host: storage, path: {templates}/tmpl.qcow2}}
    sha256: '{sha}'
  from-upload.qcow2:
    pool: images
    upload: {local}
    sha256: '{sha}'
  from-clone.qcow2:
    pool: images
    clone: from-file.qcow2
  web-1.qcow2:
    pool: images
    backing: from-file.qcow2
    capacity: 256MiB
  web-2.qcow2:
    pool: images
    backing: from-file.qcow2
    capacity: 256MiB
"""


def test_template_in_the_shared_pool_three_ways_and_linked_clones(
    template: tuple[Lab, Path, str], tmp_path: Path
) -> None:
    lab, local, sha = template
    spec = _with_volumes(
        tmp_path, "three-ways", THREE_WAYS.format(templates=TEMPLATES, sha=sha, local=local)
    )
    r = cli("plan", spec)
    assert r.returncode == 2, r.stdout + r.stderr
    r = cli("apply", spec, "--auto-approve", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    progress = [e for e in events if e.get("event") == "volume-progress"]
    assert progress and progress[-1]["volume"] == "from-upload.qcow2"
    assert progress[-1]["sent"] == progress[-1]["total"] == local.stat().st_size

    r = cli("plan", spec)
    assert r.returncode == 0, r.stdout + r.stderr
    # the copy was made on the storage host, into the exported directory; the upload and the
    # clone landed in the same shared pool, visible from both KVM hosts
    assert _sha(lab, "storage", f"{EXPORT}/from-file.qcow2") == sha
    assert _sha(lab, "storage", f"{EXPORT}/from-upload.qcow2") == sha
    for h in ("kvm-1", "kvm-2"):
        assert {"from-file.qcow2", "from-upload.qcow2", "from-clone.qcow2"} <= _volumes(lab, h)
    compare = lab.run(
        "kvm-1", ["qemu-img", "compare", f"{POOL}/from-file.qcow2", f"{POOL}/from-clone.qcow2"]
    )
    assert "Images are identical" in compare.stdout
    for web in ("web-1.qcow2", "web-2.qcow2"):
        info = json.loads(
            lab.run("kvm-1", ["qemu-img", "info", "--output=json", f"{POOL}/{web}"]).stdout
        )
        assert info["virtual-size"] == 256 * 1024**2  # grown past the 64 MiB base
        assert info["backing-filename"] == f"{POOL}/from-file.qcow2"
    rec = json.loads(
        lab.run("kvm-1", ["cat", "/var/lib/kvmstate/volumes/images/from-file.qcow2.json"]).stdout
    )
    assert rec["source"] == f"file storage:{TEMPLATES}/tmpl.qcow2" and rec["sha256"] == sha
    assert (
        lab.run(
            "kvm-1", ["stat", "-c", "%a", "/var/lib/kvmstate/volumes/images/from-file.qcow2.json"]
        ).stdout.strip()
        == "600"
    )

    # a base with linked clones is never deleted under them: refused, naming the clones
    gone = variant(
        tmp_path,
        "base-gone",
        lambda t: (
            t.replace(
                "    file: {host: storage, path: /srv/templates/tmpl.qcow2}\n",
                "    file: {host: storage, path: /srv/templates/tmpl.qcow2}\n"
                "    state: absent\n    force_destroy: true\n",
            )
            .replace(
                "  web-1.qcow2:\n    pool: images\n    backing: from-file.qcow2\n",
                "  web-1.qcow2:\n    pool: images\n    clone: from-upload.qcow2\n",
            )
            .replace(
                "  web-2.qcow2:\n    pool: images\n    backing: from-file.qcow2\n",
                "  web-2.qcow2:\n    pool: images\n    clone: from-upload.qcow2\n",
            )
            .replace(
                "  from-clone.qcow2:\n    pool: images\n    clone: from-file.qcow2\n",
                "  from-clone.qcow2:\n    pool: images\n    clone: from-upload.qcow2\n",
            )
        ),
        spec,
    )
    r = cli("plan", gone, "--allow-destroy")
    assert "base of linked clones web-1.qcow2, web-2.qcow2" in r.stdout + r.stderr
    assert _sha(lab, "storage", f"{EXPORT}/from-file.qcow2") == sha


def test_changing_a_source_keeps_the_data_byte_identical(
    template: tuple[Lab, Path, str], tmp_path: Path
) -> None:
    lab, _local, sha = template
    src = f"{{host: storage, path: {TEMPLATES}/tmpl.qcow2}}"
    one = f"  img.qcow2:\n    pool: images\n    file: {src}\n"
    spec = _with_volumes(tmp_path, "one", one)
    assert cli("apply", spec, "--auto-approve").returncode == 0
    assert _sha(lab, "storage", f"{EXPORT}/img.qcow2") == sha
    moved = variant(tmp_path, "moved", lambda t: t.replace("tmpl.qcow2}", "other.qcow2}"), spec)
    r = cli("plan", moved, "-v")
    assert r.returncode == 0, r.stdout + r.stderr  # nothing to do: the data is kept
    assert "data kept" in r.stdout
    r = cli("apply", moved, "--auto-approve")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _sha(lab, "storage", f"{EXPORT}/img.qcow2") == sha  # byte-identical
    # replace: true + force_destroy + --allow-destroy re-images it from the new source
    replaced = variant(
        tmp_path,
        "replaced",
        lambda t: t.replace(
            "other.qcow2}\n", "other.qcow2}\n    replace: true\n    force_destroy: true\n"
        ),
        moved,
    )
    r = cli("apply", replaced, "--auto-approve")
    assert r.returncode != 0 and "replacing needs --allow-destroy" in r.stdout + r.stderr
    assert _sha(lab, "storage", f"{EXPORT}/img.qcow2") == sha
    r = cli("apply", replaced, "--auto-approve", "--allow-destroy")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _sha(lab, "storage", f"{EXPORT}/img.qcow2") == _sha(
        lab, "storage", f"{TEMPLATES}/other.qcow2"
    )
    assert cli("plan", replaced).returncode == 0


@pytest.fixture
def http_404(template: tuple[Lab, Path, str]) -> Iterator[str]:
    """A local HTTP server inside the storage host's namespace, serving /srv/templates (so
    anything else answers 404); stopped by its PID."""
    lab = template[0]
    pid = lab.run(
        "storage",
        [
            "sh",
            "-c",
            f"nohup python3 -m http.server {HTTP_PORT} --bind 10.77.0.10 --directory "
            f"{TEMPLATES} >/dev/null 2>&1 & echo $!",
        ],
    ).stdout.strip()
    probe = f"import socket; socket.create_connection(('10.77.0.10', {HTTP_PORT}), 1)"
    wait = f'for i in $(seq 50); do python3 -c "{probe}" && exit 0; sleep 0.1; done; exit 1'
    lab.run("storage", ["sh", "-c", wait])
    try:
        yield f"http://10.77.0.10:{HTTP_PORT}"
    finally:
        lab.run("storage", ["kill", pid], check=False)


@pytest.mark.parametrize("case", ["wrong-sha256", "url-404"])
def test_a_failed_image_names_the_volume_and_leaves_no_volume(
    template: tuple[Lab, Path, str], http_404: str, tmp_path: Path, case: str
) -> None:
    lab, local, _sha256 = template
    if case == "wrong-sha256":
        vol = f"  bad.qcow2:\n    pool: images\n    upload: {local}\n    sha256: '{'0' * 64}'\n"
        why = "sha256 of"
    else:
        vol = f"  bad.qcow2:\n    pool: images\n    url: {http_404}/missing.qcow2\n"
        why = "answered 404"
    spec = _with_volumes(tmp_path, case, vol)
    r = cli("apply", spec, "--auto-approve")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "volume bad.qcow2" in r.stdout + r.stderr and why in r.stdout + r.stderr
    assert "bad.qcow2" not in _volumes(lab)
    assert lab.run("storage", ["test", "-e", f"{EXPORT}/bad.qcow2"], check=False).returncode != 0
    record = "/var/lib/kvmstate/volumes/images/bad.qcow2.json"
    exists = lab.run("kvm-1", ["test", "-e", record], check=False)
    assert exists.returncode != 0
