"""Where a domain runs. A different host in the spec is a MIGRATE change with pre-flight checks.

Policies: ``pinned`` (always on ``host``), ``preferred`` (move back to ``host`` when the checks
pass; otherwise stay, NOOP with the reason), ``floating`` (any allowed host is fine). A host
with ``drain: true`` is never a target. ``resource`` is the kind (observe, pre-flight, diff,
apply), ``schedule`` orders the migrations of one apply within the hosts' memory, and
``migrate`` drives one live migration.
"""

from kvmstate.resources.capacity import reserved_memory
from kvmstate.resources.placement.resource import PlacementObs, PlacementResource
from kvmstate.resources.placement.schedule import Move, TargetMemory, arrange_migrations

__all__ = [
    "Move",
    "PlacementObs",
    "PlacementResource",
    "TargetMemory",
    "arrange_migrations",
    "reserved_memory",
]
