"""Memory capacity on a host, as migrations and HA restarts both see it: MemAvailable net
of what moves in flight onto the host hold, and the host's ``max_guest_memory`` against the
memory of the domains running there."""

from __future__ import annotations

from dataclasses import dataclass

from kvmstate import hostfacts, virt
from kvmstate.resources.base import RunContext

MiB = 2**20


@dataclass(frozen=True)
class TargetMemory:
    """Memory on a migration's target, net of what migrations in flight onto it hold."""

    available: int  # MemAvailable minus in-flight reservations
    committed: int  # memory of the domains running there, in-flight reservations included
    cap: int | None  # the host's max_guest_memory

    def fits(self, need: int) -> bool:
        return need <= self.available and (self.cap is None or self.committed + need <= self.cap)

    def describe(self, host: str, need: int) -> str:
        text = f"{self.available // MiB} MiB available on {host}"
        if self.cap is not None:
            text += (
                f", guests there use {self.committed // MiB} of {self.cap // MiB} MiB "
                "(max_guest_memory)"
            )
        return f"{text}, guest needs {need // MiB} MiB"


def reserved_memory(ctx: RunContext) -> dict[str, dict[str, int]]:
    """Memory held on a host by moves in flight onto it (live migrations, HA restarts),
    {host: {domain: bytes}}: shared scratch state for one run."""
    return ctx.scratch("placement", dict)


async def target_memory(ctx: RunContext, dst: str, name: str) -> TargetMemory:
    """``dst``'s memory for domain ``name``: free and committed, net of the other moves in
    flight onto it."""
    held = {n: b for n, b in reserved_memory(ctx).get(dst, {}).items() if n != name}
    free = await ctx.facts(dst).get(hostfacts.MEM_AVAILABLE)
    cap = ctx.spec.hosts[dst].max_guest_memory
    committed = 0
    if cap is not None:
        lv = ctx.libvirt(dst)

        async def read() -> dict[str, int]:
            return await lv.run(virt.running_memory, await lv.connect())

        running = await ctx.memo(dst, ("running-memory",), read)
        committed = sum(b for n, b in running.items() if n not in held and n != name)
    reserved = sum(held.values())
    return TargetMemory(free - reserved, committed + reserved, cap)
