"""Volumes from an upload and from a URL against a REAL libvirtd (the private one of
``kvmstate.lab.private_libvirtd``: its own mount and network namespaces, not the lab), reached
the way kvmstate reaches a host: libvirt over a Unix socket forwarded through the host's one SSH
connection (an in-process asyncssh server). The upload stream (virStorageVolUpload + virStream),
which libvirt's test driver lacks, is proven here; so are a linked clone grown past its base and
a full clone. The shell side (the provenance record) is a fake host: no file of this machine's
/var/lib/kvmstate is touched.

Skipped unless root with ``unshare``, ``libvirtd`` and ``qemu-img``.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakelab import apply_change
from transport.sshd_server import LocalSSHD

from kvmstate import virt
from kvmstate.errors import KvmstateError
from kvmstate.lab.private_libvirtd import private_libvirtd, unavailable
from kvmstate.model import Event, VolumeProgress
from kvmstate.resources.base import Options, RunContext
from kvmstate.resources.volume import VolumeResource, record_path
from kvmstate.spec import Spec
from kvmstate.testing.fake import FakeCluster, FakeShell
from kvmstate.transport.libvirt import LibvirtOverSSH
from kvmstate.transport.real import RealTransports

pytestmark = pytest.mark.skipif(
    bool(unavailable()) or not shutil.which("qemu-img"),
    reason=unavailable() or "needs qemu-img",
)

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with private_libvirtd(tmp_path_factory.mktemp("libvirtd")) as (sock, _pid):
        yield Path(sock)


@pytest.fixture
def sshd(tmp_path: Path) -> LocalSSHD:
    (tmp_path / "sshd").mkdir()
    return LocalSSHD(tmp_path / "sshd")


@pytest.fixture
def image(tmp_path: Path) -> bytes:
    path = tmp_path / "template.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), "8M"], check=True, timeout=60
    )
    # some data in the image, so that a copy is more than a header
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return path.read_bytes()


@pytest.fixture
def http_server(image: bytes) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/template.qcow2":
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class Mixed:
    """libvirt from the real transports (over SSH), the shell from a fake host."""

    def __init__(self, fake: FakeCluster, real: RealTransports) -> None:
        self.fake, self.real = fake, real

    def shell(self, host: str) -> FakeShell:
        return self.fake.shell(host)

    def libvirt(self, host: str) -> LibvirtOverSSH:
        return self.real.libvirt(host)

    async def connect_all(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _spec(sshd: LocalSSHD, pool: Path, volumes: dict[str, Any]) -> Spec:
    data = sshd.spec().model_dump(mode="json", exclude_none=True)
    data["pools"] = {"p": {"path": str(pool), "hosts": ["h1"]}}
    data["volumes"] = volumes
    return Spec.model_validate(data)


def test_upload_url_and_clones_on_a_real_libvirtd(
    sshd: LocalSSHD, libvirtd: Path, tmp_path: Path, image: bytes, http_server: str
) -> None:
    local = tmp_path / "upload.qcow2"
    local.write_bytes(image)
    sha = hashlib.sha256(image).hexdigest()
    pool = tmp_path / "pool"
    pool.mkdir()
    events: list[Event] = []
    good = {
        "up.qcow2": {"pool": "p", "upload": str(local), "sha256": sha},
        "web.qcow2": {"pool": "p", "url": f"{http_server}/template.qcow2", "sha256": sha},
        "copy.qcow2": {"pool": "p", "clone": "up.qcow2", "capacity": "16MiB"},
        "ov.qcow2": {"pool": "p", "backing": "up.qcow2", "capacity": "32MiB"},
    }
    bad = {
        "badsum.qcow2": ({"pool": "p", "upload": str(local), "sha256": "0" * 64}, "sha256 of"),
        "gone.qcow2": ({"pool": "p", "url": f"{http_server}/gone.qcow2"}, "answered 404"),
    }
    volumes = {**good, **{n: v for n, (v, _) in bad.items()}}
    fake = FakeCluster({"h1": "127.0.0.1"})

    async def main() -> dict[str, Any]:
        await sshd.start()
        try:
            return await with_spec(_spec(sshd, pool, volumes))
        finally:
            await sshd.stop()

    async def with_spec(spec: Spec) -> dict[str, Any]:
        async with RealTransports(spec, libvirt_socket=str(libvirtd)) as real:
            mixed: Any = Mixed(fake, real)
            ctx = RunContext(spec, mixed, Options(), events.append)
            lv = real.libvirt("h1")
            conn = await lv.connect()
            await lv.run(virt.define_pool, conn, "p", str(pool))
            await lv.run(virt.start_pool, conn, "p")
            try:
                for name in good:
                    res = VolumeResource(spec, name)
                    change = res.diff(await res.observe(ctx))
                    after = res.diff(await apply_change(res, change, ctx))
                    assert after.is_noop, (name, after)
                for name, (_, why) in bad.items():
                    res = VolumeResource(spec, name)
                    change = res.diff(await res.observe(ctx))
                    with pytest.raises(KvmstateError, match=f"volume {name}: .*{why}"):
                        await apply_change(res, change, ctx)
                    assert await lv.run(virt.observe_volume, conn, "p", name) is None
                    assert not (pool / name).exists()
                states = {n: await lv.run(virt.observe_volume, conn, "p", n) for n in good}
                data = {n: (pool / n).read_bytes() for n in ("up.qcow2", "web.qcow2")}
            finally:
                for name in [*reversed(good), *bad]:
                    await lv.run(virt.delete_volume, conn, "p", name)
                await lv.run(virt.undefine_pool, conn, "p")
            return {"states": states, "data": data, "stats": real.stats()}

    out = asyncio.run(main())
    states = out["states"]
    # the upload and the URL: byte for byte, probed as qcow2 of the image's virtual size
    for name in ("up.qcow2", "web.qcow2"):
        assert (states[name].format, states[name].capacity) == ("qcow2", 8 * MiB)
        rec = json.loads(fake["h1"].read(record_path("p", name)) or "")
        assert rec["sha256"] == sha
        assert out["data"][name] == image
    assert states["copy.qcow2"].capacity == 16 * MiB  # a full clone, grown
    ov = states["ov.qcow2"]
    assert (ov.capacity, ov.backing) == (32 * MiB, str(pool / "up.qcow2"))  # linked, grown
    progress = [e for e in events if isinstance(e, VolumeProgress)]
    assert {e.volume for e in progress} == {"up.qcow2", "web.qcow2", "badsum.qcow2"}
    assert progress[-1].sent == progress[-1].total == len(image)
    # one SSH connection, one forwarded socket: the upload rode libvirt's own connection
    assert out["stats"]["h1"]["connections"] == 1
    assert sshd.connections == 1
    assert sshd.unix_forwards == [str(libvirtd)]
