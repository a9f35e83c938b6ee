"""Textfile metrics parse as Prometheus text; the journal records what apply changed."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from kvmstate.ids import ResourceId
from kvmstate.model import Action, Change, FieldDiff, Outcome, Plan, Report, Status
from kvmstate.ops import journal, metrics


def _plan() -> Plan:
    mount = ResourceId("mount", "images", "kvm-1")
    pool = ResourceId("pool", "images", "kvm-2")
    return Plan(
        (
            Change(mount, Action.UPDATE, (FieldDiff("mounted", False, True, "runtime"),)),
            Change(pool, Action.UPDATE, (FieldDiff("autostart", False, True, "config"),)),
            Change(ResourceId("pool", "images", "kvm-1"), Action.NOOP, (), "active"),
        )
    )


def test_textfile_parses_and_counts_drift_by_class(tmp_path: Path) -> None:
    target = tmp_path / "kvmstate.prom"
    metrics.write_textfile(target, metrics.render(_plan(), success=True, observe_seconds=0.25))
    families = {f.name: f for f in text_string_to_metric_families(target.read_text())}
    drift = {
        (s.labels["kind"], s.labels["host"], s.labels["class"]): s.value
        for s in families["kvmstate_drift_resources"].samples
    }
    assert drift == {("mount", "kvm-1", "runtime"): 1.0, ("pool", "kvm-2", "config"): 1.0}
    assert families["kvmstate_last_run_success"].samples[0].value == 1.0
    assert families["kvmstate_observe_duration_seconds"].samples[0].value == 0.25
    assert list(tmp_path.iterdir()) == [target]  # no temp file left behind


def test_journal_appends_changed_and_failed_resources(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    rid = ResourceId("mount", "images", "kvm-1")
    change = Change(rid, Action.UPDATE, (FieldDiff("mounted", False, True, "runtime"),))
    report = Report(
        (
            Outcome(rid, Status.CHANGED, change, elapsed=0.5),
            Outcome(ResourceId("pool", "images", "kvm-1"), Status.OK),
            Outcome(ResourceId("domain", "web"), Status.FAILED, error="boom"),
        ),
        rounds=1,
        converged=False,
    )
    assert journal.record(report, spec_path="specs/lab.yaml", path=path) == 2
    journal.record(report, spec_path="specs/lab.yaml", path=path)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 4
    assert lines[0]["resource"] == "mount:kvm-1:images"
    assert lines[0]["changes"] == [{"field": "mounted", "before": False, "after": True}]
    assert lines[1]["outcome"] == "failed" and lines[1]["error"] == "boom"
    assert journal.read(path, limit=1) == [lines[-1]]
