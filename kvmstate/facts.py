"""Facts: a command plus a pure parser of its output, read in one batch per host.

A resource says which facts it needs (``Resource.facts``); before observing, the engine reads
the union of them on each host with ``Shell.run_many`` (one round trip), and ``FactCache.get``
serves them from memory until a mutation invalidates the host's cache.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from kvmstate.transport.base import CommandResult, Shell

T = TypeVar("T")


@dataclass(frozen=True)
class Fact(Generic[T]):
    """``argv`` is run on the host; ``parse(result)`` turns its output into a value.

    The parser gets the whole result (exit status included) so that "file missing" and
    "command failed" can be told apart; it raises ``ParseError`` on output it does not
    understand, never returns 'absent' for it.
    """

    name: str
    argv: tuple[str, ...]
    parse: Callable[[CommandResult], T]

    def key(self) -> tuple[str, tuple[str, ...]]:
        return (self.name, self.argv)


class FactCache:
    """Per-host cache of fact values for one run."""

    def __init__(self, shell: Shell) -> None:
        self.shell = shell
        self._results: dict[tuple[str, tuple[str, ...]], CommandResult] = {}
        self._lock = asyncio.Lock()

    async def prefetch(self, facts: Iterable[Fact[Any]]) -> None:
        async with self._lock:
            todo: dict[tuple[str, tuple[str, ...]], Fact[Any]] = {}
            for f in facts:
                if f.key() not in self._results:
                    todo[f.key()] = f
            if not todo:
                return
            argvs: Sequence[Sequence[str]] = [f.argv for f in todo.values()]
            results = await self.shell.run_many(argvs)
            for key, res in zip(todo, results, strict=True):
                self._results[key] = res

    async def get(self, fact: Fact[T]) -> T:
        if fact.key() not in self._results:
            await self.prefetch([fact])
        return fact.parse(self._results[fact.key()])

    def invalidate(self) -> None:
        self._results.clear()
