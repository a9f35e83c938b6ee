"""Placement's scheduling: the memory a migration needs on its target, and the order of the
migrations of one apply (``arrange_migrations``, the placement kind's ``arrange``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvmstate.ids import ResourceId
from kvmstate.model import Change, Check, Payload
from kvmstate.resources.capacity import MiB, TargetMemory

__all__ = ["MiB", "Move", "TargetMemory", "arrange_migrations"]


@dataclass(frozen=True)
class Move(Payload):
    """What a migrate change carries to ``arrange`` and ``apply``."""

    source: str
    target: str
    live: bool
    memory: int  # the domain's memory, in bytes
    target_memory: TargetMemory | None = None  # the target's, from the pre-flight


def _move(c: Change) -> Move:
    assert isinstance(c.data, Move), c
    return c.data


def arrange_migrations(changes: tuple[Change, ...]) -> tuple[Change, ...]:
    """Order live migrations so that no target runs short of memory on the way.

    Simulated one at a time on the pre-flight numbers: a migration whose target is too
    full now, but has room once domains leaving it are gone (two domains swapping hosts),
    waits for those (``Change.after``) instead of being blocked. One that fits in no order
    (a swap between two full hosts) stays blocked with that reason. At apply time every
    migration checks its target again under a per-host lock and reserves its memory there
    until it is done, so concurrent ones never add up past what the host has.
    """
    moves = {
        c.id: c
        for c in changes
        if isinstance(c.data, Move)
        and c.data.target_memory is not None
        and all(k.ok or k.name == "memory" for k in c.checks)
    }
    if not moves:
        return changes
    mem: dict[str, TargetMemory] = {}
    for c in moves.values():
        m = _move(c)
        assert m.target_memory is not None  # moves has only those
        mem.setdefault(m.target, m.target_memory)

    def shift(host: str, delta: int) -> None:
        if host in mem:
            m = mem[host]
            mem[host] = TargetMemory(m.available - delta, m.committed + delta, m.cap)

    def fits(c: Change) -> bool:
        return mem[_move(c).target].fits(_move(c).memory)

    done: list[Change] = []
    after: dict[ResourceId, tuple[ResourceId, ...]] = {}
    todo = sorted(moves.values(), key=lambda c: str(c.id))
    fits_now = {c.id for c in todo if fits(c)}
    while todo:
        ready = next((c for c in todo if fits(c)), None)
        if ready is None:
            break
        todo.remove(ready)
        move = _move(ready)
        if ready.id not in fits_now:
            after[ready.id] = tuple(d.id for d in done if _move(d).source == move.target)
        shift(move.target, move.memory)
        shift(move.source, -move.memory)
        done.append(ready)
    stuck = {c.id for c in todo}
    out = []
    for c in changes:
        dst = c.data.target if isinstance(c.data, Move) else None
        if c.id in after:
            first = after[c.id]
            verb = "leaves" if len(first) == 1 else "leave"
            leaving = f"{', '.join(a.name for a in first)} {verb} {dst}"
            checks = tuple(
                Check(k.name, True, f"{k.detail}: room once {leaving}") if k.name == "memory" else k
                for k in c.checks
            )
            c = replace(
                c,
                blocked=None,
                after=first,
                checks=checks,
                reason=f"{c.reason}, after {leaving}",
            )
        elif c.id in stuck and c.id not in fits_now:
            target_memory = _move(moves[c.id]).target_memory
            assert target_memory is not None and dst is not None
            now = target_memory.describe(dst, _move(c).memory)
            c = c.with_blocked(
                f"pre-flight failed: memory: no order of this apply's migrations makes room "
                f"for {c.id.name} on {dst} ({now}); move a domain off {dst} first "
                "(two full hosts swapping domains need a third host)"
            )
        elif c.id in stuck:
            c = c.with_blocked(
                f"pre-flight failed: memory: {dst} cannot take {c.id.name} "
                "together with the other migrations onto it"
            )
        out.append(c)
    return tuple(out)
