"""Values that flow through the engine: changes, plans, outcomes and reports."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Literal

from kvmstate.ids import ResourceId


class Action(enum.StrEnum):
    NOOP = "noop"
    CREATE = "create"
    UPDATE = "update"
    REPLACE = "replace"
    MIGRATE = "migrate"
    DELETE = "delete"


DriftClass = Literal["config", "runtime", "pending-restart"]


class Record(Mapping[str, Any]):
    """A frozen dataclass that also reads as the plain mapping of its fields (shallow): for
    ``--json``, the journal and callers that index it. Subclasses are frozen dataclasses."""

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())


class Payload(Record):
    """What a kind's ``diff`` hands its own ``apply`` (and ``arrange``) beside the diffs:
    a typed value per kind (placement's move, the packages still missing)."""


class Shown(Payload):
    """A payload that is also an observation worth showing: `show --json` and `plan --json`
    carry it under "observed" (only these: other payloads may hold what must not be shown)."""


class Event(Record):
    """Something a run reports as it goes; ``kind`` names it (``"event"`` in ``--json``)."""

    kind: ClassVar[str]

    def as_dict(self) -> dict[str, Any]:
        return {"event": self.kind, **super().as_dict()}


@dataclass(frozen=True)
class ObserveHost(Event):
    kind: ClassVar[str] = "observe-host"
    host: str


@dataclass(frozen=True)
class Observed(Event):
    kind: ClassVar[str] = "observed"
    id: str
    action: str


@dataclass(frozen=True)
class ApplyStart(Event):
    kind: ClassVar[str] = "apply-start"
    id: str
    action: str


@dataclass(frozen=True)
class ApplyDone(Event):
    kind: ClassVar[str] = "apply-done"
    id: str
    action: str


@dataclass(frozen=True)
class ApplyFailed(Event):
    kind: ClassVar[str] = "apply-failed"
    id: str
    error: str


@dataclass(frozen=True)
class MigrationProgress(Event):
    """libvirt's job statistics of a migration in flight (None: not reported)."""

    kind: ClassVar[str] = "migration-progress"
    domain: str
    source: str
    target: str
    time_elapsed: int | None = None
    data_processed: int | None = None
    data_remaining: int | None = None
    data_total: int | None = None
    memory_processed: int | None = None
    memory_remaining: int | None = None
    memory_total: int | None = None
    iteration: int | None = None
    dirty_rate: int | None = None


@dataclass(frozen=True)
class MigrationDone(Event):
    kind: ClassVar[str] = "migration-done"
    domain: str
    source: str
    target: str
    time_elapsed: int | None = None
    downtime: int | None = None


@dataclass(frozen=True)
class VolumeProgress(Event):
    """Bytes of an image sent into a volume (an upload or a URL streamed through kvmstate)."""

    kind: ClassVar[str] = "volume-progress"
    volume: str
    sent: int
    total: int


@dataclass(frozen=True)
class RunReport(Event):
    """The report of an apply, last in its ``--json`` event stream."""

    kind: ClassVar[str] = "report"
    report: Mapping[str, Any]


@dataclass(frozen=True)
class Message(Event):
    kind: ClassVar[str] = "message"
    text: str


@dataclass(frozen=True)
class FieldDiff:
    """One managed field: what is there (``before``) and what the spec wants (``after``)."""

    field: str
    before: Any
    after: Any
    drift: DriftClass = "config"

    def as_dict(self) -> dict[str, Any]:
        return {
            "field": self.field,
            "before": self.before,
            "after": self.after,
            "class": self.drift,
        }


@dataclass(frozen=True)
class Check:
    """A pre-flight check shown in the plan. A failed check blocks the change."""

    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass(frozen=True)
class Change:
    """What one resource needs. ``reason`` says why (also for NOOP: 'mounted from ...')."""

    id: ResourceId
    action: Action
    diffs: tuple[FieldDiff, ...] = ()
    reason: str = ""
    blocked: str | None = None
    checks: tuple[Check, ...] = ()
    data: Payload | None = None  # the kind's own typed value, for its apply and arrange
    # changes of the same apply this one waits for (a migration onto a host waits for the
    # domains that leave it first)
    after: tuple[ResourceId, ...] = ()

    @property
    def pending(self) -> tuple[FieldDiff, ...]:
        return tuple(d for d in self.diffs if d.drift == "pending-restart")

    @property
    def is_noop(self) -> bool:
        return self.action is Action.NOOP

    def with_blocked(self, reason: str | None) -> Change:
        return replace(self, blocked=reason)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": str(self.id),
            "kind": self.id.kind,
            "host": self.id.host,
            "name": self.id.name,
            "action": self.action.value,
            "reason": self.reason,
            "diffs": [d.as_dict() for d in self.diffs],
        }
        if self.blocked:
            out["blocked"] = self.blocked
        if self.checks:
            out["checks"] = [c.as_dict() for c in self.checks]
        if self.after:
            out["after"] = [str(a) for a in self.after]
        if isinstance(self.data, Shown):
            out["observed"] = self.data.as_dict()
        return out


