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

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvmstate.errors import ParseError
from kvmstate.facts import Fact
from kvmstate.ids import ResourceId
from kvmstate.model import Action, Change, Payload
from kvmstate.resources import prereq
from kvmstate.resources.base import Resource, RunContext
from kvmstate.resources.common import diff
from kvmstate.spec import Spec
from kvmstate.transport.base import CommandResult, Shell

log = logging.getLogger(__name__)

# apt can take a while on a host with slow mirrors; a stuck apt is still stopped
APT_TIMEOUT = 1800.0


@dataclass(frozen=True)
class PackagesState:
    installed: frozenset[str]  # those of the wanted packages that are installed


@dataclass(frozen=True)
class Install(Payload):
    """The packages apply installs (what the re-check found missing)."""

    missing: tuple[str, ...]


class PackagesResource(Resource[PackagesState]):
    kind = "packages"
    section = "hosts"
    cannot_import = (
        "a host has hundreds of Debian packages, installed for many reasons: list the ones "
        "kvmstate must keep installed under hosts.NAME.packages"
    )
    requires = (prereq.APT_GET,)

    def __init__(self, spec: Spec, name: str, host: str | None = None) -> None:
        super().__init__(spec, name, host or name)
        self.wanted: tuple[str, ...] = tuple(dict.fromkeys(spec.hosts[name].packages))
        self._fact = installed_fact(self.wanted)

    @classmethod
    def expand(cls, spec: Spec) -> Iterable[PackagesResource]:
        return [cls(spec, h, h) for h, host in spec.hosts.items() if host.packages]

    @classmethod
    def edges(
        cls, resources: Mapping[ResourceId, Resource[Any]]
    ) -> Iterable[tuple[ResourceId, ResourceId]]:
        # everything on a host stands on that host's packages (what its kind needs may come
        # from there: the engine observes it again once they are installed)
        for rid, r in resources.items():
            if isinstance(r, PackagesResource):
                continue
            for h in r.hosts():
                pkgs = ResourceId(cls.kind, h, h)
                if pkgs in resources:
                    yield pkgs, rid

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
            Install(tuple(missing)),
        )

    async def apply(
        self, change: Change, observed: PackagesState | None, ctx: RunContext
    ) -> PackagesState:
        assert isinstance(change.data, Install), change
        missing = list(change.data.missing)
        self.log.info("installing on %s: %s", self.name, " ".join(missing))
        # the engine re-read them right before this: no second dpkg query
        await apt_install(ctx.shell(self.name), missing, timeout=APT_TIMEOUT)
        ctx.invalidate(self.name)
        return await self.observe(ctx)


# --- apt ---------------------------------------------------------------------------------------

_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]{0,127}$")
_APT_ENV = ["env", "DEBIAN_FRONTEND=noninteractive"]
_NEEDS_UPDATE = ("Unable to locate package", "has no installation candidate")


def _validate(packages: Sequence[str]) -> list[str]:
    bad = [p for p in packages if not _PACKAGE_RE.match(p)]
    if bad:
        raise ValueError(f"invalid Debian package name(s): {', '.join(map(repr, bad))}")
    return list(dict.fromkeys(packages))


def dpkg_query(packages: Sequence[str]) -> tuple[str, ...]:
    """The argv that lists the dpkg status of ``packages`` (validated names)."""
    pkgs = _validate(packages)
    return ("dpkg-query", "-W", "-f", "${Package}\\t${db:Status-Abbrev}\\n", "--", *pkgs)


def parse_installed(res: CommandResult) -> frozenset[str]:
    """The installed ones (dpkg status ``ii``) in ``dpkg_query``'s output. Exit 1 is an
    answer (a name dpkg has never seen), anything else an error."""
    if res.exit_status not in (0, 1):
        raise ParseError(res.host, "dpkg-query", f"exit {res.exit_status}: {res.stderr.strip()}")
    installed = set()
    for line in res.stdout.splitlines():
        name, _, status = line.partition("\t")
        if status.startswith("ii"):
            installed.add(name.split(":")[0])  # drop an ":amd64" arch suffix
    return frozenset(installed)


def installed_fact(packages: Sequence[str]) -> Fact[frozenset[str]]:
    """Which of ``packages`` are installed: one ``dpkg-query``, batched with the host's reads."""
    argv = dpkg_query(packages)
    return Fact(f"dpkg:{','.join(argv[5:])}", argv, parse_installed)


async def missing_packages(shell: Shell, packages: Sequence[str]) -> list[str]:
    """Which of ``packages`` are not installed (dpkg status other than ``ii``)."""
    pkgs = _validate(packages)
    if not pkgs:
        return []
    installed = parse_installed(await shell.run(dpkg_query(pkgs), check=False))
    return [p for p in pkgs if p not in installed]


async def install_packages(
    shell: Shell, packages: Sequence[str], *, timeout: float | None = 1800.0
) -> list[str]:
    """Install the missing ones of ``packages`` with apt; the list actually installed.

    Runs ``apt-get update`` once and retries when apt does not know a package yet (fresh host,
    empty lists). Raises ``TransportError`` naming the host, the command and apt's error."""
    todo = await missing_packages(shell, packages)
    if not todo:
        log.debug("%s: packages already installed: %s", shell.host, ", ".join(packages))
        return []
    await apt_install(shell, todo, timeout=timeout)
    return todo


async def apt_install(
    shell: Shell, packages: Sequence[str], *, timeout: float | None = 1800.0
) -> None:
    """``apt-get install`` ``packages`` (known to be missing: no dpkg query first), with one
    ``apt-get update`` and a retry when apt does not know one yet."""
    todo = _validate(packages)
    install = [*_APT_ENV, "apt-get", "install", "-y", "--no-install-recommends", "--", *todo]
    log.info("%s: installing %s", shell.host, " ".join(todo))
    res = await shell.run(install, check=False, timeout=timeout)
    if not res.ok and any(s in res.stderr for s in _NEEDS_UPDATE):
        log.info("%s: apt-get update (package lists are stale)", shell.host)
        await shell.run([*_APT_ENV, "apt-get", "update"], timeout=timeout)
        res = await shell.run(install, check=False, timeout=timeout)
    res.check()
