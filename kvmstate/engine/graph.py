"""The dependency graph of resources: a directed graph, edges dependency -> dependent.

Built by three small transforms: expand every kind's resources from the spec, connect each
resource to what it ``depends_on``, then add the edges a kind draws over the whole graph
(``Resource.edges``: a host's packages under everything on that host). A dependency that is
itself ``state: absent`` is reversed (the dependent goes first when both are being removed).
Cycles and missing nodes are errors.

The graph is :class:`Digraph`, the few operations of ``networkx.DiGraph`` the engine uses
(same iteration orders), not networkx itself: importing networkx costs a ``kvmstate plan``
~60-90 ms of start-up (bench B1b), more than the whole graph work. networkx is imported only to
name a cycle, on that error path (the message stays networkx's choice of cycle). A
``ResourceGraph`` also accepts a ``networkx.DiGraph`` (tests build one by hand).
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import Any

from kvmstate.engine.contract import Node, NodeKind
from kvmstate.errors import Problem, SpecError, line_of
from kvmstate.ids import ResourceId


class Digraph:
    """A directed graph with the part of ``networkx.DiGraph``'s interface kvmstate uses: nodes
    and edges keep their insertion order (as networkx's do), adding an edge adds its nodes,
    adding an edge twice keeps the first."""

    __slots__ = ("_pred", "_succ")

    def __init__(self) -> None:
        self._succ: dict[Hashable, dict[Hashable, None]] = {}
        self._pred: dict[Hashable, dict[Hashable, None]] = {}

    def add_node(self, n: Hashable) -> None:
        if n not in self._succ:
            self._succ[n] = {}
            self._pred[n] = {}

    def add_nodes_from(self, nodes: Iterable[Hashable]) -> None:
        for n in nodes:
            self.add_node(n)

    def add_edge(self, u: Hashable, v: Hashable) -> None:
        self.add_node(u)
        self.add_node(v)
        self._succ[u][v] = None
        self._pred[v][u] = None

    def has_edge(self, u: Hashable, v: Hashable) -> bool:
        return v in self._succ.get(u, ())

    def predecessors(self, n: Hashable) -> Iterator[Hashable]:
        return iter(self._pred[n])

    def successors(self, n: Hashable) -> Iterator[Hashable]:
        return iter(self._succ[n])

    @property
    def nodes(self) -> list[Hashable]:
        return list(self._succ)

    @property
    def edges(self) -> list[tuple[Hashable, Hashable]]:
        return [(u, v) for u, vs in self._succ.items() for v in vs]

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._succ)

    def __contains__(self, n: object) -> bool:
        return n in self._succ

    def __len__(self) -> int:
        return len(self._succ)


def topological_order(g: Any, key: Any) -> list[Any]:
    """``networkx.lexicographical_topological_sort(g, key=key)``, on ``g``'s nodes, successors
    and predecessors only: ties by ``key``, then by node order. ``ValueError`` on a cycle."""
    nodeid = {n: i for i, n in enumerate(g)}
    indegree = {n: len(list(g.predecessors(n))) for n in nodeid}
    ready = [(key(n), nodeid[n], n) for n, d in indegree.items() if d == 0]
    heapq.heapify(ready)
    out: list[Any] = []
    while ready:
        _, _, n = heapq.heappop(ready)
        out.append(n)
        for child in g.successors(n):
            indegree[child] -= 1
            if indegree[child] == 0:
                heapq.heappush(ready, (key(child), nodeid[child], child))
    if len(out) != len(nodeid):
        raise ValueError("the graph contains a cycle")
    return out


def _find_cycle(g: Any) -> list[tuple[Any, Any]]:
    """A cycle of ``g`` as its edges, exactly as ``networkx.find_cycle`` names it (networkx is
    imported here only: this runs on a spec error)."""
    import networkx as nx

    h = nx.DiGraph()
    h.add_nodes_from(g)
    h.add_edges_from(g.edges)
    cycle: list[tuple[Any, Any]] = nx.find_cycle(h)
    return cycle


class ResourceGraph:
    def __init__(self, graph: Any, resources: dict[ResourceId, Node]) -> None:
        self.g = graph
        self.resources = resources

    def __len__(self) -> int:
        return len(self.resources)

    def __getitem__(self, rid: ResourceId) -> Node:
        return self.resources[rid]

    def order(self) -> list[ResourceId]:
        """A stable topological order (dependencies first, ties by kind order then id)."""
        rank = {rid: i for i, rid in enumerate(self.resources)}
        return topological_order(self.g, key=lambda rid: rank[rid])

    def dependencies(self, rid: ResourceId) -> list[ResourceId]:
        return list(self.g.predecessors(rid))

    def dependents(self, rid: ResourceId) -> list[ResourceId]:
        return list(self.g.successors(rid))

    def descendants(self, rid: ResourceId) -> set[ResourceId]:
        seen: set[ResourceId] = set()
        todo = [rid]
        while todo:
            for child in self.g.successors(todo.pop()):
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        seen.discard(rid)  # networkx: a node is not its own descendant, even on a cycle
        return seen

    def edges(self) -> Iterator[tuple[ResourceId, ResourceId]]:
        yield from self.g.edges

    # --- rendering ---------------------------------------------------------------------------
    def to_dot(self) -> str:
        lines = ["digraph kvmstate {", "  rankdir=LR;", "  node [shape=box, fontname=monospace];"]
        for rid in self.order():
            style = ", style=dashed, color=red" if self.resources[rid].absent else ""
            lines.append(f'  "{rid}" [label="{rid}"{style}];')
        for u, v in sorted(self.edges(), key=lambda e: (str(e[0]), str(e[1]))):
            lines.append(f'  "{u}" -> "{v}";')
        lines.append("}")
        return "\n".join(lines) + "\n"

    def to_mermaid(self) -> str:
        ids = {rid: f"n{i}" for i, rid in enumerate(self.order())}
        lines = ["flowchart LR"]
        for rid, nid in ids.items():
            lines.append(f'  {nid}["{rid}"]')
        for u, v in sorted(self.edges(), key=lambda e: (str(e[0]), str(e[1]))):
            lines.append(f"  {ids[u]} --> {ids[v]}")
        return "\n".join(lines) + "\n"

    def to_text(self) -> str:
        lines = []
        for rid in self.order():
            deps = sorted(str(d) for d in self.dependencies(rid))
            suffix = f"  <- {', '.join(deps)}" if deps else ""
            mark = " (absent)" if self.resources[rid].absent else ""
            lines.append(f"{rid}{mark}{suffix}")
        return "\n".join(lines) + "\n"


def _problem(path: str, r: Node, message: str) -> Problem:
    return Problem(path, None, (r.section, r.name), message)


def build_graph(
    spec: Any,
    kinds: Sequence[NodeKind],
    *,
    path: str = "<spec>",
    lines: dict[tuple[str | int, ...], int] | None = None,
) -> ResourceGraph:
    resources: dict[ResourceId, Node] = {}
    problems: list[Problem] = []
    for kind in kinds:
        for r in kind.expand(spec):
            if r.id in resources:
                problems.append(_problem(path, r, f"duplicate resource {r.id}"))
            resources[r.id] = r
    g = Digraph()
    g.add_nodes_from(resources)
    for rid, r in resources.items():
        for dep in r.depends_on():
            if dep not in resources:
                problems.append(
                    _problem(path, r, f"{rid} depends on {dep}, which is not in the spec")
                )
                continue
            if resources[dep].absent:
                if not r.absent:
                    problems.append(
                        _problem(path, r, f"{rid} needs {dep}, which the spec says is absent")
                    )
                    continue
                g.add_edge(rid, dep)  # removal: the dependent goes first
            else:
                g.add_edge(dep, rid)
    # edges a kind draws over the whole graph (a host's packages under everything on it)
    for kind in kinds:
        for dep, rid in kind.edges(resources):
            g.add_edge(dep, rid)
    if not problems:
        try:
            topological_order(g, key=lambda _: 0)
            cycle = None
        except ValueError:
            cycle = _find_cycle(g)
        if cycle:
            chain = " -> ".join(str(u) for u, _ in cycle) + f" -> {cycle[0][0]}"
            problems.append(_problem(path, resources[cycle[0][0]], f"dependency cycle: {chain}"))
    if problems:
        if lines:
            problems = [Problem(p.file, line_of(lines, p.loc), p.loc, p.message) for p in problems]
        raise SpecError(problems)
    return ResourceGraph(g, resources)
