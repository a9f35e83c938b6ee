"""docs/resource-guide.md, executed: a new kind is one file (``notes_kind.py``) and one line
of registration; it then gets the spec section, plan/apply/drift, the graph, host
prerequisites, import and reference docs through the same code paths as the built-in kinds."""

from __future__ import annotations

import pytest
from fakelab import LAB_SPEC, prepare, run
from notes_kind import PATH, NoteResource

from kvmstate import docgen, importer
from kvmstate.engine import Engine
from kvmstate.errors import SpecError
from kvmstate.ids import ResourceId
from kvmstate.loader import parse_spec_text
from kvmstate.model import Action, Plan
from kvmstate.resources import KINDS
from kvmstate.resources.base import Options, RunContext
from kvmstate.resources.registry import Registry
from kvmstate.testing.fake import FakeCluster

REGISTRY = Registry([*KINDS, NoteResource])  # the one line

SPEC = LAB_SPEC + "notes:\n  motd: {host: kvm-1, text: hello from kvmstate}\n"
NOTE = ResourceId("note", "motd", "kvm-1")


def plan(cluster: FakeCluster, spec: object) -> Plan:
    engine = Engine(REGISTRY.graph(spec), RunContext(spec, cluster, Options()))  # type: ignore[arg-type]
    return run(engine.plan())


def test_the_spec_section_comes_from_the_kind() -> None:
    with pytest.raises(SpecError, match="notes"):
        parse_spec_text(SPEC)  # the built-in registry has no `notes`
    spec = REGISTRY.parse(SPEC).spec
    assert spec.notes["motd"].text == "hello from kvmstate"  # type: ignore[attr-defined]
    with pytest.raises(SpecError, match=r"notes\.motd\.colour"):
        REGISTRY.parse(SPEC.replace("text: hello", "colour: red, text: hello"))


def test_plan_apply_drift_and_restore_on_the_fake() -> None:
    spec = REGISTRY.parse(SPEC).spec
    cluster = FakeCluster(spec)  # type: ignore[arg-type]
    prepare(cluster)
    first = plan(cluster, spec)
    assert {c.id: c.action for c in first.changes}[NOTE] is Action.CREATE
    report = run(Engine(REGISTRY.graph(spec), RunContext(spec, cluster)).apply(first))  # type: ignore[arg-type]
    assert report.converged, report.as_dict()
    assert cluster["kvm-1"].read(PATH) == "motd hello from kvmstate\n"
    assert not plan(cluster, spec).has_changes

    cluster["kvm-1"].write(PATH, "motd changed by hand\n")  # behind its back
    drift = plan(cluster, spec)
    assert [(str(c.id), d.field, d.before) for c in drift.pending for d in c.diffs] == [
        (str(NOTE), "text", "changed by hand")
    ]
    assert run(Engine(REGISTRY.graph(spec), RunContext(spec, cluster)).apply(drift)).converged  # type: ignore[arg-type]
    assert cluster["kvm-1"].read(PATH) == "motd hello from kvmstate\n"
    assert not plan(cluster, spec).has_changes


def test_graph_and_prerequisites() -> None:
    spec = REGISTRY.parse(
        SPEC.replace(
            "kvm-1: {address: 10.77.0.21}",
            "kvm-1: {address: 10.77.0.21, packages: [kvmstate-notes]}",
        )
    ).spec
    graph = REGISTRY.graph(spec)
    assert NOTE in graph.resources
    assert ResourceId("packages", "kvm-1", "kvm-1") in graph.dependencies(NOTE)
    assert "notectl" in REGISTRY.needs_for_host(spec, "kvm-1")
    assert "notectl" not in REGISTRY.needs_for_host(spec, "kvm-2")

    cluster = FakeCluster(spec)  # type: ignore[arg-type]
    prepare(cluster)
    cluster["kvm-1"].missing.add("cmd:notectl")
    errors = {str(rid): msg for rid, msg in plan(cluster, spec).errors.items()}
    assert "command `notectl` not found (needed for notes)" in errors[str(NOTE)]
    assert "packages:kvm-1 installs it first" in errors[str(NOTE)]


def test_import_and_docs() -> None:
    spec = REGISTRY.parse(SPEC).spec
    cluster = FakeCluster(spec)  # type: ignore[arg-type]
    prepare(cluster)
    cluster["kvm-1"].write(PATH, "motd hello from kvmstate\nwelcome first line\n")
    hosts = {"kvm-1": spec.hosts["kvm-1"].address}
    invs = run(importer.gather(cluster, hosts, REGISTRY.kinds))
    got = importer.build(invs, kinds=REGISTRY.kinds)
    assert got.data["notes"] == {
        "motd": {"host": "kvm-1", "text": "hello from kvmstate"},
        "welcome": {"host": "kvm-1", "text": "first line"},
    }
    assert "## `notes.NAME` — Note" in docgen.spec_reference(REGISTRY)
    assert '"notes"' in docgen.json_schema(REGISTRY)
    assert "notes.NAME" not in docgen.spec_reference()  # the built-in docs are not touched
