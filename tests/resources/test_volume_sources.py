"""Volumes from somewhere, on the fake cluster: a file on a host (the storage host that exports
the pool, or a pool host), an upload (the fake stands in for libvirt's stream at the
``virt.upload_volume`` seam; the real stream is in ``test_volume_daemon.py``), an http URL
served by a real local HTTP server, a full clone, a linked clone; sha256; imaged once; replace;
a base with linked clones; import of a backing chain; the spec's checks; the progress bar."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakelab import LAB_SPEC, apply_change, converge, converge_upto, plan, prepare, run
from rich.console import Console

from kvmstate import importer, virt
from kvmstate.cli.progress import EventPrinter
from kvmstate.engine import Engine
from kvmstate.errors import KvmstateError, RefusedError, SpecError
from kvmstate.loader import parse_spec_text
from kvmstate.model import Action, Change, Event, VolumeProgress
from kvmstate.resources import KINDS, REGISTRY
from kvmstate.resources.base import Options, RunContext
from kvmstate.resources.volume import VolumeImage, VolumeResource, record_path
from kvmstate.spec import Spec
from kvmstate.testing.fake import FakeCluster, FakeFile, fake_qcow2

MiB = 1024 * 1024
TEMPLATE = fake_qcow2(32 * MiB, b"template bytes " * 100)
OTHER = fake_qcow2(32 * MiB, b"another template " * 100)
SHA = hashlib.sha256(TEMPLATE).hexdigest()
EXPORTED = "/srv/images"  # the storage host's export, mounted on kvm-1/2 as the pool
POOL = "/var/lib/libvirt/images"
RECORD = record_path("images", "base.qcow2")


def spec_with(volumes: str, *, extra_host: bool = False) -> Spec:
    """The lab spec without its domain, with ``volumes`` (YAML, indented) as its volumes."""
    text = LAB_SPEC[: LAB_SPEC.index("\nvolumes:\n")] + "\nvolumes:\n" + volumes
    if extra_host:
        text = text.replace("hosts:\n", "hosts:\n  other: {address: 10.77.0.30}\n")
    return REGISTRY.parse(text).spec


def cluster_for(spec: Spec) -> FakeCluster:
    c = FakeCluster(spec)
    prepare(c)
    c["storage"].files["/srv/templates/base.qcow2"] = FakeFile(data=TEMPLATE, size=len(TEMPLATE))
    c["storage"].files["/srv/templates/other.qcow2"] = FakeFile(data=OTHER, size=len(OTHER))
    c["kvm-2"].files["/root/base.qcow2"] = FakeFile(data=TEMPLATE, size=len(TEMPLATE))
    return c


@pytest.fixture
def events() -> list[Event]:
    return []


def setup(
    volumes: str, events: list[Event] | None = None, **kw: bool
) -> tuple[Spec, FakeCluster, RunContext]:
    spec = spec_with(volumes, **kw)
    cluster = cluster_for(spec)
    ctx = RunContext(spec, cluster, Options(), events.append if events is not None else None)
    run(converge_upto(ctx, "pool"))
    return spec, cluster, ctx


def vol(spec: Spec, name: str = "base.qcow2") -> VolumeResource:
    return next(r for r in VolumeResource.expand(spec) if r.name == name)


def data_of(cluster: FakeCluster, path: str) -> bytes | None:
    host, p = cluster["kvm-1"].resolve(path)
    f = host.files.get(p)
    return None if f is None else f.data


def assert_no_volume(cluster: FakeCluster, name: str = "base.qcow2") -> None:
    assert virt.observe_volume(cluster["kvm-1"].conn(), "images", name) is None
    assert f"{EXPORTED}/{name}" not in cluster["storage"].files
    assert cluster["kvm-1"].read(record_path("images", name)) is None


FROM_STORAGE = """  base.qcow2:
    pool: images
    file: {host: storage, path: /srv/templates/base.qcow2}
