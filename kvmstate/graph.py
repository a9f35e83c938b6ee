"""The dependency graph of resources: a networkx DiGraph, edges dependency -> dependent.

Built by two small transforms: expand every kind's resources from the spec, then connect each
resource to what it ``depends_on`` (and to its hosts' ``packages``). A dependency that is
itself ``state: absent`` is reversed (the dependent goes first when both are being removed).
Cycles and missing nodes are errors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import networkx as nx

from kvmstate.errors import Problem, SpecError
from kvmstate.ids import ResourceId
from kvmstate.resources.base import Resource

_SECTION = {
    "packages": "hosts",
    "subvolume": "subvolumes",
    "export": "exports",
    "mount": "mounts",
    "pool": "pools",
    "volume": "volumes",
    "domain": "domains",
    "placement": "domains",
}


class ResourceGraph:
    def __init__(self, graph: Any, resources: dict[ResourceId, Resource[Any]]) -> None:
        self.g = graph
        self.resources = resources

    def __len__(self) -> int:
        return len(self.resources)

    def __getitem__(self, rid: ResourceId) -> Resource[Any]:
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


def _problem(path: str, rid: ResourceId, message: str) -> Problem:
    section = _SECTION.get(rid.kind, rid.kind)
    return Problem(path, None, (section, rid.name), message)


def build_graph(
    spec: Any,
    kinds: Sequence[type[Resource[Any]]],
    *,
    path: str = "<spec>",
    lines: dict[tuple[str | int, ...], int] | None = None,
) -> ResourceGraph:
    resources: dict[ResourceId, Resource[Any]] = {}
    problems: list[Problem] = []
    for kind in kinds:
        for r in kind.expand(spec):
            if r.id in resources:
                problems.append(_problem(path, r.id, f"duplicate resource {r.id}"))
            resources[r.id] = r
    g = nx.DiGraph()
    g.add_nodes_from(resources)
    for rid, r in resources.items():
        for dep in r.depends_on():
            if dep not in resources:
                problems.append(
                    _problem(path, rid, f"{rid} depends on {dep}, which is not in the spec")
                )
                continue
            if resources[dep].absent:
                if not r.absent:
                    problems.append(
                        _problem(path, rid, f"{rid} needs {dep}, which the spec says is absent")
                    )
                    continue
                g.add_edge(rid, dep)  # removal: the dependent goes first
            else:
                g.add_edge(dep, rid)
    # everything on a host stands on that host's packages (what its kind needs may come
    # from there: the engine observes it again once they are installed)
    for rid, r in resources.items():
        if rid.kind == "packages":
            continue
        for h in r.hosts():
            pkgs = ResourceId("packages", h, h)
            if pkgs in resources:
                g.add_edge(pkgs, rid)
    if not problems:
        try:
            cycle = nx.find_cycle(g)
        except nx.NetworkXNoCycle:
            cycle = None
        if cycle:
            chain = " -> ".join(str(u) for u, _ in cycle) + f" -> {cycle[0][0]}"
            problems.append(_problem(path, cycle[0][0], f"dependency cycle: {chain}"))
    if problems:
        if lines:
            from kvmstate.loader import line_of

            problems = [Problem(p.file, line_of(lines, p.loc), p.loc, p.message) for p in problems]
        raise SpecError(problems)
    return ResourceGraph(g, resources)


def hosts_of(resources: Iterable[Resource[Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in resources:
        for h in r.hosts():
            seen[h] = None
    return list(seen)
