"""What `kvmstate drift` reports: one entry per drifted field, and which resources could not
be observed because something they stand on has drifted (drift with a known root cause, not
a failure to tell)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    from collections.abc import Mapping

    from kvmstate.engine.graph import ResourceGraph
    from kvmstate.ids import ResourceId
    from kvmstate.model import Change, Plan

# "class" is a keyword: the functional form keeps the JSON key
DriftEntry = TypedDict(
    "DriftEntry",
    {
        "id": str,
        "kind": str,
        "host": str | None,
        "action": str,
        "class": str,
        "field": str | None,
        "expected": object,  # a field's value, of whatever type the kind's field has
        "observed": object,
        "reason": str,
    },
)


def drift_entries(plan: Plan) -> list[DriftEntry]:
    """One entry per drifted field of each pending change; a change without field diffs (a
    domain to start, say) is one "runtime" entry that gives its reason."""
    out: list[DriftEntry] = []
    for c in plan.pending:
        if not c.diffs:
            out.append(_entry(c, "runtime", None, None, None))
        for d in c.diffs:
            out.append(_entry(c, d.drift, d.field, d.after, d.before))
    return out


def _entry(
    c: Change, drift: str, field: str | None, expected: object, observed: object
) -> DriftEntry:
    return {
        "id": str(c.id),
        "kind": c.id.kind,
        "host": c.id.host,
        "action": c.action.value,
        "class": drift,
        "field": field,
        "expected": expected,
        "observed": observed,
        "reason": c.reason,
    }


def explained_errors(graph: ResourceGraph, plan: Plan) -> dict[ResourceId, list[ResourceId]]:
    """Resources that could not be observed while something they stand on has drifted (a
    volume giving 'Stale file handle' under an export removed from the live table): that is
    drift with a known root cause, not a failure to tell."""
    from kvmstate.engine import nx_ancestors

    drifted = {c.id for c in plan.pending}
    out: dict[ResourceId, list[ResourceId]] = {}
    for rid in plan.errors:
        causes = sorted(a for a in nx_ancestors(graph, rid) if a in drifted)
        if causes:
            out[rid] = causes
    return out


@dataclass(frozen=True)
class DriftReport:
    entries: list[DriftEntry]
    explained: dict[ResourceId, list[ResourceId]]  # unobservable, and why
    unexplained: dict[ResourceId, str]  # unobservable for no known reason: cannot tell
    errors: Mapping[ResourceId, str]  # every resource that could not be observed

    @property
    def ok(self) -> bool:
        """Whether drift could be told for every resource."""
        return not self.unexplained

    @property
    def drifted(self) -> bool:
        return bool(self.entries or self.explained)

    def as_dict(self) -> dict[str, object]:
        return {
            "drift": self.entries,
            "errors": {str(k): v for k, v in self.unexplained.items()},
            "unobservable": {
                str(k): {"error": self.errors[k], "because_of": [str(c) for c in v]}
                for k, v in self.explained.items()
            },
            "converged": not self.errors and not self.entries,
        }


def drift_report(graph: ResourceGraph, plan: Plan) -> DriftReport:
    explained = explained_errors(graph, plan)
    errors = {**plan.errors, **plan.down}  # a down host's resources cannot be told either
    unexplained = {k: v for k, v in errors.items() if k not in explained}
    return DriftReport(drift_entries(plan), explained, unexplained, errors)
