"""Where a domain is: the hosts it is defined on, and the hosts that could not tell.

Every host a domain may be on is asked (its allowed hosts and its disks' pools' hosts). A host
that does not answer is either **down** (fenced: known to be off, see ``liveness``) and holds
nothing that runs, or **unreachable** and may still run it: then nothing may start the
domain anywhere else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field

from kvmstate import virt
from kvmstate.errors import HostUnreachable
from kvmstate.resources.base import RunContext
from kvmstate.resources.liveness import HostState
from kvmstate.spec import Spec
from kvmstate.transport.libvirt import LibvirtUnreachable


def domain_hosts(spec: Spec, name: str) -> list[str]:
    d = spec.domains[name]
    hosts = list(d.allowed_hosts())
    for disk in d.disks:
        vol = spec.volumes.get(disk.volume)
        if vol is not None:
            hosts += spec.pools[vol.pool].hosts
    return list(dict.fromkeys(hosts))


@dataclass(frozen=True)
class Whereabouts:
    found: dict[str, virt.DomainState]
    unreachable: dict[str, HostState] = field(default_factory=dict)  # may hold it
    down: dict[str, HostState] = field(default_factory=dict)  # fenced: holds nothing running

    @property
    def unavailable(self) -> set[str]:
        return {*self.unreachable, *self.down}

    def unsure(self) -> str:
        """Why it may also be somewhere nobody could look ("" when every host answered or
        is known off)."""
        return "; ".join(s.describe() for s in self.unreachable.values())


async def locate(ctx: RunContext, name: str, hosts: Iterable[str]) -> Whereabouts:
    """Where the domain is defined, {host: state}, and which hosts could not tell."""
    hosts = list(hosts)

    async def one(h: str) -> virt.DomainState | HostState | None:
        known = ctx.liveness.known(h)
        if known is not None:
            return known

        async def read() -> virt.DomainState | None:
            lv = ctx.libvirt(h)
            return await lv.run(virt.observe_domain, await lv.connect(), name)

        try:
            return await ctx.memo(h, ("domain", name), read)
        except LibvirtUnreachable:
            raise  # libvirtd down on a host that answers: not a dead host
        except HostUnreachable:
            return await ctx.liveness.state(h)

    results = await asyncio.gather(*(one(h) for h in hosts))
    out = Whereabouts({})
    for h, r in zip(hosts, results, strict=True):
        if isinstance(r, HostState):
            if r.reachable:  # it answered the liveness probe: libvirt failed for a reason
                raise HostUnreachable(h, r.reason or "libvirt did not answer")
            (out.down if r.down else out.unreachable)[h] = r
        elif r is not None:
            out.found[h] = r
    return out
