"""``kvmstate import`` of domain CPUs on the fake cluster: a named model with its features comes
back as the spec's ``cpu:`` and plans no change; what the spec cannot hold is left out and
named."""

from __future__ import annotations

from fakelab import LAB_SPEC, converged_cluster, import_round_trip, run

from kvmstate.engine import Engine
from kvmstate.engine.graph import build_graph
from kvmstate.resources import KINDS
from kvmstate.resources.base import Options, RunContext

NESTED = "    cpu: {model: qemu64, features: {vmx: require, svm: disable}}\n"


def test_a_named_cpu_model_is_imported_and_plans_no_change() -> None:
    spec, cluster = converged_cluster(LAB_SPEC.replace("    vcpus: 1\n", "    vcpus: 1\n" + NESTED))
    got, _notes = import_round_trip(spec, cluster)
    cpu = got.domains["guest"].cpu
    assert cpu is not None and (cpu.mode, cpu.model) == ("custom", "qemu64")
    assert cpu.features == {"vmx": "require", "svm": "disable"}
    plan = run(Engine(build_graph(got, KINDS), RunContext(got, cluster, Options())).plan())
    assert [c.id.kind for c in plan.changes if not c.is_noop] == []


def test_host_model_on_a_tcg_guest_is_left_out_and_named() -> None:
    spec, cluster = converged_cluster(LAB_SPEC)
    conn = cluster["kvm-1"].conn()
    xml = conn.lookupByName("guest").XMLDesc(2)  # 2 = VIR_DOMAIN_XML_INACTIVE
    conn.defineXML(xml.replace("<features>", "<cpu mode='host-model'/><features>", 1))
    got, notes = import_round_trip(spec, cluster)
    assert got.domains["guest"].cpu is None
    assert any("its CPU is left out: mode host-model on a qemu (TCG) domain" in n for n in notes)
