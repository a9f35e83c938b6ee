"""The resource contract every kind implements, and the context the engine hands it.

    observe(ctx)                   read-only; a small frozen observed state, or None = absent
    diff(observed)                 pure: compares only the fields the spec sets; a Change
    apply(change, observed, ctx)   mutates, starting from ``observed`` (the engine's re-check,
                                   made right before), then observes once and returns that

There is no dry-run flag: plan = observe + diff; apply is the only mutating path. Two
observations per mutated node: the engine's re-check and apply's result. The engine re-diffs
what apply returns and fails the node unless it is NOOP. A blocked change never reaches apply.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel

from kvmstate.checks import Finding
from kvmstate.facts import Fact, FactCache
from kvmstate.ids import ResourceId
from kvmstate.model import Action, Change, Event, FieldDiff, Payload
from kvmstate.resources.imports import Existing, Imported, Inventory
from kvmstate.resources.liveness import FenceLedger, Liveness
from kvmstate.resources.prereq import Missing, Requirement, probe_fact
from kvmstate.spec import Spec
from kvmstate.transport.base import Libvirt, Shell, Transports

ObsT = TypeVar("ObsT")
T = TypeVar("T")


@dataclass(frozen=True)
class DocSection:
    """One block of the spec reference: where it sits in a spec, its model, a sentence."""

    where: str
    model: type[BaseModel]
    text: str


@dataclass
class Options:
    """Run-wide switches that change what apply may do."""

    allow_destroy: bool = False
    adopt: bool = False
    # restart running guests whose config changes wait for a restart (graceful shutdown,
    # then start): `apply --restart-pending`
    restart_pending: bool = False
    # `plan --host-down HOST`: treat these hosts as down, without contacting them (what-if)
    assume_down: frozenset[str] = frozenset()
    # the fenced hosts of this cluster (``liveness.FenceLedger``); None: in memory only
    fence_ledger: FenceLedger | None = field(default=None, compare=False)


class RunContext:
    """What a resource gets to do its work: transports, per-host fact caches, options,
    named semaphores (per-host limits), and an event sink for progress."""

    def __init__(
        self,
        spec: Spec,
        transports: Transports,
        options: Options | None = None,
        events: Callable[[Event], None] | None = None,
    ) -> None:
        self.spec = spec
        self.transports = transports
        self.options = options or Options()
        self._events = events
        self._facts: dict[str, FactCache] = {}
        self._semaphores: dict[str, asyncio.Semaphore] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._scratch: dict[str, Any] = {}
        self._memo: dict[tuple[str, Hashable], asyncio.Future[Any]] = {}
        self.memo_enabled = False
        self.liveness = Liveness(
            spec, transports, self.options.fence_ledger, self.options.assume_down
        )

    def host_offline(self, host: str) -> str | None:
        """Why ``host`` is not contacted in this run (down: fenced now, or a what-if)."""
        return self.liveness.offline(host)

    async def learn_down_hosts(self) -> None:
        """Hosts fenced earlier (in the ledger) are probed once: still unreachable = down."""
        await self.liveness.learn()

    def shell(self, host: str) -> Shell:
        return self.transports.shell(host)

    def libvirt(self, host: str) -> Libvirt:
        return self.transports.libvirt(host)

    def facts(self, host: str) -> FactCache:
        cache = self._facts.get(host)
        if cache is None:
            cache = self._facts[host] = FactCache(self.transports.shell(host))
        return cache

    def invalidate(self, host: str) -> None:
        if host in self._facts:
            self._facts[host].invalidate()
        for key in [k for k in self._memo if k[0] == host]:
            del self._memo[key]

    async def memo(self, host: str, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        """Share one read between resources during a plan (the domain and its placement both
        look the domain up on every host). Outside a plan, or after ``invalidate(host)``,
        every call reads again."""
        if not self.memo_enabled:
            return await fn()
        fut = self._memo.get((host, key))
        if fut is None:
            fut = self._memo[(host, key)] = asyncio.ensure_future(fn())
        result: T = await asyncio.shield(fut)
        return result

    def end_memo(self) -> None:
        self.memo_enabled = False
        self._memo.clear()

    def scratch(self, kind: str, factory: Callable[[], T]) -> T:
        """A kind's own state for the length of this run (made by ``factory`` on first use):
        what one kind shares between its resources, and no other kind sees."""
        if kind not in self._scratch:
            self._scratch[kind] = factory()
        value: T = self._scratch[kind]
        return value

    def semaphore(self, key: str, limit: int) -> asyncio.Semaphore:
        sem = self._semaphores.get(key)
        if sem is None:
            sem = self._semaphores[key] = asyncio.Semaphore(limit)
        return sem

    def lock(self, key: str) -> asyncio.Lock:
        lk = self._locks.get(key)
        if lk is None:
            lk = self._locks[key] = asyncio.Lock()
        return lk

    def emit(self, event: Event) -> None:
        if self._events is not None:
            self._events(event)


class Resource(ABC, Generic[ObsT]):
    """One managed thing on one host (or, for domains, on whichever host has it)."""

    kind: ClassVar[str]
    # the spec section its entries come from (for error locations, docs, import), and the
    # model of one entry when this kind owns the section (None: it shares another kind's,
    # as placement shares ``domains``). A section the Spec model lacks is added by the
    # registry (``Registry.spec_model``).
    section: ClassVar[str]
    section_model: ClassVar[type[BaseModel] | None] = None
    # its reference docs: (where in the spec, model, one line)
    docs: ClassVar[tuple[DocSection, ...]] = ()
    # why ``kvmstate import`` cannot bring this kind in; None when ``import_into`` does
    cannot_import: ClassVar[str | None] = None
    # what it needs on each of its hosts (commands, devices, daemons), with their packages
    requires: ClassVar[tuple[Requirement, ...]] = ()
    # observe talks to libvirt on hosts(): the engine opens those connections early, beside
    # the batched fact reads, so the libvirt handshake is off the critical path
    uses_libvirt: ClassVar[bool] = False

    def __init__(self, spec: Spec, name: str, host: str | None = None) -> None:
        self.spec = spec
        self.name = name
        self.host = host
        self.id = ResourceId(self.kind, name, host)
        self.log = logging.LoggerAdapter(
            logging.getLogger(f"kvmstate.resources.{self.kind}"), {"resource": str(self.id)}
        )

    # --- graph -------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def expand(cls, spec: Spec) -> Iterable[Resource[Any]]:
        """Every resource of this kind the spec asks for."""

    def depends_on(self) -> frozenset[ResourceId]:
        return frozenset()

    @classmethod
    def import_facts(cls) -> Sequence[Fact[Any]]:
        """What ``kvmstate import`` reads on each host for this kind, beyond what every
        inventory has (fstab, mountinfo, exports, libvirt's objects); the values reach
        ``import_into`` in ``Inventory.facts[fact.name]``. Default: nothing."""
        return ()

    @classmethod
    def import_into(cls, invs: Sequence[Inventory], out: Imported, existing: Existing) -> None:
        """``kvmstate import``: add to ``out.data[cls.section]`` an entry for each thing of
        this kind the hosts have (in the shapes ``diff`` compares, so that a plan of the
        result shows no change), or a note naming what was left out and why; never a
        guess. A kind that cannot be imported sets ``cannot_import`` instead."""
        raise NotImplementedError(f"{cls.kind}: {cls.cannot_import or 'no import mapping'}")

    @classmethod
    def check(cls, spec: Any) -> Iterable[Finding]:
        """Cross-reference checks of this kind's section, beyond its model's own validation:
        (location, message, "error" | "warning"). Default: none."""
        return ()

    @classmethod
    def edges(
        cls, resources: Mapping[ResourceId, Resource[Any]]
    ) -> Iterable[tuple[ResourceId, ResourceId]]:
        """Edges (dependency, dependent) this kind draws over the whole graph, beyond each
        resource's ``depends_on``: for what no single dependent can name. Default: none."""
        return ()

    @property
    def absent(self) -> bool:
        """True when the spec says this resource must not exist (``state: absent``)."""
        return False

    def hosts(self) -> tuple[str, ...]:
        """Hosts this resource reads or changes (for per-host concurrency limits)."""
        return (self.host,) if self.host else ()

    def needs(self) -> dict[str, frozenset[Requirement]]:
        """What it needs, host by host: by default the kind's ``requires`` on each of its
        ``hosts()``; a kind overrides this when one resource needs more or less somewhere (a
        domain needs QEMU only where it may run, /dev/kvm only for type kvm)."""
        return {h: frozenset(self.requires) for h in self.hosts()}

    # what every resource of the run needs on each host (set by ``Registry.graph``): then all
    # resources on a host share ONE probe of the union, as one command of the host's batch
    host_needs: Mapping[str, frozenset[Requirement]] | None = None

    def _probes(self) -> list[tuple[str, frozenset[str], Fact[tuple[Missing, ...]]]]:
        """(host, the names this resource needs there, the probe fact read for them)."""
        out = []
        for h, reqs in self.needs().items():
            mine = frozenset(r.name for r in reqs if r.kind != "daemon")
            if not mine:
                continue
            shared = self.host_needs.get(h, reqs) if self.host_needs is not None else reqs
            out.append((h, mine, probe_fact(h, [r for r in shared if r.kind != "daemon"])))
        return out

    def reads(self) -> list[tuple[str, Fact[Any]]]:
        """Everything the plan reads for this resource, batched per host by the engine: its
        ``facts()`` and the probe of what it needs on each host."""
        return [*self.facts(), *((h, fact) for h, _, fact in self._probes())]

    async def preconditions(self, ctx: RunContext) -> list[str]:
        """What its hosts lack of what it needs, each said with the fix (read from the
        batched probe; a failing probe is left to observe, which meets the host again)."""
        out = []
        for h, mine, probe in self._probes():
            if ctx.host_offline(h):
                continue  # a down host is not contacted
            try:
                lacking = await ctx.facts(h).get(probe)
            except Exception as exc:  # noqa: BLE001 - the host's own reads report it
                self.log.debug("prerequisites of %s unknown: %s", h, exc)
                continue
            out += [self._lacks(ctx, m) for m in lacking if m.need in mine]
        return out

    def _lacks(self, ctx: RunContext, m: Missing) -> str:
        host = ctx.spec.hosts.get(m.host)
        if host is not None and m.package and m.package in host.packages:
            return f"{m}; packages:{m.host} installs it first, then this is observed again"
        return str(m)

    @classmethod
    def arrange(cls, changes: tuple[Change, ...]) -> tuple[Change, ...]:
        """Look at every planned change of this kind together (after all are observed) and
        return them, possibly ordered with ``Change.after`` or blocked. Default: as they are."""
        return changes

    # --- observe / diff / apply ------------------------------------------------------------------
    def facts(self) -> Iterable[tuple[str, Fact[Any]]]:
        """(host, fact) pairs observe will read; the engine batches them per host."""
        return ()

    @abstractmethod
    async def observe(self, ctx: RunContext) -> ObsT | None: ...

    async def recheck(self, ctx: RunContext) -> ObsT | None:
        """What apply observes right before it mutates (the engine then compares it with the
        plan). Default: ``observe``. A kind may leave out a check that its ``apply`` makes
        again itself, under a lock, just after."""
        return await self.observe(ctx)

    @abstractmethod
    def diff(self, observed: ObsT | None) -> Change: ...

    @abstractmethod
    async def apply(self, change: Change, observed: ObsT | None, ctx: RunContext) -> ObsT | None:
        """Make the spec true, from ``observed`` (what the engine's re-check just read: do not
        observe again before mutating), and return one fresh observation of the result."""

    # --- helpers for subclasses ------------------------------------------------------------------
    def change(
        self,
        action: Action,
        diffs: Iterable[FieldDiff] = (),
        reason: str = "",
        data: Payload | None = None,
    ) -> Change:
        return Change(self.id, action, tuple(diffs), reason, data=data)

    def noop(
        self, reason: str, diffs: Iterable[FieldDiff] = (), data: Payload | None = None
    ) -> Change:
        return Change(self.id, Action.NOOP, tuple(diffs), reason, data=data)
