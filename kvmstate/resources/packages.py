"""Debian packages a host must have (``hosts.NAME.packages``), installed with apt.

One resource per host that lists packages. Observed with one ``dpkg-query`` in the host's
batched read; applied with ``apt-get install -y --no-install-recommends`` of the missing ones
only (``apt-get update`` once, when apt does not know one of them yet).

Every other resource on the host depends on it (the graph adds those edges), so what a kind
needs can come from here: a resource that could not be observed at plan time because its host
lacks a command (``btrfs``, ``exportfs``...) is observed again, in the same apply, right after
this resource installed the package that provides it.

Packages are never removed: a name dropped from the list stays installed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kvmstate.facts import Fact
from kvmstate.model import Action, Change
from kvmstate.resources.base import Resource, RunContext
from kvmstate.resources.common import diff
from kvmstate.spec import Spec
from kvmstate.transport import prereq

# apt can take a while on a host with slow mirrors; a stuck apt is still stopped
APT_TIMEOUT = 1800.0


@dataclass(frozen=True)
class PackagesState:
    installed: frozenset[str]  # those of the wanted packages that are installed


class PackagesResource(Resource[PackagesState]):
    kind = "packages"

    def __init__(self, spec: Spec, name: str, host: str | None = None) -> None:
        super().__init__(spec, name, host or name)
        self.wanted: tuple[str, ...] = tuple(dict.fromkeys(spec.hosts[name].packages))
        self._fact = prereq.installed_fact(self.wanted)

    @classmethod
    def expand(cls, spec: Spec) -> Iterable[PackagesResource]:
        return [cls(spec, h, h) for h, host in spec.hosts.items() if host.packages]

    def facts(self) -> Iterable[tuple[str, Fact[frozenset[str]]]]:
        return [(self.name, self._fact)]

    async def observe(self, ctx: RunContext) -> PackagesState:
        return PackagesState(await ctx.facts(self.name).get(self._fact))

    def diff(self, observed: PackagesState | None) -> Change:
        installed = observed.installed if observed is not None else frozenset()
        missing = [p for p in self.wanted if p not in installed]
        if not missing:
            return self.noop(f"installed: {' '.join(self.wanted)}")
        present = [p for p in self.wanted if p in installed]
        return self.change(
            Action.UPDATE,
            [diff("installed", " ".join(present) or "(none)", " ".join(self.wanted))],
            f"apt-get install {' '.join(missing)}",
            missing=tuple(missing),
        )

    async def apply(
        self, change: Change, observed: PackagesState | None, ctx: RunContext
    ) -> PackagesState:
        missing = list(change.data["missing"])
        self.log.info("installing on %s: %s", self.name, " ".join(missing))
        # the engine re-read them right before this: no second dpkg query
        await prereq.apt_install(ctx.shell(self.name), missing, timeout=APT_TIMEOUT)
        ctx.invalidate(self.name)
        return await self.observe(ctx)
