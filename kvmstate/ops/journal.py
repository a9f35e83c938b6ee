"""The run journal: every apply appends what it changed, one JSON object per line.

Answers "what did kvmstate do last night": resource, action, before/after, time, outcome.
Values are the observed/spec fields of managed resources; secrets never enter them (the spec
holds key *paths*, never key material).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from kvmstate.model import Report, Status


def journal_path() -> Path:
    from kvmstate.ops.runlock import state_dir

    return Path(os.environ.get("KVMSTATE_JOURNAL") or state_dir() / "journal.jsonl")


def record(report: Report, *, spec_path: str, path: Path | None = None) -> int:
    """Append one line per resource that changed, failed or was blocked. Returns lines written."""
    target = path or journal_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    lines: list[str] = []
    for o in report.outcomes:
        if o.status is Status.OK:
            continue
        entry: dict[str, Any] = {
            "time": now,
            "spec": spec_path,
            "resource": str(o.id),
            "kind": o.id.kind,
            "host": o.id.host,
            "action": o.change.action.value if o.change else None,
            "outcome": o.status.value,
            "changes": [
                {"field": d.field, "before": d.before, "after": d.after}
                for d in (o.change.diffs if o.change else ())
            ],
            "elapsed": round(o.elapsed, 3),
        }
        if o.error:
            entry["error"] = o.error
        lines.append(json.dumps(entry, default=str))
    if lines:
        with open(target, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return len(lines)


def read(path: Path | None = None, limit: int = 50) -> list[dict[str, Any]]:
    target = path or journal_path()
    try:
        text = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = [json.loads(line) for line in text.splitlines() if line.strip()]
    return out[-limit:]


def note(entry: dict[str, Any], *, spec_path: str, path: Path | None = None) -> None:
    """Append one event that is not a resource's outcome (a person confirming a host off)."""
    target = path or journal_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "spec": spec_path, **entry}
    with open(target, "a", encoding="utf-8") as f:
        f.write(json.dumps(line, default=str) + "\n")
