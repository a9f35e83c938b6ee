"""``kvmstate import`` on the fake cluster: what a converged cluster holds comes back as a spec
whose plan shows no changes; what cannot be expressed is left out and named."""

from __future__ import annotations

from fakelab import make_spec, prepare, run

from kvmstate import importer, virt
from kvmstate.engine import Engine
from kvmstate.engine.graph import build_graph
from kvmstate.loader import parse_spec_text
from kvmstate.model import Plan
from kvmstate.resources import KINDS
from kvmstate.resources.base import Options, RunContext
from kvmstate.spec import Spec
from kvmstate.testing.fake import FakeCluster


async def plan_of(spec: Spec, cluster: FakeCluster) -> Plan:
    return await Engine(build_graph(spec, KINDS), RunContext(spec, cluster, Options())).plan()


def converged() -> tuple[Spec, FakeCluster]:
    spec = make_spec()
    cluster = FakeCluster(spec)
    prepare(cluster)
    report = run(Engine(build_graph(spec, KINDS), RunContext(spec, cluster, Options())).apply())
    assert report.converged, report.as_dict()
    return spec, cluster


def imported_spec(spec: Spec, cluster: FakeCluster, hosts: list[str]) -> tuple[str, Spec]:
    """The import as text (what is written) and as the spec it loads as."""
    invs = run(importer.gather(cluster, {h: spec.hosts[h].address for h in hosts}))
    base = {"version": 1, "hosts": {h: {"address": spec.hosts[h].address} for h in spec.hosts}}
    got = importer.build(invs, base)
    text = importer.render_yaml(importer.merged(base, got), got.notes, "test import")
    return text, parse_spec_text(text, "imported.yaml").spec


def test_import_of_every_host_plans_no_changes() -> None:
    spec, cluster = converged()
    text, imported = imported_spec(spec, cluster, list(spec.hosts))
    assert set(imported.subvolumes) == {"images"}
    assert set(imported.exports) == {"images"} and set(imported.mounts) == {"images"}
    assert imported.mounts["images"].hosts == ["kvm-1", "kvm-2"]
    assert imported.mounts["images"].nfs_version == "3"
    assert set(imported.pools) == {"images"} and set(imported.volumes) == {"guest.qcow2"}
    vol = imported.volumes["guest.qcow2"]
    assert (vol.capacity, vol.owner, vol.group) == (64 * 1024**2, "libvirt-qemu", "kvm")
    dom = imported.domains["guest"]
    assert (dom.host, dom.state, dom.memory, dom.type) == (
        "kvm-1",
        "running",
        128 * 1024**2,
        "qemu",
    )
    assert dom.boot is not None and dom.boot.kernel == "/var/lib/kvmstate/vmlinuz"
    assert dom.interfaces[0].bridge == "br0"
    assert imported.subvolumes["images"].toplevel == "/srv/btrfs"
    p = run(plan_of(imported, cluster))
    assert not p.errors, p.errors
    assert not p.has_changes, [(str(c.id), c.diffs) for c in p.pending]
    assert text.startswith("# test import\n")


def test_import_of_one_kvm_host_leaves_out_the_mount_and_says_why() -> None:
    spec, cluster = converged()
    _, imported = imported_spec(spec, cluster, ["kvm-2"])
    assert not imported.mounts and not imported.domains  # the guest runs on kvm-1
    assert imported.pools["images"].hosts == ["kvm-2"]
    invs = run(importer.gather(cluster, {"kvm-2": spec.hosts["kvm-2"].address}))
    notes = importer.build(invs).notes
    assert any("NFS mount" in n and "not among the imported hosts" in n for n in notes), notes


def test_what_the_spec_cannot_express_is_named_not_guessed() -> None:
    spec, cluster = converged()
    k1 = cluster["kvm-1"]
    conn = k1.conn()
    # a domain whose disk is outside every pool, and one defined by hand (no marker)
    virt.define_domain(
        conn,
        "<domain type='qemu'><name>stray</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>"
        "<driver name='qemu' type='raw'/><source file='/elsewhere/stray.img'/>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain>",
    )
    virt.define_domain(
        conn,
        "<domain type='qemu'><name>handmade</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64'>hvm</type></os><devices><graphics type='vnc'/></devices>"
        "</domain>",
    )
    text, imported = imported_spec(spec, cluster, list(spec.hosts))
    text = " ".join(ln.lstrip("# ") for ln in text.splitlines())  # the notes, unwrapped
    assert "stray" not in imported.domains
    assert "kvm-1: domain stray left out: disk /elsewhere/stray.img is not a" in text
    assert imported.domains["handmade"].state == "shut-off"
    assert "domain handmade was not created by kvmstate" in text
    assert "devices the spec does not describe (graphics, video)" in text
    p = run(plan_of(imported, cluster))
    pending = {str(c.id): [d.field for d in c.diffs] for c in p.pending}
    assert pending == {"domain:handmade": ["managed"]}, pending


def test_a_base_spec_is_kept_and_not_repeated() -> None:
    spec, cluster = converged()
    invs = run(importer.gather(cluster, {h: h2.address for h, h2 in spec.hosts.items()}))
    base = spec.model_dump(mode="json", exclude_none=True)
    got = importer.build(invs, base)
    assert got.resources() == []  # everything is already declared
