"""What the engine needs of a resource kind and of the run context, as protocols.

The engine (graph, walker, reconcile) is typed against these and imports nothing of the
spec models, the transports or the kinds: ``kvmstate.resources.base.Resource`` and
``RunContext`` implement them. import-linter holds that line (``make lint``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from kvmstate.ids import ResourceId
from kvmstate.model import Change, Event


class Node(Protocol):
    """One resource, as the engine drives it."""

    @property
    def id(self) -> ResourceId: ...

    @property
    def name(self) -> str: ...

    @property
    def section(self) -> str: ...

    @property
    def uses_libvirt(self) -> bool: ...

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]: ...

    @property
    def absent(self) -> bool: ...

    def hosts(self) -> tuple[str, ...]: ...

    def depends_on(self) -> frozenset[ResourceId]: ...

    def reads(self) -> Sequence[tuple[str, Any]]: ...

    async def preconditions(self, ctx: Any) -> list[str]: ...

    async def observe(self, ctx: Any) -> Any: ...

    async def recheck(self, ctx: Any) -> Any: ...

    def diff(self, observed: Any) -> Change: ...

    async def apply(self, change: Change, observed: Any, ctx: Any) -> Any: ...

    @classmethod
    def arrange(cls, changes: tuple[Change, ...]) -> tuple[Change, ...]: ...


class NodeKind(Protocol):
    """A resource kind, as the graph builder expands it."""

    kind: str

    def expand(self, spec: Any) -> Iterable[Node]: ...

    def edges(
        self, resources: Mapping[ResourceId, Any]
    ) -> Iterable[tuple[ResourceId, ResourceId]]: ...


class Options(Protocol):
    @property
    def allow_destroy(self) -> bool: ...


class Facts(Protocol):
    async def prefetch(self, facts: Sequence[Any]) -> None: ...


class Libvirt(Protocol):
    async def connect(self) -> Any: ...


class Transports(Protocol):
    async def connect_all(self) -> None: ...


class Context(Protocol):
    """The run context, as the engine uses it (``resources.base.RunContext``)."""

    memo_enabled: bool

    @property
    def options(self) -> Options: ...

    @property
    def transports(self) -> Transports: ...

    def end_memo(self) -> None: ...

    def emit(self, event: Event) -> None: ...

    def invalidate(self, host: str) -> None: ...

    def facts(self, host: str) -> Facts: ...

    def libvirt(self, host: str) -> Libvirt: ...

    def host_offline(self, host: str) -> str | None:
        """Why ``host`` is not contacted in this run (known down), or None."""
        ...

    async def learn_down_hosts(self) -> None:
        """Find out, before observing, which hosts are known down (fenced earlier)."""
        ...
