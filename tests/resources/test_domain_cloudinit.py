"""cloud_init: the seed's content and its stability, spec validation, the seed kind and the
domain's CD-ROM on the fake cluster, and secrets kept out of every output."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from pathlib import Path

import pytest
from fakelab import LAB_SPEC, converge, converge_upto, find, plan, prepare, run
from rich.console import Console

from kvmstate import importer
from kvmstate.cli import views
from kvmstate.cloudinit import PAD, build_seed, read_iso, secret_digest
from kvmstate.engine import Engine
from kvmstate.errors import SpecError
from kvmstate.model import Action, Event
from kvmstate.ops import journal
from kvmstate.resources import REGISTRY
from kvmstate.resources.base import Options, RunContext
from kvmstate.spec import Spec
from kvmstate.spec.models import CloudInit
from kvmstate.testing.fake import FakeCluster
from kvmstate.virtxml import build_domain_xml, parse_domain_xml

KEY_BODY = "AAAAC3NzaC1lZDI1NTE5AAAAIOtZ9Ek8oXFZc2w9r8c1F7M3Tq1Jm4aQdNqgqT0sYv0H"
KEY = f"ssh-ed25519 {KEY_BODY} ops@example"
HASH = "$6$rounds=4096$kvmstateSalt$Zq3.u0Vn9c1yQ3pM2tT5e6r7w8x9y0z1a2b3c4d5e6f7g8h9i0j1k2l3m4n5"
USER_DATA = "#cloud-config\nruncmd: [echo s3cr3t-token-1234]\n"
ISO = "/var/lib/libvirt/images/guest-cidata.iso"

CLOUD_INIT = f"""    cloud_init:
      hostname: guest-1
      users:
        - name: debian
          ssh_authorized_keys: ["{KEY}"]
          password_hash: "{HASH}"
          sudo: "ALL=(ALL) NOPASSWD:ALL"
