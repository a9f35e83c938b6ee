"""What ``kvmstate import`` hands each kind: the inventories of the hosts read, the spec data
imported so far, and what a base spec already declares. Each kind's ``import_into`` turns the
inventories into entries of its own section (``kvmstate.importer`` calls them in kind order,
so a mount sees the exports imported before it), or the kind says why it cannot be imported
(``Resource.cannot_import``)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvmstate import hostfacts, nfsexports, virt, virtxml
from kvmstate.spec import is_valid_name


@dataclass(frozen=True)
class PoolInfo:
    name: str
    type: str
    path: str
    active: bool
    autostart: bool


@dataclass(frozen=True)
class VolumeInfo:
    pool: str
    name: str
    state: virtxml.VolumeState
    owner: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class DomainInfo:
    name: str
    state: virt.DomainState
    devices: tuple[str, ...]  # device element names in the persistent XML


@dataclass(frozen=True)
class NetworkInfo:
    name: str
    state: virt.NetworkState


@dataclass
class Inventory:
    """Everything ``import`` reads on one host."""

    host: str
    address: str
    fstab: list[hostfacts.FstabEntry] = field(default_factory=list)
    mounts: list[hostfacts.MountEntry] = field(default_factory=list)
    exports: list[nfsexports.ExportLine] = field(default_factory=list)
    pools: list[PoolInfo] = field(default_factory=list)
    volumes: list[VolumeInfo] = field(default_factory=list)
    domains: list[DomainInfo] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # the values of the kinds' own import facts (``Resource.import_facts``), by fact name
    facts: dict[str, Any] = field(default_factory=dict)
    networks: list[NetworkInfo] = field(default_factory=list)


@dataclass
class Imported:
    """Spec data (plain dicts, in the spec's field order) plus what was left out and why."""

    data: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def resources(self) -> list[tuple[str, str]]:
        return [(kind, name) for kind, items in self.data.items() for name in items]

    def skip(self, host: str, what: str, why: str) -> None:
        self.notes.append(f"{host}: {what} left out: {why}")


@dataclass(frozen=True)
class Existing:
    """What a base spec already declares (raw data): imported duplicates of it are dropped."""

    base: Mapping[str, Any] = field(default_factory=dict)

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.base.get(name) or {})

    def names(self, name: str) -> frozenset[str]:
        return frozenset(self.section(name))


def unique(name: str, taken: Iterable[str]) -> str:
    """``name`` made a valid spec name that is not in ``taken`` (a -2, -3... suffix)."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "imported"
    taken = set(taken)
    out, n = base, 2
    while out in taken or not is_valid_name(out):
        out = f"{base}-{n}"
        n += 1
    return out
