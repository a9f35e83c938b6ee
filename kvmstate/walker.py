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
    """

    __slots__ = ("_dependencies", "_dependents", "_index", "_nodes")

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
        deps: dict[N, dict[N, None]] = {n: {} for n in given}
        dependents: dict[N, dict[N, None]] = {n: {} for n in given}
        for u, v in edges:
            _check_edge(self._index, u, v)
            deps[v][u] = None
            dependents[u][v] = None
        self._dependencies: dict[N, tuple[N, ...]] = {n: tuple(d) for n, d in deps.items()}
        self._dependents: dict[N, tuple[N, ...]] = {n: tuple(d) for n, d in dependents.items()}

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
        return self._dependencies[node]

    def dependents(self, node: N) -> tuple[N, ...]:
        return self._dependents[node]

    def order(self, after: Iterable[tuple[N, N]] = ()) -> list[N]:
        """A stable topological order: dependencies (and ``after`` predecessors) first, ties
        broken by rank. Raises :class:`CycleError` on a cycle."""
        succ, indeg = self._successors(after)
        heap = [self._index[n] for n in self._nodes if indeg[n] == 0]
        heapq.heapify(heap)
        out: list[N] = []
        while heap:
            n = self._nodes[heapq.heappop(heap)]
            out.append(n)
            for m in succ[n]:
                indeg[m] -= 1
                if indeg[m] == 0:
                    heapq.heappush(heap, self._index[m])
        if len(out) < len(self._nodes):
            cycle = _find_cycle(succ, [n for n in self._nodes if indeg[n] > 0])
            raise CycleError(cycle)
        return out

    def _successors(self, after: Iterable[tuple[N, N]]) -> tuple[dict[N, list[N]], dict[N, int]]:
        """Successor lists and in-degrees over dependency and ``after`` edges together."""
        succ = {n: list(ds) for n, ds in self._dependents.items()}
        indeg = {n: len(ds) for n, ds in self._dependencies.items()}
        for u, v in after:
            _check_edge(self._index, u, v)
            succ[u].append(v)
            indeg[v] += 1
        return succ, indeg


def _check_edge(index: Mapping[Any, int], u: Hashable, v: Hashable) -> None:
    for x in (u, v):
        if x not in index:
            raise ValueError(f"edge {u} -> {v}: {x} is not a node of the graph")
    if u == v:
        raise CycleError([u])


def _find_cycle(succ: Mapping[N, Sequence[N]], candidates: Sequence[N]) -> list[N]:
    """One cycle among ``candidates`` (the nodes a topological sort could not place; every
    one of them lies on a cycle or downstream of one), by an iterative depth-first search."""
    alive = set(candidates)
    state: dict[N, int] = {}  # 1 = on the current path, 2 = done
    for start in candidates:
        if start in state:
            continue
        path: list[N] = [start]
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
               their cause (default: the node itself), e.g. the node a blocked one waited for.
    into:      a dict filled with each outcome as its node finishes: a visit may read the
               outcome of any of its dependencies and ``after`` predecessors from it.
    """
    walker = _Walk(dag, visit, succeeded, skip, after, keys or {}, limits or {}, default_limit)
    walker.blame = blame
    if into is not None:
        walker.outcomes = into
    return await walker.run()