class Status(enum.StrEnum):
    OK = "ok"  # nothing to do, or done and verified
    CHANGED = "changed"
    FAILED = "failed"
    BLOCKED = "blocked"  # refused (destroy not allowed, pre-flight failed)
    SKIPPED = "skipped"  # a dependency failed or was blocked
    # its host is down (fenced, or assumed down by a what-if): not converged, but what
    # depends on it goes on (an HA domain restarted elsewhere)
    DOWN = "down"


@dataclass(frozen=True)
class Outcome:
    id: ResourceId
    status: Status
    change: Change | None = None
    error: str | None = None
    cause: ResourceId | None = None  # for SKIPPED: the root cause
    elapsed: float = 0.0
    details: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": str(self.id), "status": self.status.value}
        if self.change is not None:
            out["action"] = self.change.action.value
            out["diffs"] = [d.as_dict() for d in self.change.diffs]
        if self.error:
            out["error"] = self.error
        if self.cause:
            out["cause"] = str(self.cause)
        out["elapsed"] = round(self.elapsed, 3)
        if self.details:
            out["details"] = dict(self.details)
        return out


@dataclass(frozen=True)
class Plan:
    """Every resource's change, in dependency order, plus what could not be observed."""

    changes: tuple[Change, ...]
    errors: Mapping[ResourceId, str] = field(default_factory=dict)
    order: tuple[ResourceId, ...] = ()
    observe_seconds: float = 0.0
    # blocked changes whose dependencies have changes of their own in this plan: they are
    # checked again once those are applied (a pool started on the target, say)
    deferred: frozenset[ResourceId] = frozenset()
    # not observed: their host is down (fenced, or assumed down by a what-if plan)
    down: Mapping[ResourceId, str] = field(default_factory=dict)

    @property
    def pending(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if not c.is_noop or c.pending)

    @property
    def has_changes(self) -> bool:
        return bool(self.pending)

    def get(self, rid: ResourceId) -> Change | None:
        for c in self.changes:
            if c.id == rid:
                return c
        return None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.changes:
            if not c.is_noop:
                out[c.action.value] = out.get(c.action.value, 0) + 1
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "changes": [c.as_dict() for c in self.changes],
            "errors": {str(k): v for k, v in self.errors.items()},
            "down": {str(k): v for k, v in self.down.items()},
            "summary": self.counts(),
            "deferred": sorted(str(d) for d in self.deferred),
            "has_changes": self.has_changes,
            "observe_seconds": round(self.observe_seconds, 3),
        }


@dataclass(frozen=True)
class Report:
    """The result of ``apply``: one outcome per resource, and the rounds it took."""

    outcomes: tuple[Outcome, ...]
    rounds: int
    converged: bool
    elapsed: float = 0.0

    @property
    def failed(self) -> tuple[Outcome, ...]:
        return tuple(o for o in self.outcomes if o.status in (Status.FAILED, Status.BLOCKED))

    @property
    def root_causes(self) -> tuple[Outcome, ...]:
        return self.failed

    def as_dict(self) -> dict[str, Any]:
        return {
            "outcomes": [o.as_dict() for o in self.outcomes],
            "rounds": self.rounds,
            "converged": self.converged,
            "elapsed": round(self.elapsed, 3),
        }
