"""Resource kinds, in dependency order: subvolume -> export -> mount -> pool -> volume ->
domain -> placement."""

from __future__ import annotations

from typing import Any

from kvmstate.resources.base import Resource
from kvmstate.resources.domain import DomainResource
from kvmstate.resources.export import ExportResource
from kvmstate.resources.mount import MountResource
from kvmstate.resources.placement import PlacementResource
from kvmstate.resources.pool import PoolResource
from kvmstate.resources.subvolume import SubvolumeResource
from kvmstate.resources.volume import VolumeResource

KINDS: tuple[type[Resource[Any]], ...] = (
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
    "PlacementResource",
    "PoolResource",
    "SubvolumeResource",
    "VolumeResource",
]
