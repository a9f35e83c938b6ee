"""Fencing: a dead host is powered off and confirmed off before its HA domains start elsewhere,
and its stale definitions are removed when it comes back, before anything starts there.

One ``fence`` node per host an HA domain may be on (none in a spec without ``ha:``). It comes
before every other resource of its host, and before the domains that may be there:

- host answers, never fenced: nothing to do.
- host does not answer, an HA domain waits for it, and it has a fence agent
  (``hosts.NAME.fence``): apply probes it for the ``grace`` period (it must stay unreachable
  all along), runs the agent's ``off`` command and polls ``status`` until it reports off;
  then the host is **down** for the rest of the run (its other resources are reported down,
  not failed) and its HA domains restart elsewhere. Never on a timeout alone.
- no fence agent: nothing is started elsewhere until a person confirms the host is off
  (``kvmstate fence HOST SPEC --confirm-off``, journaled).
- host answers again after being fenced: the definitions of domains now running elsewhere
  are undefined there (their disks are never touched), then the fence is forgotten. An HA
  domain never has libvirt's autostart flag, so the returning host did not start it; one
  that does run there (started by hand) AND elsewhere is reported, and nothing is changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kvmstate import spec as spec_models
from kvmstate import virt
from kvmstate.errors import RefusedError
from kvmstate.ids import ResourceId
from kvmstate.model import Action, Change, Message
from kvmstate.resources.base import DocSection, Resource, RunContext
from kvmstate.resources.common import diff
from kvmstate.resources.ha import replan, restarts
from kvmstate.resources.liveness import HostState
from kvmstate.resources.whereabouts import domain_hosts, locate
from kvmstate.spec import Spec


@dataclass(frozen=True)
class Stale:
    domain: str
    state: str  # its state on the returning host
    runs_on: str  # where it runs now


@dataclass(frozen=True)
class FenceObs:
    state: HostState
    waiting: tuple[str, ...] = ()  # HA domains whose restart waits for this host's fencing
    stale: tuple[Stale, ...] = ()  # on a host that came back after fencing


def fence_hosts(spec: Spec) -> list[str]:
    """The hosts fencing may concern: every host an HA domain may be on."""
    hosts: dict[str, None] = {}
    for name, d in spec.domains.items():
        if d.ha is not None:
            hosts.update(dict.fromkeys(domain_hosts(spec, name)))
    return [h for h in spec.hosts if h in hosts]


class FenceResource(Resource[FenceObs]):
    kind = "fence"
    section = "hosts"
    cannot_import = "a fence agent lives outside the host (its BMC or power switch)"
    docs = (
        DocSection(
            "hosts.NAME.fence",
            spec_models.Fence,
            "The fence agent that powers a dead host off (HA).",
        ),
    )

    def __init__(self, spec: Spec, name: str, host: str | None = None) -> None:
        super().__init__(spec, name, None)
        self.h = name

    @classmethod
    def expand(cls, spec: Spec) -> Iterable[FenceResource]:
        return [cls(spec, h) for h in fence_hosts(spec)]

    def hosts(self) -> tuple[str, ...]:
        # none: this node decides whether its host is up, so it must run when it is not
        return ()

    @classmethod
    def edges(
        cls, resources: Mapping[ResourceId, Resource[Any]]
    ) -> Iterable[tuple[ResourceId, ResourceId]]:
        fences = {r.name: rid for rid, r in resources.items() if isinstance(r, FenceResource)}
        for rid, r in resources.items():
            if isinstance(r, FenceResource):
                continue
            for h in r.hosts():
                if h in fences:
                    yield fences[h], rid

    async def observe(self, ctx: RunContext) -> FenceObs:
        st = await ctx.liveness.state(self.h)
        if st.reachable:
            if st.record is None:
                return FenceObs(st)
            return FenceObs(st, stale=tuple(await self._stale(ctx)))
        if st.down:
            return FenceObs(st)
        plan = await restarts(ctx)
        waiting = tuple(sorted(n for n, r in plan.items() if self.h in r.fence_first and r.target))
        return FenceObs(st, waiting)

    async def _stale(self, ctx: RunContext) -> list[Stale]:
        """Domains defined on this (returned) host and also found on another host."""
        lv = ctx.libvirt(self.h)
        conn = await lv.connect()
        out = []
        for name in self.spec.domains:
            if self.h not in domain_hosts(self.spec, name):
                continue
            here = await lv.run(virt.observe_domain, conn, name)
            if here is None:
                continue
            others = [h for h in domain_hosts(self.spec, name) if h != self.h]
            where = await locate(ctx, name, others)
            running = [h for h, s in where.found.items() if s.state == "running"]
            if running:
                out.append(Stale(name, here.state, running[0]))
        return out

    def diff(self, observed: FenceObs | None) -> Change:
        assert observed is not None
        st = observed.state
        fence = self.spec.hosts[self.h].fence
        if st.reachable:
            rec = st.record
            if rec is None:
                return self.noop(f"{self.h} answers")
            stale = observed.stale
            names = ", ".join(f"{s.domain} (runs on {s.runs_on})" for s in stale) or "none"
            ch = self.change(
                Action.UPDATE,
                [
                    diff("fenced", rec.describe(), None),
                    diff("stale definitions", [s.domain for s in stale], []),
                ],
                f"{self.h} is back after it was fenced: its stale definitions are undefined "
                f"(disks kept): {names}; then the fence is forgotten",
            )
            split = [s for s in stale if s.state != "shut-off"]
            if split:
                return ch.with_blocked(
                    "two copies: "
                    + "; ".join(
                        f"{s.domain} is {s.state} on {self.h} AND runs on {s.runs_on}"
                        for s in split
                    )
                    + f"; stop the stale copy on {self.h} by hand (virsh destroy), then apply"
                )
            return ch
        if st.down:
            return self.noop(st.describe())
        if not observed.waiting:
            return self.noop(f"{st.describe()}; no HA domain waits for it to be fenced")
        waiting = ", ".join(observed.waiting)
        if fence is None:
            return self.noop(
                f"{st.describe()}; HA domains {waiting} wait: it has no fence agent, a person "
                f"confirms it off: kvmstate fence {self.h} SPEC --confirm-off"
            )
        if st.what_if:
            return self.noop(st.describe())
        return self.change(
            Action.UPDATE,
            [diff("power", "unreachable", "off (fenced)")],
            f"{st.describe()}: HA domains {waiting} wait for it; apply checks it stays "
            f"unreachable for {fence.grace:g}s, powers it off with its fence agent "
            f"{fence.program} and waits until the agent reports it off",
        )

    async def apply(
        self, change: Change, observed: FenceObs | None, ctx: RunContext
    ) -> FenceObs | None:
        assert observed is not None
        if observed.state.reachable:
            await self._clean_up(ctx, observed)
        else:
            await self._fence(ctx)
        replan(ctx)
        return await self.observe(ctx)

    async def _fence(self, ctx: RunContext) -> None:
        fence = self.spec.hosts[self.h].fence
        assert fence is not None
        why = await ctx.liveness.confirm_unreachable(self.h, fence.grace)
        if why is None:
            ctx.liveness.forget(self.h)
            raise RefusedError(
                f"{self.h} answered again during its {fence.grace:g}s grace period: not fenced, "
                "nothing started elsewhere"
            )
        self.log.warning("%s: unreachable (%s); fencing with %s", self.h, why, fence.program)
        record = await ctx.liveness.fence(self.h)
        ctx.emit(Message(f"{self.h}: {record.describe()}"))

    async def _clean_up(self, ctx: RunContext, observed: FenceObs) -> None:
        lv = ctx.libvirt(self.h)
        conn = await lv.connect()
        for s in observed.stale:
            now = await lv.run(virt.observe_domain, conn, s.domain)
            if now is None:
                continue
            if now.state != "shut-off":  # never destroy here: the re-check saw it off
                raise RefusedError(
                    f"{s.domain} is {now.state} on {self.h} and runs on {s.runs_on}: not touched"
                )
            self.log.warning(
                "%s: undefining the stale definition of %s (it runs on %s; disks kept)",
                self.h,
                s.domain,
                s.runs_on,
            )
            await lv.run(virt.undefine_domain, conn, s.domain)
            ctx.emit(
                Message(f"{self.h}: stale definition of {s.domain} removed (runs on {s.runs_on})")
            )
        ctx.liveness.ledger.forget(self.h)
        ctx.liveness.forget(self.h)
