"""The dependency graph of resources: a networkx DiGraph, edges dependency -> dependent.

Built by three small transforms: expand every kind's resources from the spec, connect each
resource to what it ``depends_on``, then add the edges a kind draws over the whole graph
(``Resource.edges``: a host's packages under everything on that host). A dependency that is
itself ``state: absent`` is reversed (the dependent goes first when both are being removed).
Cycles and missing nodes are errors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import networkx as nx

from kvmstate.engine.contract import Node, NodeKind
from kvmstate.errors import Problem, SpecError, line_of
from kvmstate.ids import ResourceId


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
        return list(nx.lexicographical_topological_sort(self.g, key=lambda rid: rank[rid]))

    def dependencies(self, rid: ResourceId) -> list[ResourceId]:
        return list(self.g.predecessors(rid))

    def dependents(self, rid: ResourceId) -> list[ResourceId]:
        return list(self.g.successors(rid))

    def descendants(self, rid: ResourceId) -> set[ResourceId]:
        return set(nx.descendants(self.g, rid))

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
    g = nx.DiGraph()
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
            cycle = nx.find_cycle(g)
        except nx.NetworkXNoCycle:
            cycle = None
        if cycle:
            chain = " -> ".join(str(u) for u, _ in cycle) + f" -> {cycle[0][0]}"
            problems.append(_problem(path, resources[cycle[0][0]], f"dependency cycle: {chain}"))
    if problems:
        if lines:
            problems = [Problem(p.file, line_of(lines, p.loc), p.loc, p.message) for p in problems]
        raise SpecError(problems)
    return ResourceGraph(g, resources)