"""


# --- a file on a host ----------------------------------------------------------------------------


def test_file_on_the_storage_host_is_copied_into_its_export() -> None:
    spec, cluster, ctx = setup(FROM_STORAGE + f"    sha256: {SHA}\n")
    res = vol(spec)
    change = run(plan(res, ctx))
    assert change.action is Action.CREATE and change.blocked is None
    assert change.data == VolumeImage(
        "file", "file storage:/srv/templates/base.qcow2", "storage", f"{EXPORTED}/base.qcow2"
    )
    assert [(d.field, d.after) for d in change.diffs][:1] == [
        ("source", "file storage:/srv/templates/base.qcow2")
    ]
    assert run(converge(res, ctx)).is_noop
    # copied on the storage host into the exported directory, byte for byte
    assert ("cp", "--sparse=always", "--no-clobber", "--", "/srv/templates/base.qcow2",
            f"{EXPORTED}/base.qcow2") in cluster["storage"].history  # fmt: skip
    assert data_of(cluster, f"{POOL}/base.qcow2") == TEMPLATE
    st = virt.observe_volume(cluster["kvm-1"].conn(), "images", "base.qcow2")
    assert st is not None and (st.format, st.capacity) == ("qcow2", 32 * MiB)
    assert virt.volume_visible(cluster["kvm-2"].conn(), "images", "base.qcow2")
    rec = json.loads(cluster["kvm-1"].read(RECORD) or "")
    assert (rec["source"], rec["sha256"]) == ("file storage:/srv/templates/base.qcow2", SHA)
    assert cluster["kvm-1"].files[RECORD].mode == "0600"
    noop = run(plan(res, ctx))
    assert noop.reason.endswith("imaged from file storage:/srv/templates/base.qcow2")


def test_file_on_a_pool_host_is_copied_there() -> None:
    spec, cluster, ctx = setup(
        "  base.qcow2:\n    pool: images\n    file: {host: kvm-2, path: /root/base.qcow2}\n"
    )
    assert run(converge(vol(spec), ctx)).is_noop
    assert ("cp", "--sparse=always", "--no-clobber", "--", "/root/base.qcow2",
            f"{POOL}/base.qcow2") in cluster["kvm-2"].history  # fmt: skip
    assert data_of(cluster, f"{POOL}/base.qcow2") == TEMPLATE


def test_file_on_an_unrelated_host_is_refused_in_the_plan() -> None:
    spec, _, ctx = setup(
        "  base.qcow2:\n    pool: images\n    file: {host: other, path: /srv/base.qcow2}\n",
        extra_host=True,
    )
    change = run(plan(vol(spec), ctx))
    assert change.action is Action.CREATE
    assert change.blocked is not None
    assert "volume base.qcow2: the file is on other, which is neither a host of pool images" in (
        change.blocked
    )


def test_a_wrong_sha256_fails_naming_the_volume_and_leaves_nothing() -> None:
    spec, cluster, ctx = setup(FROM_STORAGE + f"    sha256: '{'0' * 64}'\n")
    with pytest.raises(KvmstateError, match=r"volume base.qcow2: sha256 of storage:/srv/templ"):
        run(converge(vol(spec), ctx))
    assert_no_volume(cluster)
    assert not virt.volume_visible(cluster["kvm-2"].conn(), "images", "base.qcow2")


def test_a_file_already_in_the_way_is_not_overwritten() -> None:
    spec, cluster, ctx = setup(FROM_STORAGE)
    cluster["storage"].files[f"{EXPORTED}/base.qcow2"] = FakeFile(data=b"precious", size=8)
    cluster["kvm-1"].conn().storagePoolLookupByName("images").refresh(0)  # stale libvirt view
    with pytest.raises(RefusedError, match="does not overwrite it"):
        run(converge(vol(spec), ctx))
    assert cluster["storage"].files[f"{EXPORTED}/base.qcow2"].data == b"precious"


# --- imaged once --------------------------------------------------------------------------------


def test_a_changed_source_keeps_the_data_and_says_so() -> None:
    spec, cluster, ctx = setup(FROM_STORAGE)
    assert run(converge(vol(spec), ctx)).is_noop
    moved = spec_with(FROM_STORAGE.replace("templates/base", "templates/other"))
    mctx = RunContext(moved, cluster, Options(allow_destroy=True))
    change = run(converge(vol(moved), mctx))
    assert change.is_noop
    assert "source is file storage:/srv/templates/other.qcow2" in change.reason
    assert "it was imaged from file storage:/srv/templates/base.qcow2: data kept" in change.reason
    assert "replace: true" in change.reason
    assert [(d.field, d.before, d.after) for d in change.diffs] == [
        (
            "source",
            "file storage:/srv/templates/base.qcow2",
            "file storage:/srv/templates/other.qcow2",
        )
    ]
    assert data_of(cluster, f"{POOL}/base.qcow2") == TEMPLATE  # byte-identical
    # a whole plan of it: nothing pending, exit 0
    whole = run(Engine(REGISTRY.graph(moved), mctx).plan())
    assert not whole.has_changes


def test_a_volume_without_a_record_is_source_unknown_and_kept() -> None:
    spec, cluster, ctx = setup(FROM_STORAGE)
    assert run(converge(vol(spec), ctx)).is_noop
    del cluster["kvm-1"].files[RECORD]
    change = run(converge(vol(spec), ctx))
    assert change.is_noop and "source unknown" in change.reason and "data kept" in change.reason
    assert data_of(cluster, f"{POOL}/base.qcow2") == TEMPLATE


@pytest.mark.parametrize(
    ("extra", "allow", "blocked"),
    [
        ("", True, "replacing it needs force_destroy: true"),
        ("    force_destroy: true\n", False, "replacing needs --allow-destroy"),
        ("    force_destroy: true\n", True, None),
    ],
)
def test_replace_needs_force_destroy_and_allow_destroy(
    extra: str, allow: bool, blocked: str | None
) -> None:
    spec, cluster, ctx = setup(FROM_STORAGE)
    assert run(converge(vol(spec), ctx)).is_noop
    text = FROM_STORAGE.replace("templates/base", "templates/other") + "    replace: true\n"
    moved = spec_with(text + extra)
    mctx = RunContext(moved, cluster, Options(allow_destroy=allow))
    whole = run(Engine(REGISTRY.graph(moved), mctx).plan())
    (change,) = [c for c in whole.changes if c.id.kind == "volume"]
    assert change.action is Action.REPLACE
    assert change.blocked == blocked or (blocked and blocked in (change.blocked or ""))
    report = run(Engine(REGISTRY.graph(moved), mctx).apply(whole))
    if blocked:
        assert not report.converged
        assert data_of(cluster, f"{POOL}/base.qcow2") == TEMPLATE
        return
    assert report.converged, report.as_dict()
    assert data_of(cluster, f"{POOL}/base.qcow2") == OTHER
    rec = json.loads(cluster["kvm-1"].read(RECORD) or "")
    assert rec["source"] == "file storage:/srv/templates/other.qcow2"
    # replace: true left in the spec is harmless: the record matches, nothing to do
    assert not run(Engine(REGISTRY.graph(moved), mctx).plan()).has_changes


# --- upload, through the fake's seam -------------------------------------------------------------


def test_upload_with_progress_and_record(tmp_path: Path, events: list[Event]) -> None:
    image = tmp_path / "base.qcow2"
    image.write_bytes(TEMPLATE)
    spec, cluster, ctx = setup(
        f"  base.qcow2:\n    pool: images\n    upload: {image}\n    sha256: {SHA}\n"
        "    capacity: 48MiB\n",
        events,
    )
    assert run(converge(vol(spec), ctx)).is_noop
    st = virt.observe_volume(cluster["kvm-1"].conn(), "images", "base.qcow2")
    assert st is not None and (st.format, st.capacity) == ("qcow2", 48 * MiB)  # grown
    progress = [e for e in events if isinstance(e, VolumeProgress)]
    assert progress[0] == VolumeProgress("base.qcow2", 0, len(TEMPLATE))
    assert progress[-1] == VolumeProgress("base.qcow2", len(TEMPLATE), len(TEMPLATE))
    assert dict(progress[-1])["event"] == "volume-progress"
    rec = json.loads(cluster["kvm-1"].read(RECORD) or "")
    assert (rec["source"], rec["sha256"]) == (f"upload {image}", SHA)


def test_upload_with_a_wrong_sha256_leaves_no_volume(tmp_path: Path) -> None:
    image = tmp_path / "base.qcow2"
    image.write_bytes(TEMPLATE)
    spec, cluster, ctx = setup(
        f"  base.qcow2:\n    pool: images\n    upload: {image}\n    sha256: {'f' * 64}\n"
    )
    with pytest.raises(KvmstateError, match=f"volume base.qcow2: sha256 of {image} is {SHA}"):
        run(converge(vol(spec), ctx))
    assert_no_volume(cluster)


def test_upload_of_a_missing_file_fails_before_anything_is_made(tmp_path: Path) -> None:
    spec, cluster, ctx = setup(f"  base.qcow2:\n    pool: images\n    upload: {tmp_path}/nope\n")
    with pytest.raises(KvmstateError, match=f"volume base.qcow2: cannot read {tmp_path}/nope"):
        run(converge(vol(spec), ctx))
    assert_no_volume(cluster)


def test_an_image_of_the_wrong_format_is_deleted(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * 4096)
    spec, cluster, ctx = setup(f"  base.qcow2:\n    pool: images\n    upload: {image}\n")
    with pytest.raises(KvmstateError, match="is raw, the spec says qcow2"):
        run(converge(vol(spec), ctx))
    assert_no_volume(cluster)


def test_an_image_larger_than_capacity_is_deleted(tmp_path: Path) -> None:
    image = tmp_path / "base.qcow2"
    image.write_bytes(TEMPLATE)
    spec, cluster, ctx = setup(
        f"  base.qcow2:\n    pool: images\n    upload: {image}\n    capacity: 16MiB\n"
    )
    with pytest.raises(KvmstateError, match="above capacity 16MiB"):
        run(converge(vol(spec), ctx))
    assert_no_volume(cluster)


# --- a URL, from a real HTTP server on 127.0.0.1 -------------------------------------------------


@pytest.fixture
def http_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/base.qcow2":
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(TEMPLATE)))
            self.end_headers()
            self.wfile.write(TEMPLATE)

        def log_message(self, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_url_is_streamed_into_the_volume(http_server: str, events: list[Event]) -> None:
    spec, cluster, ctx = setup(
        f"  base.qcow2:\n    pool: images\n    url: {http_server}/base.qcow2\n    sha256: {SHA}\n",
        events,
    )
    assert run(converge(vol(spec), ctx)).is_noop
    assert data_of(cluster, f"{POOL}/base.qcow2") == TEMPLATE
    assert any(isinstance(e, VolumeProgress) and e.sent == len(TEMPLATE) for e in events)
    rec = json.loads(cluster["kvm-1"].read(RECORD) or "")
    assert rec["source"] == f"url {http_server}/base.qcow2"


def test_a_url_that_answers_404_fails_naming_the_volume(http_server: str) -> None:
    spec, cluster, ctx = setup(f"  base.qcow2:\n    pool: images\n    url: {http_server}/gone\n")
    with pytest.raises(KvmstateError, match=r"volume base.qcow2: http://.*/gone answered 404"):
        run(converge(vol(spec), ctx))
    assert_no_volume(cluster)


# --- clones --------------------------------------------------------------------------------------

CLONES = (
    FROM_STORAGE
    + "  copy.qcow2:\n    pool: images\n    clone: base.qcow2\n    capacity: 40MiB\n"
    + "  web.qcow2:\n    pool: images\n    backing: base.qcow2\n    capacity: 64MiB\n"
)


def test_full_and_linked_clones() -> None:
    spec, cluster, ctx = setup(CLONES)
    base = vol(spec)
    copy, web = vol(spec, "copy.qcow2"), vol(spec, "web.qcow2")
    assert base.id in copy.depends_on() and base.id in web.depends_on()
    for r in (base, copy, web):
        assert run(converge(r, ctx)).is_noop, r.id
    conn = cluster["kvm-1"].conn()
    c = virt.observe_volume(conn, "images", "copy.qcow2")
    assert c is not None and c.capacity == 40 * MiB and c.backing is None
    w = virt.observe_volume(conn, "images", "web.qcow2")
    assert w is not None and (w.capacity, w.backing) == (64 * MiB, f"{POOL}/base.qcow2")
    assert virt.volume_visible(cluster["kvm-2"].conn(), "images", "web.qcow2")
    assert (
        json.loads(cluster["kvm-1"].read(record_path("images", "copy.qcow2")) or "")["source"]
        == "clone base.qcow2"
    )
    assert cluster["kvm-1"].read(record_path("images", "web.qcow2")) is None  # the chain says
    # the whole graph: plan after apply is empty
    assert not run(Engine(REGISTRY.graph(spec), ctx).plan()).has_changes


def test_a_base_with_linked_clones_is_never_changed_under_them() -> None:
    spec, cluster, ctx = setup(CLONES)
    run(Engine(REGISTRY.graph(spec), ctx).apply())
    grown = "/srv/templates/base.qcow2}\n    capacity: 48MiB\n"
    bigger = spec_with(CLONES.replace("/srv/templates/base.qcow2}\n", grown, 1))
    change = run(_plan_one(bigger, cluster, "base.qcow2"))
    assert change.blocked and "base of linked clones web.qcow2: it is not resized" in change.blocked
    replaced = spec_with(
        CLONES.replace("templates/base", "templates/other").replace(
            "/srv/templates/other.qcow2}\n",
            "/srv/templates/other.qcow2}\n    replace: true\n    force_destroy: true\n",
            1,
        )
    )
    change = run(_plan_one(replaced, cluster, "base.qcow2"))
    assert change.action is Action.REPLACE
    assert change.blocked and "base of linked clones web.qcow2" in change.blocked
    # the clone left the spec, the base is to go: the overlay in the pool still holds it
    gone = spec_with(FROM_STORAGE + "    state: absent\n    force_destroy: true\n")
    change = run(_plan_one(gone, cluster, "base.qcow2"))
    assert change.action is Action.DELETE
    assert change.blocked and "base of linked clones web.qcow2" in change.blocked
    with pytest.raises(RefusedError):
        run(apply_change(vol(gone), change, RunContext(gone, cluster, Options())))
    assert data_of(cluster, f"{POOL}/base.qcow2") == TEMPLATE


async def _plan_one(spec: Spec, cluster: FakeCluster, name: str) -> Change:
    return await plan(vol(spec, name), RunContext(spec, cluster, Options(allow_destroy=True)))


def test_import_brings_a_backing_chain_in_as_backing() -> None:
    spec, cluster, ctx = setup(CLONES)
    assert run(Engine(REGISTRY.graph(spec), ctx).apply()).converged
    invs = run(importer.gather(cluster, {h: spec.hosts[h].address for h in spec.hosts}))
    base = {"version": 1, "hosts": {h: {"address": spec.hosts[h].address} for h in spec.hosts}}
    got = importer.build(invs, base)
    vols = got.data["volumes"]
    assert vols["web.qcow2"]["backing"] == "base.qcow2"
    assert "backing" not in vols["copy.qcow2"] and "backing" not in vols["base.qcow2"]
    text = importer.render_yaml(importer.merged(base, got), got.notes, "import")
    imported = parse_spec_text(text, "imported.yaml").spec
    whole = run(Engine(REGISTRY.graph(imported), RunContext(imported, cluster)).plan())
    assert not whole.errors and not whole.has_changes, [c.as_dict() for c in whole.pending]


# --- spec checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("volumes", "message"),
    [
        ("  a.qcow2:\n    pool: images\n    backing: nope.qcow2\n", "unknown volume 'nope.qcow2'"),
        (
            "  a.qcow2:\n    pool: images\n    file: {host: nas, path: /srv/a.qcow2}\n",
            "unknown host 'nas'",
        ),
        ("  a.qcow2:\n    pool: images\n    clone: a.qcow2\n", "cannot be its own base"),
        (
            "  a.qcow2:\n    pool: images\n    clone: b.qcow2\n"
            "  b.qcow2:\n    pool: images\n    clone: a.qcow2\n",
            "in a loop",
        ),
        (
            "  a.qcow2:\n    pool: images\n    capacity: 1GiB\n    state: absent\n"
            "  b.qcow2:\n    pool: images\n    backing: a.qcow2\n",
            "marked absent",
        ),
    ],
)
def test_spec_checks_of_sources(volumes: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        spec_with(volumes)


def test_backing_base_in_another_pool_is_refused() -> None:
    text = LAB_SPEC[: LAB_SPEC.index("domains:")]
    text = text.replace(
        "\nvolumes:\n",
        "\n  other:\n    path: /var/lib/libvirt/other\n    hosts: [kvm-1]\nvolumes:\n"
        "  a.qcow2:\n    pool: other\n    capacity: 1GiB\n"
        "  b.qcow2:\n    pool: images\n    backing: a.qcow2\n",
    )
    with pytest.raises(SpecError, match="a linked clone must be in its base's pool"):
        REGISTRY.parse(text)


# --- the progress bar ----------------------------------------------------------------------------


def test_progress_bar_and_json_lines() -> None:
    buf = io.StringIO()
    console = Console(file=buf, width=100, force_terminal=True, color_system=None)
    printer = EventPrinter(console)
    printer(VolumeProgress("base.qcow2", 0, 2 * MiB))
    printer(VolumeProgress("base.qcow2", MiB, 2 * MiB))
    assert printer._progress is not None
    shown = Console(file=io.StringIO(), width=100, record=True)
    for r in printer._progress.get_renderables():
        shown.print(r)
    text = shown.export_text()
    assert "↑ base.qcow2" in text and "1.0/2.0 MiB" in text
    printer(VolumeProgress("base.qcow2", 2 * MiB, 2 * MiB))
    printer.close()
    assert "↑ base.qcow2: sent 2 MiB" in buf.getvalue()
    out = io.StringIO()
    EventPrinter(console, json_out=out)(VolumeProgress("base.qcow2", 5, 10))
    assert json.loads(out.getvalue()) == {
        "event": "volume-progress",
        "volume": "base.qcow2",
        "sent": 5,
        "total": 10,
    }


def test_kinds_list_still_has_volume() -> None:
    assert VolumeResource in KINDS
