"""``kvmstate import`` of domain CPUs on the fake cluster: a named model with its features comes
back as the spec's ``cpu:`` and plans no change; what the spec cannot hold is left out and
named."""

from __future__ import annotations

from fakelab import LAB_SPEC, make_spec, prepare, run

from kvmstate import importer
from kvmstate.engine import Engine
from kvmstate.engine.graph import build_graph
from kvmstate.loader import parse_spec_text
from kvmstate.resources import KINDS
from kvmstate.resources.base import Options, RunContext
from kvmstate.spec import Spec
from kvmstate.testing.fake import FakeCluster

NESTED = "    cpu: {model: qemu64, features: {vmx: require, svm: disable}}\n"


def converged(text: str) -> tuple[Spec, FakeCluster]:
    spec = make_spec(text)
    cluster = FakeCluster(spec)
    prepare(cluster)
    report = run(Engine(build_graph(spec, KINDS), RunContext(spec, cluster, Options())).apply())
    assert report.converged, report.as_dict()
    return spec, cluster


def imported(spec: Spec, cluster: FakeCluster) -> tuple[Spec, list[str]]:
    invs = run(importer.gather(cluster, {h: spec.hosts[h].address for h in spec.hosts}))
    base = {"version": 1, "hosts": {h: {"address": spec.hosts[h].address} for h in spec.hosts}}
    got = importer.build(invs, base)
    text = importer.render_yaml(importer.merged(base, got), got.notes, "test import")
    return parse_spec_text(text, "imported.yaml").spec, got.notes


def test_a_named_cpu_model_is_imported_and_plans_no_change() -> None:
    spec, cluster = converged(LAB_SPEC.replace("    vcpus: 1\n", "    vcpus: 1\n" + NESTED))
    got, _notes = imported(spec, cluster)
    cpu = got.domains["guest"].cpu
    assert cpu is not None and (cpu.mode, cpu.model) == ("custom", "qemu64")
    assert cpu.features == {"vmx": "require", "svm": "disable"}
    plan = run(Engine(build_graph(got, KINDS), RunContext(got, cluster, Options())).plan())
    assert [c.id.kind for c in plan.changes if not c.is_noop] == []


def test_host_model_on_a_tcg_guest_is_left_out_and_named() -> None:
    spec, cluster = converged(LAB_SPEC)
    conn = cluster["kvm-1"].conn()
    xml = conn.lookupByName("guest").XMLDesc(2)  # 2 = VIR_DOMAIN_XML_INACTIVE
    conn.defineXML(xml.replace("<features>", "<cpu mode='host-model'/><features>", 1))
    got, notes = imported(spec, cluster)
    assert got.domains["guest"].cpu is None
    assert any("its CPU is left out: mode host-model on a qemu (TCG) domain" in n for n in notes)
