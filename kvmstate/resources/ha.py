"""HA restarts: where the HA domains of dead hosts start again, in priority order, within the
memory of the hosts that take them (the capacity model of migrations, ``capacity``).

A domain is restarted only when it runs nowhere that answers, every host that could not tell
is down (fenced) or is about to be fenced by this apply (it has a fence agent), and one of
its HA hosts has room. Higher ``ha.priority`` first; a host is given to one domain after the
other, so two domains never count the same free memory.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from kvmstate.model import Payload
from kvmstate.resources.base import RunContext
from kvmstate.resources.capacity import TargetMemory, target_memory
from kvmstate.resources.whereabouts import Whereabouts, domain_hosts, locate
from kvmstate.spec import HaPolicy


@dataclass(frozen=True)
class Restart(Payload):
    """An HA restart, carried on the domain's CREATE change to its apply."""

    target: str | None  # None: no host can take it (``why`` says why)
    why: str
    fence_first: tuple[str, ...] = ()  # unreachable hosts this apply fences first (agents)
    blocked: str | None = None  # why it cannot go on now


def _why_not_fenced(ctx: RunContext, host: str) -> str | None:
    """None when ``host`` (unreachable) will be fenced by this apply's fence node."""
    fence = ctx.spec.hosts[host].fence
    if fence is None:
        return (
            f"{host} has no fence agent (hosts.{host}.fence); once you made sure it is off: "
            f"kvmstate fence {host} SPEC --confirm-off"
        )
    return None


def _priority(ha: HaPolicy | None) -> int:
    return ha.priority if ha is not None else 0


async def _plan(ctx: RunContext) -> dict[str, Restart]:
    spec = ctx.spec
    wanted = [n for n, d in spec.domains.items() if d.ha is not None and d.state == "running"]
    where = dict(
        zip(
            wanted,
            await asyncio.gather(*(locate(ctx, n, domain_hosts(spec, n)) for n in wanted)),
            strict=True,
        )
    )
    needing = [n for n in wanted if not where[n].found and where[n].unavailable]
    needing.sort(key=lambda n: (-_priority(spec.domains[n].ha), n))
    taken: dict[str, int] = {}  # memory given to earlier restarts, per host
    out: dict[str, Restart] = {}
    for name in needing:
        d = spec.domains[name]
        w: Whereabouts = where[name]
        lost = ", ".join(sorted(w.unavailable))
        blocked = [b for h in sorted(w.unreachable) if (b := _why_not_fenced(ctx, h))]
        fence_first = tuple(sorted(w.unreachable))
        tried: list[str] = []
        target = None
        for h in d.ha_hosts():
            if h in w.unavailable or spec.hosts[h].drain or ctx.liveness.known(h):
                continue
            mem = await target_memory(ctx, h, name)
            extra = taken.get(h, 0)
            mem = TargetMemory(mem.available - extra, mem.committed + extra, mem.cap)
            if mem.fits(d.memory):
                target = h
                taken[h] = extra + d.memory
                break
            tried.append(mem.describe(h, d.memory))
        if target is None:
            why = (
                "no HA host has room: " + "; ".join(tried)
                if tried
                else f"no HA host answers (ha hosts: {', '.join(d.ha_hosts())})"
            )
            out[name] = Restart(None, why, fence_first, f"{name} cannot restart: {why}")
            continue
        why = f"HA restart on {target}: {lost} " + ("is" if len(w.unavailable) == 1 else "are")
        why += " down" if not w.unreachable else " unreachable"
        out[name] = Restart(target, why, fence_first, "; ".join(blocked) if blocked else None)
    return out


async def restarts(ctx: RunContext) -> dict[str, Restart]:
    """The HA restarts of this run, planned once (the first domain that asks) and then the
    same for every domain and for apply's re-check: {domain: Restart}."""
    state: dict[str, asyncio.Future[dict[str, Restart]]] = ctx.scratch("ha", dict)
    fut = state.get("plan")
    if fut is None:
        fut = state["plan"] = asyncio.ensure_future(_plan(ctx))
    result: dict[str, Restart] = await asyncio.shield(fut)
    return result


def replan(ctx: RunContext) -> None:
    """Forget the planned restarts (a host was fenced or answered again: plan them anew)."""
    state: dict[str, asyncio.Future[dict[str, Restart]]] = ctx.scratch("ha", dict)
    state.pop("plan", None)


@dataclass(frozen=True)
class Readiness:
    """What an HA domain's restart would rest on, shown beside its policy in every plan."""

    summary: str
    problem: str | None = None  # a second copy would be stopped by nothing but a person


async def readiness(ctx: RunContext, name: str) -> Readiness:
    """Fence agents where the domain may run, and whether its shared storage enforces locks
    (the lock probe, once per pool per run)."""
    from kvmstate.resources.lockprobe import pool_locks

    spec = ctx.spec
    d = spec.domains[name]
    hosts = d.allowed_hosts()
    agents = {h: f.program for h in hosts if (f := spec.hosts[h].fence) is not None}
    no_agent = [h for h in hosts if h not in agents]
    pools = list(
        dict.fromkeys(
            spec.volumes[k.volume].pool
            for k in d.disks
            if k.volume in spec.volumes and len(spec.pools[spec.volumes[k.volume].pool].hosts) > 1
        )
    )
    probes = [await pool_locks(ctx, p) for p in pools]
    fencing = (
        "fence agents on " + ", ".join(f"{h} ({p})" for h, p in agents.items())
        if agents
        else "no fence agent"
    )
    if no_agent and agents:
        fencing += f"; none on {', '.join(no_agent)} (a person confirms: kvmstate fence)"
    if not probes:
        locks = "storage locks: no shared pool"
    elif all(p.enforced for p in probes):
        locks = "storage locks: enforced between hosts"
    elif any(p.enforced is False for p in probes):
        locks = (
            "storage locks: NOT enforced between hosts ("
            + "; ".join(p.detail for p in probes if p.enforced is False)
            + ")"
        )
    else:
        locks = "storage locks: unknown (" + "; ".join(p.detail for p in probes) + ")"
    ha = d.ha
    summary = (
        f"ha: priority {ha.priority if ha else 0}, restarts on {', '.join(d.ha_hosts())}; "
        f"{fencing}; {locks}"
    )
    problem = None
    if no_agent and any(p.enforced is False for p in probes):
        problem = (
            f"HA of {name} rests on a person alone: {', '.join(no_agent)} has no fence agent "
            "and the shared storage does not enforce locks, so nothing would refuse a second "
            "copy; add hosts.HOST.fence"
        )
    return Readiness(summary, problem)