"""


def with_cloud_init(block: str = CLOUD_INIT, text: str = LAB_SPEC) -> str:
    return text.replace("    state: running\n", block + "    state: running\n")


def parse(text: str) -> Spec:
    return REGISTRY.parse(text).spec


def ci(**fields: object) -> CloudInit:
    return CloudInit.model_validate(fields)


# --- the seed: content and stability -------------------------------------------------------


def test_the_seed_files() -> None:
    c = ci(
        hostname="web-1",
        users=[{"name": "debian", "ssh_authorized_keys": [KEY], "password_hash": HASH}],
        network_config={"version": 2, "ethernets": {"eth0": {"dhcp4": True}}},
    )
    seed = build_seed("web", c)
    files = read_iso(seed.image)
    assert files[":label"] == b"cidata"
    meta = files["meta-data"].decode()
    assert meta == f"instance-id: {seed.files.instance_id}\nlocal-hostname: web-1\n"
    assert seed.files.instance_id.startswith("kvmstate-web-")
    ud = files["user-data"].decode()
    assert ud.startswith("#cloud-config\n")
    assert "hostname: web-1" in ud and f"hashed_passwd: {HASH}" in ud and KEY in ud
    assert "lock_passwd: false" in ud
    assert files["network-config"].decode() == "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n"
    assert len(seed.image) % PAD == 0


def test_your_own_user_data_is_used_as_it_is_and_network_config_only_when_given() -> None:
    seed = build_seed("web", ci(user_data=USER_DATA))
    files = read_iso(seed.image)
    assert files["user-data"] == USER_DATA.encode()
    assert "network-config" not in files
    assert b"local-hostname: web\n" in files["meta-data"]  # the domain's name by default


def test_the_same_spec_gives_the_same_bytes_whatever_the_clock_and_time_zone() -> None:
    c = ci(hostname="web-1", users=[{"name": "debian", "ssh_authorized_keys": [KEY]}])
    first = build_seed("web", c)
    old = os.environ.get("TZ")
    try:
        os.environ["TZ"] = "Pacific/Chatham"  # +12:45: any local-time leak would show
        time.tzset()
        time.sleep(1.1)  # a second later: pycdlib stamps dates to the second
        again = build_seed("web", c)
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()
    assert again.image == first.image and again.sha256 == first.sha256


def test_a_changed_identity_is_a_new_seed_and_a_new_instance_id() -> None:
    a = build_seed("web", ci(hostname="web-1"))
    b = build_seed("web", ci(hostname="web-2"))
    c = build_seed("db", ci(hostname="web-1"))
    assert len({a.sha256, b.sha256, c.sha256}) == 3
    assert len({a.files.instance_id, b.files.instance_id, c.files.instance_id}) == 3


def test_secret_digest_shows_no_secret() -> None:
    shown = secret_digest(HASH)
    assert shown.startswith("(secret, sha256 ") and shown.endswith("...)")
    assert HASH not in shown and secret_digest(HASH) != secret_digest(HASH + "x")


# --- spec validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            "    cloud_init:\n      users: [{name: a, password_hash: hunter2-plain}]\n",
            "password_hash must be a crypt(3) hash",
        ),
        (
            "    cloud_init:\n      users: [{name: a, ssh_authorized_keys: [hunter2-notakey]}]\n",
            "not an SSH public key",
        ),
        (
            "    cloud_init:\n      user_data: 'hunter2-no-header'\n",
            "user_data must start with a cloud-init header",
        ),
        (
            "    cloud_init:\n      users: [{name: a}]\n      user_data: '#cloud-config\\n'\n",
            "give users or your own user_data, not both",
        ),
        (
            "    cloud_init:\n      network_config: {ethernets: {}}\n",
            "network_config is cloud-init's network config",
        ),
        ("    cloud_init:\n      pool: nowhere\n", "unknown pool 'nowhere'"),
        ("    cloud_init:\n      hostname: bad_name\n", "invalid hostname"),
    ],
)
def test_invalid_cloud_init_is_refused_without_showing_the_value(block: str, message: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse(with_cloud_init(block))
    text = str(exc.value)
    assert message in text, text
    assert "hunter2" not in text
    assert "domains.guest.cloud_init" in text


def test_the_seed_pool_must_be_where_the_domain_may_run() -> None:
    text = with_cloud_init("    cloud_init: {}\n").replace(
        "    hosts: [kvm-1, kvm-2]\nvolumes:", "    hosts: [kvm-1]\nvolumes:"
    )
    with pytest.raises(SpecError, match="is not on kvm-2, where the domain may run"):
        parse(text)


def test_a_domain_name_that_is_no_hostname_needs_one() -> None:
    text = with_cloud_init("    cloud_init: {}\n").replace("  guest:\n", "  guest_1:\n")
    with pytest.raises(SpecError, match=r"is not a valid hostname: set cloud_init\.hostname"):
        parse(text)


def test_generated_xml_with_the_seed_and_the_agent_parses_back() -> None:
    spec = parse(
        with_cloud_init().replace(
            "    state: running\n", "    guest_agent: true\n    state: running\n"
        )
    )
    want = find(spec, "domain").want  # type: ignore[attr-defined]
    assert [(c.path, c.bus, c.target, c.readonly) for c in want.cdroms] == [
        (ISO, "sata", "sda", True)
    ]
    assert want.guest_agent
    xml = build_domain_xml("guest", want)
    assert "<acpi />" in xml
    assert parse_domain_xml(xml) == want


# --- on the fake cluster ------------------------------------------------------------------------


@pytest.fixture
def ci_spec() -> Spec:
    return parse(with_cloud_init())


@pytest.fixture
def ci_cluster(ci_spec: Spec) -> FakeCluster:
    c = FakeCluster(ci_spec)
    prepare(c)
    return c


def test_seed_created_attached_and_rewritten_on_a_new_identity(
    ci_spec: Spec, ci_cluster: FakeCluster
) -> None:
    ctx = RunContext(ci_spec, ci_cluster)
    seed = find(ci_spec, "seed")
    assert str(seed.id) == "seed:kvm-1:guest"
    assert {str(d) for d in find(ci_spec, "domain").depends_on()} >= {"seed:kvm-1:guest"}

    async def first() -> None:
        await converge_upto(ctx, "volume")
        change = await plan(seed, ctx)
        assert change.action is Action.CREATE
        fields = {d.field: d.after for d in change.diffs}
        assert fields["hostname"] == "guest-1" and fields["users"] == ["debian"]
        assert str(fields["seed"]).startswith("(secret, sha256 ")
        assert (await converge(seed, ctx)).is_noop
        assert (await converge(find(ci_spec, "domain"), ctx)).is_noop

    run(first())
    storage = ci_cluster["storage"].files["/srv/images/guest-cidata.iso"]
    built = build_seed("guest", ci_spec.domains["guest"].cloud_init)  # type: ignore[arg-type]
    assert storage.data == built.image and storage.mode == "0600"
    disk_before = ci_cluster["storage"].files["/srv/images/guest.qcow2"]
    dom = ci_cluster["kvm-1"].conn().lookupByName("guest")
    cdroms = parse_domain_xml(dom.XMLDesc(0)).cdroms
    assert [(c.path, c.readonly) for c in cdroms] == [(ISO, True)]

    # a new hostname: the seed says so, the domain and its disk do not change
    renamed = parse(with_cloud_init(CLOUD_INIT.replace("guest-1", "guest-one")))
    rctx = RunContext(renamed, ci_cluster)
    change = run(plan(find(renamed, "seed"), rctx))
    assert change.action is Action.UPDATE
    assert "applied at the guest's next boot" in change.reason
    assert [d.field for d in change.diffs] == ["seed", "instance_id"]
    assert run(plan(find(renamed, "domain"), rctx)).is_noop
    assert run(converge(find(renamed, "seed"), rctx)).is_noop
    files = read_iso(ci_cluster["storage"].files["/srv/images/guest-cidata.iso"].data or b"")
    assert b"local-hostname: guest-one" in files["meta-data"]
    assert ci_cluster["storage"].files["/srv/images/guest.qcow2"] is disk_before
    assert dom.isActive()  # never restarted for a new identity


def test_a_seed_rewritten_behind_its_back_is_drift(ci_spec: Spec, ci_cluster: FakeCluster) -> None:
    ctx = RunContext(ci_spec, ci_cluster)
    run(converge_upto(ctx, "seed"))
    f = ci_cluster["storage"].files["/srv/images/guest-cidata.iso"]
    f.data = b"\0" * len(f.data or b"")
    change = run(plan(find(ci_spec, "seed"), ctx))
    assert [d.field for d in change.diffs] == ["seed", "instance_id"]
    assert run(converge(find(ci_spec, "seed"), ctx)).is_noop


def test_the_seed_goes_with_its_domain(ci_spec: Spec, ci_cluster: FakeCluster) -> None:
    ctx = RunContext(ci_spec, ci_cluster)
    run(converge_upto(ctx, "seed"))
    gone = parse(with_cloud_init().replace("    state: running\n", "    state: absent\n"))
    graph = REGISTRY.graph(gone)
    assert graph.g.has_edge(find(gone, "domain").id, find(gone, "seed").id)  # domain first
    actx = RunContext(gone, ci_cluster, Options(allow_destroy=True))
    report = run(Engine(graph, actx).apply(run(Engine(graph, actx).plan())))
    assert report.converged, report.as_dict()
    assert "/srv/images/guest-cidata.iso" not in ci_cluster["storage"].files
    assert "/srv/images/guest.qcow2" in ci_cluster["storage"].files


def test_secrets_never_reach_plans_json_logs_events_or_the_journal(
    ci_spec: Spec, ci_cluster: FakeCluster, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    spec = parse(
        with_cloud_init(CLOUD_INIT).replace(
            "      hostname: guest-1\n",
            "      hostname: guest-1\n      network_config: {version: 2}\n",
        )
    )
    own = parse(with_cloud_init(f"    cloud_init:\n      user_data: {json.dumps(USER_DATA)}\n"))
    events: list[Event] = []
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    for s in (spec, own):
        ctx = RunContext(s, ci_cluster, Options(), events.append)
        engine = Engine(REGISTRY.graph(s), ctx)
        p = run(engine.plan())
        assert p.has_changes
        texts.append(json.dumps(p.as_dict(), default=str))
        console = Console(file=io.StringIO(), width=200)
        views.plan(console, p, verbose=True)
        report = run(engine.apply(p))
        assert report.converged, report.as_dict()
        views.report(console, report)
        texts.append(console.file.getvalue())  # type: ignore[attr-defined]
        texts.append(json.dumps(report.as_dict(), default=str))
        journal.record(report, spec_path="x.yaml", path=tmp_path / "journal.jsonl")
    texts.append((tmp_path / "journal.jsonl").read_text())
    texts.append(json.dumps([dict(e) for e in events], default=str))
    texts.append(caplog.text)
    texts += [repr(spec), repr(own), str(spec.model_dump(mode="json"))]
    # a seed travels to the upload call whole: an error naming the call's arguments, or a log
    # line, shows its repr
    for s in (spec, own):
        seed = find(s, "seed").seed  # type: ignore[attr-defined]
        texts += [repr(seed), repr(seed.files)]
        assert "cloud-init seed kvmstate-guest-" in repr(seed)
    everything = "\n".join(texts)
    assert "(secret, sha256 " in everything
    for secret in (HASH, KEY_BODY, "s3cr3t-token-1234", "$6$rounds"):
        assert secret not in everything, secret


def test_import_names_the_seed_cd_rom_it_leaves_out(ci_spec: Spec, ci_cluster: FakeCluster) -> None:
    report = run(Engine(REGISTRY.graph(ci_spec), RunContext(ci_spec, ci_cluster)).apply())
    assert report.converged, report.as_dict()
    hosts = {h: ci_spec.hosts[h].address for h in ci_spec.hosts}
    invs = run(importer.gather(ci_cluster, hosts))
    base = {"version": 1, "hosts": {h: {"address": a} for h, a in hosts.items()}}
    got = importer.build(invs, base)
    text = importer.render_yaml(importer.merged(base, got), got.notes, "test import")
    assert "cloud_init" not in got.data["domains"]["guest"]
    assert any("a cloud-init seed CD-ROM" in n and ISO in n for n in got.notes), got.notes
    imported = REGISTRY.parse(text).spec
    again = run(Engine(REGISTRY.graph(imported), RunContext(imported, ci_cluster)).plan())
    assert not again.has_changes, [c.as_dict() for c in again.pending]
