"""Resource kinds, in dependency order: packages -> subvolume -> export -> mount -> pool ->
volume -> domain -> placement (each host's packages come before everything on that host)."""

from __future__ import annotations

from typing import Any

from kvmstate.resources.base import Resource
from kvmstate.resources.domain import DomainResource
from kvmstate.resources.export import ExportResource
from kvmstate.resources.mount import MountResource
from kvmstate.resources.packages import PackagesResource
from kvmstate.resources.placement import PlacementResource
from kvmstate.resources.pool import PoolResource
from kvmstate.resources.subvolume import SubvolumeResource
from kvmstate.resources.volume import VolumeResource

KINDS: tuple[type[Resource[Any]], ...] = (
    PackagesResource,
    SubvolumeResource,
    ExportResource,
    MountResource,
    PoolResource,
    VolumeResource,
    DomainResource,
    PlacementResource,
)

__all__ = [
    "KINDS",
    "DomainResource",
    "ExportResource",
    "MountResource",
    "PackagesResource",
    "PlacementResource",
    "PoolResource",
    "SubvolumeResource",
    "VolumeResource",
]
