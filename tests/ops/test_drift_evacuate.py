"""kvmstate.ops: what `drift` reports and what `evacuate` applies, without the CLI."""

from __future__ import annotations

import pytest
from resources.fakelab import LAB_SPEC

from kvmstate.engine.graph import build_graph
from kvmstate.errors import KvmstateError
from kvmstate.ids import ResourceId
from kvmstate.loader import parse_spec_text
from kvmstate.model import Action, Change, FieldDiff, Plan
from kvmstate.ops.drift import drift_entries, drift_report, explained_errors
from kvmstate.ops.evacuate import drained, pinned_domains
from kvmstate.resources import KINDS

EXPORT = ResourceId("export", "images", "storage")
VOLUME = ResourceId("volume", "guest.qcow2", "kvm-1")
DOMAIN = ResourceId("domain", "guest")


def test_drained_marks_only_that_host_and_keeps_the_file() -> None:
    loaded = parse_spec_text(LAB_SPEC, "lab.yaml")
    out = drained(loaded, "kvm-1")
    assert out.spec.hosts["kvm-1"].drain and not out.spec.hosts["kvm-2"].drain
    assert not loaded.spec.hosts["kvm-1"].drain  # the loaded spec is left as it was
    assert (out.path, out.lines) == (loaded.path, loaded.lines)


def test_drained_names_the_hosts_when_there_is_no_such_host() -> None:
    with pytest.raises(KvmstateError, match=r"lab.yaml: no host 'kvm-9' \(hosts: storage, kvm-1"):
        drained(parse_spec_text(LAB_SPEC, "lab.yaml"), "kvm-9")


def test_a_domain_pinned_to_the_drained_host_stays() -> None:
    free = drained(parse_spec_text(LAB_SPEC), "kvm-1").spec
    assert pinned_domains(free, "kvm-1") == []
    assert pinned_domains(free, "kvm-2") == []  # guest is not on kvm-2
    pinned = LAB_SPEC.replace("      hosts: [kvm-1, kvm-2]\n", "      hosts: [kvm-1]\n")
    assert pinned_domains(drained(parse_spec_text(pinned), "kvm-1").spec, "kvm-1") == ["guest"]


def test_drift_entries_give_one_entry_per_field_and_one_for_a_change_without_fields() -> None:
    plan = Plan(
        (
            Change(EXPORT, Action.UPDATE, (FieldDiff("live", "(none)", "rw", "runtime"),), "x"),
            Change(DOMAIN, Action.UPDATE, (), "start guest"),
            Change(VOLUME, Action.NOOP, (), "present"),
        )
    )
    assert drift_entries(plan) == [
        {
            "id": "export:storage:images",
            "kind": "export",
            "host": "storage",
            "action": "update",
            "class": "runtime",
            "field": "live",
            "expected": "rw",
            "observed": "(none)",
            "reason": "x",
        },
        {
            "id": "domain:guest",
            "kind": "domain",
            "host": None,
            "action": "update",
            "class": "runtime",
            "field": None,
            "expected": None,
            "observed": None,
            "reason": "start guest",
        },
    ]


def test_an_error_under_a_drifted_dependency_is_explained_drift() -> None:
    loaded = parse_spec_text(LAB_SPEC)
    graph = build_graph(loaded.spec, KINDS)
    drifted = Change(EXPORT, Action.UPDATE, (FieldDiff("live", None, "rw", "runtime"),))
    errors = {VOLUME: "Stale file handle", ResourceId("subvolume", "images", "storage"): "boom"}
    plan = Plan((drifted,), errors=errors)
    assert explained_errors(graph, plan) == {VOLUME: [EXPORT]}
    report = drift_report(graph, plan)
    assert not report.ok and report.drifted
    assert report.as_dict()["unobservable"] == {
        str(VOLUME): {"error": "Stale file handle", "because_of": [str(EXPORT)]}
    }
    assert report.as_dict()["errors"] == {"subvolume:storage:images": "boom"}
