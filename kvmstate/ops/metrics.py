"""Prometheus node_exporter textfile metrics, written atomically."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from kvmstate.localfs import write_atomic
from kvmstate.model import Plan


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def drift_classes(plan: Plan) -> Counter[tuple[str, str, str]]:
    """(kind, host, class) -> number of drifted resources."""
    out: Counter[tuple[str, str, str]] = Counter()
    for c in plan.pending:
        classes = {d.drift for d in c.diffs} or {
            "runtime" if c.action.value != "create" else "config"
        }
        for cls in sorted(classes):
            out[(c.id.kind, c.id.host or "", cls)] += 1
    return out


def render(plan: Plan | None, *, success: bool, observe_seconds: float) -> str:
    lines = [
        "# HELP kvmstate_drift_resources Resources that differ from the spec, "
        "by kind, host and drift class.",
        "# TYPE kvmstate_drift_resources gauge",
    ]
    if plan is not None:
        for (kind, host, cls), n in sorted(drift_classes(plan).items()):
            lines.append(
                f'kvmstate_drift_resources{{kind="{_label(kind)}",host="{_label(host)}",'
                f'class="{_label(cls)}"}} {n}'
            )
    lines += [
        "# HELP kvmstate_last_run_timestamp_seconds When the last drift check ran.",
        "# TYPE kvmstate_last_run_timestamp_seconds gauge",
        f"kvmstate_last_run_timestamp_seconds {time.time():.3f}",
        "# HELP kvmstate_last_run_success 1 if the last drift check could observe everything.",
        "# TYPE kvmstate_last_run_success gauge",
        f"kvmstate_last_run_success {1 if success else 0}",
        "# HELP kvmstate_observe_duration_seconds How long observing the cluster took.",
        "# TYPE kvmstate_observe_duration_seconds gauge",
        f"kvmstate_observe_duration_seconds {observe_seconds:.3f}",
    ]
    return "\n".join(lines) + "\n"


def write_textfile(path: str | Path, text: str) -> None:
    """Atomically: node_exporter never reads half a file."""
    write_atomic(path, text)
