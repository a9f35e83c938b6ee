"""A generic walker over a directed acyclic graph (in the spirit of Terraform's ``internal/dag``).

It knows nothing of kvmstate: a node is any hashable key, a visit is any coroutine, an outcome
is any value, and whether an outcome "succeeded" is the caller's predicate. It imports only
the standard library. The reconcile layer (plan, re-check, apply, rounds, retries) is built
on top of it.

Rules of a walk:

* a node is visited once every one of its dependencies and of its ``after`` predecessors
  has finished;
* a node with a dependency whose outcome did not succeed is not visited: ``skip(node,
  cause)`` makes its outcome, where ``cause`` is the ROOT cause (the node up the chain that
  did not succeed, never an intermediate skipped node; ``blame`` may redirect it). When
  several dependencies did not succeed, the first one in edge order is named. Independent
  branches go on;
* ``after`` edges order without depending: B waits until A has finished, whatever A's
  outcome, and A's failure or skip does not skip B;
* concurrency keys: at most ``limits[key]`` visits holding ``key`` run at once. A node takes
  its keys one by one in a fixed order (so two nodes never wait on each other), and the
  nodes waiting for a key are served in rank order;
* nodes that become ready together start in rank order (the order the nodes were given, or
  ``rank``): a walk whose visits finish in the same order starts its visits in the same order;
* an exception escaping a visit, or the walk itself being cancelled (Ctrl-C is a
  cancellation under ``asyncio.run``), cancels the visits still running, waits for them to
  end, and propagates. A visit is expected to turn its own errors into outcomes;
* a cycle (over dependency and ``after`` edges together) raises :class:`CycleError` naming
  one cycle, before anything is visited.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

N = TypeVar("N", bound=Hashable)
Out = TypeVar("Out")

__all__ = ["CycleError", "Dag", "walk"]


class CycleError(ValueError):
    """The graph has a cycle; ``cycle`` lists its nodes in edge order (the first node is
    not repeated at the end)."""

    def __init__(self, cycle: Sequence[Hashable]) -> None:
        self.cycle = tuple(cycle)
        path = " -> ".join(str(n) for n in (*self.cycle, self.cycle[0]))
        super().__init__(f"dependency cycle: {path}")


class Dag(Generic[N]):
    """Nodes and dependency edges (dependency -> dependent), with a rank for stable order.

    ``rank`` (optional) is a sort key; nodes with equal rank keep the order they were given
    in. Edges keep their order (the first failed dependency of a node is the first in edge
    order) and duplicates are dropped. An edge to an unknown node is a ``ValueError``; a
    self-loop is a :class:`CycleError`. Longer cycles are found by :meth:`order` and
    :func:`walk` (together with the walk's ``after`` edges).

    Inside, a node is its position in rank order: walking touches only integers (a node's
    own ``__hash__``, a dataclass's say, is called once per node, not once per edge).
    """

    __slots__ = ("_deps", "_index", "_nodes", "_succ")

    def __init__(
        self,
        nodes: Iterable[N],
        edges: Iterable[tuple[N, N]] = (),
        *,
        rank: Callable[[N], Any] | None = None,
    ) -> None:
        given = list(dict.fromkeys(nodes))
        if rank is not None:
            given.sort(key=rank)
        self._nodes: tuple[N, ...] = tuple(given)
        self._index: dict[N, int] = {n: i for i, n in enumerate(given)}
        deps: list[dict[int, None]] = [{} for _ in given]
        succ: list[dict[int, None]] = [{} for _ in given]
        for u, v in self._pairs(edges):
            deps[v][u] = None
            succ[u][v] = None
        self._deps: tuple[tuple[int, ...], ...] = tuple(tuple(d) for d in deps)
        self._succ: tuple[tuple[int, ...], ...] = tuple(tuple(d) for d in succ)

    @property
    def nodes(self) -> tuple[N, ...]:
        """Every node, in rank order."""
        return self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node: object) -> bool:
        return node in self._index

    def rank(self, node: N) -> int:
        """The node's position in rank order."""
        return self._index[node]

    def dependencies(self, node: N) -> tuple[N, ...]:
        return tuple(self._nodes[i] for i in self._deps[self._index[node]])

    def dependents(self, node: N) -> tuple[N, ...]:
        return tuple(self._nodes[i] for i in self._succ[self._index[node]])

    def order(self, after: Iterable[tuple[N, N]] = ()) -> list[N]:
        """A stable topological order: dependencies (and ``after`` predecessors) first, ties
        broken by rank. Raises :class:`CycleError` on a cycle."""
        return [self._nodes[i] for i in self._order(self._pairs(after))]

    def _pairs(self, edges: Iterable[tuple[N, N]]) -> list[tuple[int, int]]:
        """Edges as positions; an unknown node is a ValueError, a self-loop a CycleError."""
        index = self._index
        out: list[tuple[int, int]] = []
        for u, v in edges:
            iu = index.get(u)
            iv = index.get(v)
            if iu is None or iv is None:
                missing = u if iu is None else v
                raise ValueError(f"edge {u} -> {v}: {missing} is not a node of the graph")
            if iu == iv:
                raise CycleError([u])
            out.append((iu, iv))
        return out

    def _order(self, after: Sequence[tuple[int, int]]) -> list[int]:
        succ: list[list[int]] = [list(s) for s in self._succ]
        indeg = [len(d) for d in self._deps]
        for u, v in after:
            succ[u].append(v)
            indeg[v] += 1
        heap = [i for i, d in enumerate(indeg) if d == 0]
        out: list[int] = []
        while heap:
            i = heapq.heappop(heap)
            out.append(i)
            for j in succ[i]:
                indeg[j] -= 1
                if indeg[j] == 0:
                    heapq.heappush(heap, j)
        if len(out) < len(self._nodes):
            cycle = _find_cycle(succ, [i for i, d in enumerate(indeg) if d > 0])
            raise CycleError([self._nodes[i] for i in cycle])
        return out


def _find_cycle(succ: Sequence[Sequence[int]], candidates: Sequence[int]) -> list[int]:
    """One cycle among ``candidates`` (the nodes a topological sort could not place; every
    one of them lies on a cycle or downstream of one), by an iterative depth-first search."""
    alive = set(candidates)
    state: dict[int, int] = {}  # 1 = on the current path, 2 = done
    for start in candidates:
        if start in state:
            continue
        path = [start]
        state[start] = 1
        stack = [iter(succ[start])]
        while stack:
            for m in stack[-1]:
                if m not in alive:
                    continue
                if state.get(m) == 1:
                    return path[path.index(m) :]
                if m not in state:
                    state[m] = 1
                    path.append(m)
                    stack.append(iter(succ[m]))
                    break
            else:
                stack.pop()
                state[path.pop()] = 2
    raise AssertionError("no cycle among the nodes a topological sort could not place")


async def walk(
    dag: Dag[N],
    visit: Callable[[N], Awaitable[Out]],
    *,
    succeeded: Callable[[Out], bool],
    skip: Callable[[N, N], Out],
    after: Iterable[tuple[N, N]] = (),
    keys: Mapping[N, Iterable[Hashable]] | None = None,
    limits: Mapping[Hashable, int] | None = None,
    default_limit: int | None = None,
    blame: Callable[[N, Out], N] | None = None,
    into: dict[N, Out] | None = None,
) -> dict[N, Out]:
    """Visit every node of ``dag`` (see the module's rules); returns every node's outcome,
    in rank order.

    visit:     ``await visit(node)`` gives the node's outcome.
    succeeded: whether an outcome lets the node's dependents run.
    skip:      ``skip(node, cause)`` is the outcome of a node that is not visited because
               ``cause`` (the root cause) did not succeed.
    after:     extra (before, after) pairs: ordering only, not dependency.
    keys:      a node's concurrency keys; ``limits[key]`` (else ``default_limit``; None =
               no limit) visits holding a key run at once.
    blame:     ``blame(node, outcome)`` names the node a failed node's dependents give as
               their cause (a node of the graph; default: the node itself), e.g. the node
               a blocked one waited for.
    into:      a dict filled with each outcome as its node finishes: a visit may read the
               outcome of any of its dependencies and ``after`` predecessors from it.
    """
    walker = _Walk(dag, visit, succeeded, skip, after, keys or {}, limits or {}, default_limit)
    walker.blame = blame
    if into is not None:
        walker.outcomes = into
    return await walker.run()


_NONE = -1


class _Walk(Generic[N, Out]):
    """The state of one walk, over node positions. Everything runs on the event loop's
    thread: visits are tasks, and each task's done-callback records the outcome, updates
    the counters and starts what became ready."""

    def __init__(
        self,
        dag: Dag[N],
        visit: Callable[[N], Awaitable[Out]],
        succeeded: Callable[[Out], bool],
        skip: Callable[[N, N], Out],
        after: Iterable[tuple[N, N]],
        keys: Mapping[N, Iterable[Hashable]],
        limits: Mapping[Hashable, int],
        default_limit: int | None,
    ) -> None:
        self.dag = dag
        self.nodes = dag.nodes
        self.visit = visit
        self.succeeded = succeeded
        self.skip = skip
        self.blame: Callable[[N, Out], N] | None = None
        self.outcomes: dict[N, Out] = {}
        n = len(dag)
        self.after = list(dict.fromkeys(dag._pairs(after)))
        self.after_succ: list[list[int]] = [[] for _ in range(n)]
        self.after_left = [0] * n
        for u, v in self.after:
            self.after_succ[u].append(v)
            self.after_left[v] += 1
        self.deps_left = [len(d) for d in dag._deps]
        self.finished = bytearray(n)
        # a node that did not succeed -> the root cause it passes on (a position), else _NONE
        self.cause = [_NONE] * n
        # concurrency: each node's limited keys (as positions in one global order), the free
        # slots of each key, how many of its keys a node holds, and per key the waiting nodes
        self.node_keys: list[tuple[int, ...]] = [()] * n
        self.free: list[int] = []
        self.queue: list[list[int]] = []
        self.held = [0] * n
        if keys:
            self._keys(keys, limits, default_limit)
        self.running: dict[asyncio.Future[Out], int] = {}
        self.left = n
        self.done: asyncio.Future[None] | None = None
        self.aborted = False

    def _keys(
        self,
        keys: Mapping[N, Iterable[Hashable]],
        limits: Mapping[Hashable, int],
        default_limit: int | None,
    ) -> None:
        position: dict[Hashable, int] = {}
        for i, node in enumerate(self.nodes):
            mine: set[int] = set()
            for k in keys.get(node, ()):
                p = position.get(k)
                if p is None:
                    limit = limits.get(k, default_limit)
                    if limit is None:
                        continue
                    if limit < 1:
                        raise ValueError(f"concurrency limit of {k} is {limit}; it must be >= 1")
                    p = position[k] = len(self.free)
                    self.free.append(limit)
                    self.queue.append([])
                mine.add(p)
            if mine:
                self.node_keys[i] = tuple(sorted(mine))

    # --- the walk ------------------------------------------------------------------------------
    async def run(self) -> dict[N, Out]:
        self.dag._order(self.after)  # a cycle is an error before anything is visited
        self.done = asyncio.get_running_loop().create_future()
        try:
            self._release_ready([i for i in range(len(self.nodes)) if self._ready(i)])
            if self.left:
                await self.done
        except BaseException:
            await self._cancel_running()
            raise
        return {node: self.outcomes[node] for node in self.nodes}

    def _ready(self, i: int) -> bool:
        return self.deps_left[i] == 0 and self.after_left[i] == 0

    async def _cancel_running(self) -> None:
        self.aborted = True
        tasks = list(self.running)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for t in tasks:  # retrieve every result, so none is reported as "never retrieved"
            if not t.cancelled():
                t.exception()

    def _abort(self, exc: BaseException) -> None:
        self.aborted = True
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)

    def _release_ready(self, ready: list[int]) -> None:
        """Start (or queue for their keys) nodes whose dependencies and ``after``
        predecessors have all finished, skipping those with a dependency that failed."""
        work = ready
        while work:
            # a node can come twice (its last dependency and its last ``after`` predecessor
            # finishing together): the first is the one that counts
            work = sorted(set(work))
            start: list[int] = []
            nxt: list[int] = []
            for i in work:
                if self.finished[i]:
                    continue
                cause = self._failed_dependency(i)
                if cause != _NONE:
                    outcome = self.skip(self.nodes[i], self.nodes[cause])
                    nxt.extend(self._finish(i, outcome, cause))
                elif self._ready(i) and self._acquire(i):
                    start.append(i)
            for i in start:
                self._start(i)
            work = nxt

    def _failed_dependency(self, i: int) -> int:
        cause = self.cause
        for d in self.dag._deps[i]:
            if cause[d] != _NONE:
                return cause[d]
        return _NONE

    def _finish(self, i: int, outcome: Out, cause: int) -> list[int]:
        """Record node ``i``'s outcome (``cause``: the root cause it passes on, _NONE if it
        succeeded); returns the nodes this made ready or skippable."""
        self.outcomes[self.nodes[i]] = outcome
        self.finished[i] = 1
        self.left -= 1
        self.cause[i] = cause
        out: list[int] = []
        deps_left = self.deps_left
        for j in self.dag._succ[i]:
            deps_left[j] -= 1
            if deps_left[j] == 0:
                # ready, or skippable now (a skipped node need not wait for its ``after``s)
                out.append(j)
        for j in self.after_succ[i]:
            self.after_left[j] -= 1
            if self.after_left[j] == 0 and deps_left[j] == 0:
                out.append(j)
        if self.left == 0 and self.done is not None and not self.done.done():
            self.done.set_result(None)
        return out

    def _start(self, i: int) -> None:
        if self.aborted:
            return
        try:
            task = asyncio.ensure_future(self.visit(self.nodes[i]))
        except BaseException as exc:  # noqa: BLE001 - a visit that cannot even start aborts
            self._release_keys(i)
            self._abort(exc)
            return
        self.running[task] = i
        task.add_done_callback(self._visited)

    def _visited(self, task: asyncio.Future[Out]) -> None:
        i = self.running.pop(task)
        if self.aborted:
            if not task.cancelled():
                task.exception()  # retrieved: the walk is already propagating its own error
            return
        try:
            if task.cancelled():
                raise asyncio.CancelledError(f"the visit of {self.nodes[i]} was cancelled")
            outcome = task.result()
            cause = _NONE
            if not self.succeeded(outcome):
                cause = i
                if self.blame is not None:
                    cause = self.dag.rank(self.blame(self.nodes[i], outcome))
            ready = self._finish(i, outcome, cause)
            ready.extend(self._release_keys(i))
            self._release_ready(ready)
        except BaseException as exc:  # noqa: BLE001 - handed to the walk, which re-raises it
            self._abort(exc)

    # --- concurrency keys ----------------------------------------------------------------------
    def _acquire(self, i: int) -> bool:
        """Take node ``i``'s keys in their global order, from where it stopped; True once it
        holds all of them, else it waits in the queue of the first key it lacks."""
        ks = self.node_keys[i]
        h = self.held[i]
        while h < len(ks):
            k = ks[h]
            if self.free[k] == 0:
                self.held[i] = h
                heapq.heappush(self.queue[k], i)
                return False
            self.free[k] -= 1
            h += 1
        self.held[i] = h
        return True

    def _release_keys(self, i: int) -> list[int]:
        """Give node ``i``'s slots back; returns the waiting nodes that now hold all their
        keys (``_release_ready`` starts them)."""
        out: list[int] = []
        for k in self.node_keys[i][: self.held[i]]:
            self.free[k] += 1
            q = self.queue[k]
            while q and self.free[k] > 0:
                j = heapq.heappop(q)
                self.free[k] -= 1
                self.held[j] += 1
                if self._acquire(j):
                    out.append(j)
        return out
