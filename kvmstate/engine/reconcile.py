"""plan / apply / converge. Knows no concrete resource kind and no concrete transport.

plan:  read the facts of every host in one batch per host (all hosts in parallel), observe
       every resource concurrently, diff -> a Plan of typed changes.
apply: walk the graph; a node starts when all its dependencies are done; per-host concurrency
       limits; right before mutating, re-observe and refuse if the world moved away from the
       plan; apply; re-observe and fail the node unless it is now converged. A failed or
       blocked node's dependents are skipped (their root cause is reported), independent
       branches go on. Temporary errors are retried with backoff. Rounds repeat until nothing
       is left to do, nothing changed in a round, or the round limit is reached.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from kvmstate.engine import walker
from kvmstate.engine.contract import Context, Node
from kvmstate.engine.graph import ResourceGraph
from kvmstate.errors import (
    ConflictError,
    HostUnreachable,
    KvmstateError,
    TemporaryError,
    TransportError,
)
from kvmstate.ids import ResourceId
from kvmstate.model import (
    Action,
    ApplyDone,
    ApplyFailed,
    ApplyStart,
    Change,
    Observed,
    ObserveHost,
    Outcome,
    Plan,
    Report,
    Status,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Actions a later convergence round may take on its own. Anything destructive or disruptive
# (delete, replace, migrate) happens only if the plan the user approved contained it.
_FOLLOW_UP_ACTIONS = frozenset({Action.CREATE, Action.UPDATE})


@dataclass(frozen=True)
class EngineConfig:
    host_concurrency: int = 4
    observe_concurrency: int = 64
    max_rounds: int = 3
    retries: int = 3
    retry_delay: float = 0.5


def is_temporary(exc: BaseException) -> bool:
    if isinstance(exc, TemporaryError):
        return True
    if isinstance(exc, TransportError | HostUnreachable):
        return bool(exc.temporary)
    return False


def describe(exc: BaseException) -> str:
    if isinstance(exc, KvmstateError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class Blocked(Exception):
    """The re-check found the change blocked now (its reason is the message)."""


def nx_ancestors(graph: ResourceGraph, rid: ResourceId) -> set[ResourceId]:
    out: set[ResourceId] = set()
    todo = list(graph.dependencies(rid))
    while todo:
        d = todo.pop()
        if d not in out:
            out.add(d)
            todo.extend(graph.dependencies(d))
    return out


class Engine:
    def __init__(self, graph: ResourceGraph, ctx: Context, config: EngineConfig | None = None):
        self.graph = graph
        self.ctx = ctx
        self.config = config or EngineConfig()

    # --- helpers -----------------------------------------------------------------------------
    async def _retry(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        delay = self.config.retry_delay
        for attempt in range(1, self.config.retries + 1):
            try:
                return await fn()
            except Exception as exc:
                if attempt == self.config.retries or not is_temporary(exc):
                    raise
                wait = exc.delay if isinstance(exc, TemporaryError) else delay
                log.info("%s: temporary error (%s); retry %d in %.1fs", what, exc, attempt, wait)
                await asyncio.sleep(wait)
                delay *= 2
        raise AssertionError("unreachable")

    def _gate(self, change: Change) -> Change:
        if (
            change.action in (Action.DELETE, Action.REPLACE)
            and not change.blocked
            and not self.ctx.options.allow_destroy
        ):
            verb = "deleting" if change.action is Action.DELETE else "replacing"
            return change.with_blocked(f"{verb} needs --allow-destroy")
        return change

    # --- plan ----------------------------------------------------------------------------------
    async def plan(self, *, assume_empty: bool = False) -> Plan:
        order = self.graph.order()
        started = time.monotonic()
        if assume_empty:
            empty = tuple(self._gate(self.graph[rid].diff(None)) for rid in order)
            return Plan(empty, {}, tuple(order), 0.0)

        self.ctx.memo_enabled = True
        try:
            await self.ctx.learn_down_hosts()  # hosts known down are not contacted
            return await self._observe_all(order, started)
        finally:
            self.ctx.end_memo()

    async def warm_up(self) -> None:
        """Open the connections the plan will use, reading nothing: every host's SSH
        connection, and the libvirt connection of every host with a libvirt resource, all in
        parallel. ``apply`` runs this while it takes the cluster lock. Failures are left to
        the plan, which meets them again and reports them."""
        results = await asyncio.gather(
            self.ctx.transports.connect_all(),
            *map(self._open_libvirt, self._libvirt_hosts(self.graph.order())),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                log.debug("warming up: %s", r)

    def _libvirt_hosts(self, order: list[ResourceId]) -> list[str]:
        return self._hosts_of(order, lambda r: r.uses_libvirt)

    async def _open_libvirt(self, host: str) -> None:
        """Open ``host``'s libvirt connection ahead of its first use; a failure is left to the
        observation that meets it again (and reports it)."""
        try:
            await self.ctx.libvirt(host).connect()
        except Exception as exc:  # noqa: BLE001 - reported through each resource's observe
            log.debug("libvirt on %s: %s", host, exc)

    def _hosts_of(self, order: list[ResourceId], pred: Callable[[Node], bool]) -> list[str]:
        return sorted(
            {
                h
                for rid in order
                if pred(self.graph[rid])
                for h in self.graph[rid].hosts()
                if not self.ctx.host_offline(h)
            }
        )

    def _down(self, rid: ResourceId) -> str | None:
        """Why the node is not contacted in this run: its own host, or every host it is on,
        is down (fenced, or assumed down by a what-if plan). None when it is observed."""
        if rid.host is not None and (own := self.ctx.host_offline(rid.host)):
            # the host it is managed through (a shared volume: its pool's first host)
            return f"{rid.host} is down ({own})"
        hosts = self.graph[rid].hosts()
        why = [self.ctx.host_offline(h) for h in hosts]
        if not hosts or not all(why):
            return None
        return "; ".join(
            dict.fromkeys(f"{h} is down ({w})" for h, w in zip(hosts, why, strict=True))
        )

    def _read_hosts(
        self, order: list[ResourceId]
    ) -> tuple[dict[str, asyncio.Task[None]], list[asyncio.Task[None]]]:
        """Start one batched read per host (everything every resource reads there: its facts
        and its prerequisite probes), all hosts in parallel, with the libvirt connections
        opening beside them. A resource is observed as soon as ITS hosts are read: a slow
        host holds up only its own resources. Returns (host -> read task, libvirt tasks)."""
        by_host: dict[str, list[Any]] = defaultdict(list)
        for rid in order:
            for host, fact in self.graph[rid].reads():
                if not self.ctx.host_offline(host):
                    by_host[host].append(fact)

        async def read(host: str, facts: list[Any]) -> None:
            self.ctx.emit(ObserveHost(host))
            try:
                await self._retry(f"facts on {host}", lambda: self.ctx.facts(host).prefetch(facts))
            except Exception as exc:  # noqa: BLE001 - reported through each resource's observe
                log.debug("prefetch on %s failed: %s", host, exc)

        reads = {h: asyncio.ensure_future(read(h, fs)) for h, fs in by_host.items()}
        warming = [asyncio.ensure_future(self._open_libvirt(h)) for h in self._libvirt_hosts(order)]
        return reads, warming

    async def _observe_all(self, order: list[ResourceId], started: float) -> Plan:
        reads, warming = self._read_hosts(order)
        try:
            return await self._observe_each(order, started, reads)
        except BaseException:
            for t in (*reads.values(), *warming):
                t.cancel()
            raise
        finally:
            await asyncio.gather(*reads.values(), *warming, return_exceptions=True)

    async def _observe_each(
        self,
        order: list[ResourceId],
        started: float,
        reads: dict[str, asyncio.Task[None]],
    ) -> Plan:
        sem = asyncio.Semaphore(self.config.observe_concurrency)
        errors: dict[ResourceId, str] = {}
        down: dict[ResourceId, str] = {}

        async def observe(rid: ResourceId) -> Change | None:
            r = self.graph[rid]
            why = self._down(rid)
            if why is not None:
                down[rid] = why
                return None
            for h in sorted({*r.hosts(), *(h for h, _ in r.reads())}):
                if h in reads:
                    await reads[h]
            lacking = await r.preconditions(self.ctx)
            if lacking:
                errors[rid] = "; ".join(lacking)
                return None
            async with sem:
                try:
                    observed = await self._retry(str(rid), lambda: r.observe(self.ctx))
                    change = self._gate(r.diff(observed))
                except Exception as exc:
                    log.debug("observe %s failed", rid, exc_info=True)
                    errors[rid] = describe(exc)
                    return None
            self.ctx.emit(Observed(str(rid), change.action.value))
            return change

        results = await asyncio.gather(*(observe(rid) for rid in order))
        changes = self._arrange(tuple(c for c in results if c is not None))
        return Plan(
            changes,
            errors,
            tuple(order),
            time.monotonic() - started,
            self._deferred(changes),
            down,
        )

    def _arrange(self, changes: tuple[Change, ...]) -> tuple[Change, ...]:
        """Each kind looks at its planned changes together (``Resource.arrange``): placement
        orders migrations so that no host's memory is overcommitted on the way."""
        out = list(changes)
        by_kind: dict[type[Node], list[int]] = defaultdict(list)
        for i, c in enumerate(out):
            by_kind[type(self.graph[c.id])].append(i)
        for kind, idx in by_kind.items():
            arranged = kind.arrange(tuple(out[i] for i in idx))
            for i, c in zip(idx, arranged, strict=True):
                out[i] = self._gate(c)
        return tuple(out)

    def _deferred(self, changes: tuple[Change, ...]) -> frozenset[ResourceId]:
        """Blocked changes with a dependency that has a pending change of its own."""
        pending = {c.id for c in changes if not c.is_noop}
        return frozenset(
            c.id
            for c in changes
            if c.blocked and any(d in pending for d in nx_ancestors(self.graph, c.id))
        )

    # --- apply ---------------------------------------------------------------------------------
    async def apply(self, plan: Plan | None = None) -> Report:
        started = time.monotonic()
        approved = plan if plan is not None else await self.plan()
        allowed: dict[ResourceId, Action] = {c.id: c.action for c in approved.changes}
        final: dict[ResourceId, Outcome] = {}
        current = approved
        rounds = 0
        for rounds in range(1, self.config.max_rounds + 1):
            if rounds > 1:
                current = await self.plan()
                if not current.has_changes and not current.errors:
                    break
            failed = {rid: o for rid, o in final.items() if o.status is Status.FAILED}
            outcomes = await self._walk(current, allowed, failed, first_round=rounds == 1)
            for rid, o in outcomes.items():
                prev = final.get(rid)
                if prev is not None and prev.status is Status.CHANGED and o.status is Status.OK:
                    continue  # keep "changed" from the round that did it
                final[rid] = o
            # Another round only helps when this one changed something that blocked or
            # skipped nodes were waiting for; a failed node is not tried again.
            if not any(o.status is Status.CHANGED for o in outcomes.values()):
                break
            if not any(o.status in (Status.BLOCKED, Status.SKIPPED) for o in outcomes.values()):
                break
        converged = all(o.status in (Status.OK, Status.CHANGED) for o in final.values())
        ordered = tuple(final[rid] for rid in self.graph.order() if rid in final)
        return Report(ordered, rounds, converged, time.monotonic() - started)

    async def _walk(
        self,
        plan: Plan,
        allowed: dict[ResourceId, Action],
        failed: dict[ResourceId, Outcome],
        *,
        first_round: bool,
    ) -> dict[ResourceId, Outcome]:
        """One round over the graph with the generic walker: dependencies first, a node whose
        dependency did not converge is skipped (naming the root cause), ``Change.after``
        orders a node after others (whatever their outcome), and a node that will mutate
        holds a slot of each of its hosts (``host_concurrency``)."""
        order = self.graph.order()
        changes = {c.id: c for c in plan.changes}
        after = [(a, c.id) for c in plan.changes for a in c.after]
        may_mutate = {
            rid
            for rid in order
            if rid not in failed
            and (rid in plan.errors or (rid in changes and not changes[rid].is_noop))
        }
        keys = {
            rid: [f"host:{h}" for h in sorted(set(self.graph[rid].hosts()))] for rid in may_mutate
        }
        done: dict[ResourceId, Outcome] = {}

        async def visit(rid: ResourceId) -> Outcome:
            if rid in failed:
                return failed[rid]
            try:
                return await self._node(rid, changes, plan, allowed, done, first_round)
            except Exception as exc:  # noqa: BLE001 - each node catches its own errors
                return Outcome(rid, Status.FAILED, changes.get(rid), error=describe(exc))

        def skip(rid: ResourceId, cause: ResourceId) -> Outcome:
            return Outcome(
                rid,
                Status.SKIPPED,
                changes.get(rid),
                cause=cause,
                error=f"skipped: {cause} did not converge",
            )

        return await walker.walk(
            walker.Dag(order, self.graph.edges()),
            visit,
            succeeded=lambda o: o.status in (Status.OK, Status.CHANGED, Status.DOWN),
            skip=skip,
            after=after,
            keys=keys,
            default_limit=self.config.host_concurrency,
            blame=lambda rid, o: o.cause or rid,
            into=done,
        )

    async def _node(
        self,
        rid: ResourceId,
        changes: dict[ResourceId, Change],
        plan: Plan,
        allowed: dict[ResourceId, Action],
        done: dict[ResourceId, Outcome],
        first_round: bool,
    ) -> Outcome:
        """The reconcile policy for one node whose dependencies all converged."""
        down = self._down(rid)
        if down is not None:  # its host was fenced in this run (or is assumed down)
            return Outcome(rid, Status.DOWN, changes.get(rid), error=down)
        # Ordered after other changes of this apply (a migration waits for the domains that
        # leave its target first)?
        waits = changes.get(rid)
        for a in waits.after if waits is not None else ():
            o = done[a]
            if o.status not in (Status.CHANGED, Status.OK):
                return Outcome(
                    rid,
                    Status.BLOCKED,
                    waits,
                    cause=a,
                    error=f"waits for {a}, which did not complete ({o.status.value})",
                )
        # Anything upstream changed in this run (not only direct dependencies: an export
        # restored under a mount, a pool and then a volume)?
        deps_changed = any(done[a].status is Status.CHANGED for a in nx_ancestors(self.graph, rid))
        if rid in plan.errors:
            if not deps_changed:
                return Outcome(rid, Status.FAILED, error=plan.errors[rid])
            # It could not be observed at plan time, but what it stands on was just repaired
            # (an export restored under a volume): look again.
            try:
                observed = await self._retry(str(rid), lambda: self.graph[rid].observe(self.ctx))
            except Exception as exc:  # noqa: BLE001 - each node catches its own errors
                return Outcome(rid, Status.FAILED, error=describe(exc))
            fresh = self._gate(self.graph[rid].diff(observed))
            if fresh.action in (Action.DELETE, Action.REPLACE, Action.MIGRATE):
                return Outcome(
                    rid,
                    Status.BLOCKED,
                    fresh,
                    error=f"{fresh.action.value} was not in the plan; run plan again",
                )
            changes = {**changes, rid: fresh}
        planned = changes.get(rid)
        if planned is None or planned.is_noop:
            return Outcome(rid, Status.OK, planned)
        if planned.blocked and not deps_changed:
            return Outcome(rid, Status.BLOCKED, planned, error=planned.blocked)
        if (
            not first_round
            and planned.action not in _FOLLOW_UP_ACTIONS
            and allowed.get(rid) is not planned.action
        ):
            return Outcome(
                rid,
                Status.BLOCKED,
                planned,
                error=f"{planned.action.value} was not in the approved plan; run plan again",
            )
        r = self.graph[rid]
        started = time.monotonic()
        self.ctx.emit(ApplyStart(str(rid), planned.action.value))
        try:
            try:
                change = await self.mutate(r, planned)
            except Blocked as b:
                return Outcome(rid, Status.BLOCKED, planned, error=str(b))
            if change is None:
                return Outcome(rid, Status.OK, planned, elapsed=time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 - each node catches its own errors
            r.log.warning("failed: %s", describe(exc))
            self.ctx.emit(ApplyFailed(str(rid), describe(exc)))
            return Outcome(
                rid, Status.FAILED, planned, error=describe(exc), elapsed=time.monotonic() - started
            )
        self.ctx.emit(ApplyDone(str(rid), planned.action.value))
        return Outcome(rid, Status.CHANGED, change, elapsed=time.monotonic() - started)

    async def mutate(self, r: Node, planned: Change) -> Change | None:
        """The apply of one node, with no walking around it: re-check right before mutating
        (refusing if the world moved away from ``planned``; ``Blocked`` if it is blocked
        now), apply from that observation, and fail unless apply's result diffs as NOOP.
        Returns the change made, or None when the re-check found nothing left to do."""
        rechecked = await self._recheck(r, planned)
        if rechecked is None:
            return None
        change, current = rechecked
        assert not change.blocked  # _recheck raised Blocked: never reaches apply
        r.log.info("%s: %s", change.action.value, change.reason or "applying")
        observed = await self._retry(str(r.id), lambda: r.apply(change, current, self.ctx))
        for h in r.hosts():
            self.ctx.invalidate(h)
        after = r.diff(observed)
        if not after.is_noop:
            fields = ", ".join(d.field for d in after.diffs) or after.reason
            raise KvmstateError(f"{r.id}: still not converged after apply ({fields})")
        return change

    async def _recheck(self, r: Node, planned: Change) -> tuple[Change, Any] | None:
        """Re-observe right before mutating: (the change to make now, the observation apply
        starts from). None = nothing left to do."""
        for h in r.hosts():
            self.ctx.invalidate(h)
        observed = await self._retry(str(r.id), lambda: r.recheck(self.ctx))
        fresh = self._gate(r.diff(observed))
        if fresh.is_noop:
            return None
        if fresh.action is not planned.action or {d.field for d in fresh.diffs} != {
            d.field for d in planned.diffs
        }:
            raise ConflictError(
                f"{r.id}: the host changed since the plan (planned {planned.action.value}, "
                f"now {fresh.action.value}); run plan again"
            )
        if fresh.blocked:
            raise Blocked(fresh.blocked)
        return fresh, observed