class _Walk(Generic[N, Out]):
    """The state of one walk. Everything runs on the event loop's thread: visits are tasks,
    and each task's done-callback updates the counters and starts what became ready."""

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
        self.visit = visit
        self.succeeded = succeeded
        self.skip = skip
        self.blame: Callable[[N, Out], N] | None = None
        self.outcomes: dict[N, Out] = {}
        after_succ: dict[N, list[N]] = {}
        after_left: dict[N, int] = {}
        for u, v in dict.fromkeys(after):
            _check_edge(dag._index, u, v)
            after_succ.setdefault(u, []).append(v)
            after_left[v] = after_left.get(v, 0) + 1
        self.after_succ = after_succ
        self.after_left = after_left
        self.deps_left = {n: len(dag.dependencies(n)) for n in dag.nodes}
        self.cause: dict[N, N] = {}  # a node that did not succeed -> the root cause it passes on
        # concurrency: a node's limited keys in one global order, the free slots of each key,
        # and per key the nodes waiting for it (by rank)
        self.free: dict[Hashable, int] = {}
        self.node_keys: dict[N, tuple[Hashable, ...]] = {}
        self.held: dict[N, int] = {}
        self.queue: dict[Hashable, list[int]] = {}
        if keys:
            self._keys(keys, limits, default_limit)
        self.running: dict[asyncio.Future[Out], N] = {}
        self.left = len(dag)
        self.done: asyncio.Future[None] | None = None
        self.aborted = False

    def _keys(
        self,
        keys: Mapping[N, Iterable[Hashable]],
        limits: Mapping[Hashable, int],
        default_limit: int | None,
    ) -> None:
        order: dict[Hashable, int] = {}
        for n in self.dag.nodes:
            mine: dict[Hashable, None] = {}
            for k in keys.get(n, ()):
                limit = limits.get(k, default_limit)
                if limit is None:
                    continue
                if limit < 1:
                    raise ValueError(f"concurrency limit of {k} is {limit}; it must be at least 1")
                if k not in order:
                    order[k] = len(order)
                    self.free[k] = limit
                    self.queue[k] = []
                mine[k] = None
            if mine:
                self.node_keys[n] = tuple(sorted(mine, key=order.__getitem__))

    # --- the walk ------------------------------------------------------------------------------
    async def run(self) -> dict[N, Out]:
        self.dag.order(self.after_pairs())  # a cycle is an error before anything is visited
        self.done = asyncio.get_running_loop().create_future()
        try:
            self._release_ready([n for n in self.dag.nodes if self._ready(n)])
            if self.left:
                await self.done
        except BaseException:
            await self._cancel_running()
            raise
        return {n: self.outcomes[n] for n in self.dag.nodes}

    def after_pairs(self) -> list[tuple[N, N]]:
        return [(u, v) for u, vs in self.after_succ.items() for v in vs]

    def _ready(self, n: N) -> bool:
        return self.deps_left[n] == 0 and self.after_left.get(n, 0) == 0

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

    def _release_ready(self, ready: list[N]) -> None:
        """Start (or queue for their keys) nodes whose dependencies and ``after``
        predecessors have all finished, skipping those with a dependency that failed."""
        work = ready
        while work:
            # a node can come twice (its last dependency and its last ``after`` predecessor
            # finishing together): the first is the one that counts
            work = sorted(dict.fromkeys(work), key=self.dag.rank)
            start: list[N] = []
            nxt: list[N] = []
            for n in work:
                cause = self._failed_dependency(n)
                if cause is not None:
                    nxt.extend(self._finish(n, self.skip(n, cause), cause))
                elif self._ready(n) and self._acquire(n):
                    start.append(n)
            for n in start:
                self._start(n)
            work = nxt

    def _failed_dependency(self, n: N) -> N | None:
        for d in self.dag.dependencies(n):
            if d in self.cause:
                return self.cause[d]
        return None

    def _finish(self, n: N, outcome: Out, cause: N | None) -> list[N]:
        """Record ``n``'s outcome (``cause``: the root cause it passes on, None if it
        succeeded); returns the nodes this made ready or skippable."""
        self.outcomes[n] = outcome
        self.left -= 1
        if cause is not None:
            self.cause[n] = cause
        out: list[N] = []
        for m in self.dag.dependents(n):
            self.deps_left[m] -= 1
            if self.deps_left[m] == 0:
                # ready, or skippable now (a skipped node need not wait for its ``after``s)
                out.append(m)
        for m in self.after_succ.get(n, ()):
            self.after_left[m] -= 1
            if self.after_left[m] == 0 and self.deps_left[m] == 0 and m not in self.outcomes:
                out.append(m)
        if self.left == 0 and self.done is not None and not self.done.done():
            self.done.set_result(None)
        return out

    def _start(self, n: N) -> None:
        if self.aborted:
            return
        try:
            task = asyncio.ensure_future(self.visit(n))
        except BaseException as exc:  # noqa: BLE001 - a visit that cannot even start aborts
            self._release_keys(n)
            self._abort(exc)
            return
        self.running[task] = n
        task.add_done_callback(self._visited)

    def _visited(self, task: asyncio.Future[Out]) -> None:
        n = self.running.pop(task)
        if self.aborted:
            if not task.cancelled():
                task.exception()  # retrieved: the walk is already propagating its own error
            return
        try:
            if task.cancelled():
                raise asyncio.CancelledError(f"the visit of {n} was cancelled")
            outcome = task.result()
            cause = None
            if not self.succeeded(outcome):
                cause = n if self.blame is None else self.blame(n, outcome)
            ready = self._finish(n, outcome, cause)
            ready.extend(self._release_keys(n))
            self._release_ready(ready)
        except BaseException as exc:  # noqa: BLE001 - handed to the walk, which re-raises it
            self._abort(exc)

    # --- concurrency keys ----------------------------------------------------------------------
    def _acquire(self, n: N) -> bool:
        """Take ``n``'s keys in their global order, from where it stopped; True once it holds
        all of them, else it waits in the queue of the first key it lacks."""
        ks = self.node_keys.get(n)
        if ks is None:
            return True
        i = self.held.get(n, 0)
        while i < len(ks):
            k = ks[i]
            if self.free[k] == 0:
                self.held[n] = i
                heapq.heappush(self.queue[k], self.dag.rank(n))
                return False
            self.free[k] -= 1
            i += 1
        self.held[n] = i
        return True

    def _release_keys(self, n: N) -> list[N]:
        """Give ``n``'s slots back; returns the waiting nodes that now hold all their keys
        (they are started by ``_release_ready``)."""
        ks = self.node_keys.get(n)
        if ks is None:
            return []
        out: list[N] = []
        for k in ks[: self.held.get(n, 0)]:
            self.free[k] += 1
            q = self.queue[k]
            while q and self.free[k] > 0:
                m = self.dag.nodes[heapq.heappop(q)]
                self.free[k] -= 1
                self.held[m] += 1
                if self._acquire(m):
                    out.append(m)
        return out
