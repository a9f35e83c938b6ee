"""Resource kinds, in dependency order: packages -> subvolume -> export -> mount -> pool ->
volume -> domain -> placement (each host's packages come before everything on that host). The
seed (a domain's cloud-init ISO) is listed after the domain whose ``cloud_init:`` it documents;
the graph puts it between its pool and its domain."""

from __future__ import annotations

from typing import Any

from kvmstate.resources.base import Resource
from kvmstate.resources.domain import DomainResource
from kvmstate.resources.export import ExportResource
from kvmstate.resources.fence import FenceResource
from kvmstate.resources.mount import MountResource
from kvmstate.resources.network import NetworkResource
from kvmstate.resources.packages import PackagesResource
from kvmstate.resources.placement import PlacementResource
from kvmstate.resources.pool import PoolResource
from kvmstate.resources.registry import Registry
from kvmstate.resources.seed import SeedResource
from kvmstate.resources.subvolume import SubvolumeResource
from kvmstate.resources.volume import VolumeResource

KINDS: tuple[type[Resource[Any]], ...] = (
    FenceResource,
    PackagesResource,
    SubvolumeResource,
    ExportResource,
    MountResource,
    PoolResource,
    VolumeResource,
    NetworkResource,
    DomainResource,
    SeedResource,
    PlacementResource,
)

#: The registry of the built-in kinds: the Spec model, loading, graph, prerequisites, import
#: and docs of exactly these kinds.
REGISTRY = Registry(KINDS)

#: Each kind's own requirement names (what ``KINDS`` declare).
KIND_NEEDS: dict[str, frozenset[str]] = {
    k.kind: frozenset(r.name for r in k.requires) for k in KINDS
}


def needs_for_host(spec: Any, host: str) -> set[str]:
    """The requirement names ``host`` needs for the resources the spec puts on it. Pure."""
    return REGISTRY.needs_for_host(spec, host)


__all__ = [
    "KINDS",
    "KIND_NEEDS",
    "REGISTRY",
    "DomainResource",
    "ExportResource",
    "FenceResource",
    "MountResource",
    "PackagesResource",
    "PlacementResource",
    "PoolResource",
    "SeedResource",
    "SubvolumeResource",
    "VolumeResource",
    "needs_for_host",
]
