"""The registry of resource kinds: everything generic code needs to know about the kinds
comes from here, by iterating over them; none of it names a kind.

A kind is one module (its spec section model, its graph edges, its host prerequisites, its
facts, observe/diff/apply, its import mapping and its reference docs) plus one line in
``KINDS``. ``Registry(kinds)`` gives, for that set of kinds: the Spec model (the built-in
sections, plus a section for any kind whose section the Spec lacks), loading a spec, the
dependency graph, what a host needs, the import and the docs.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import Field, create_model

from kvmstate.checks import Finding
from kvmstate.engine.graph import ResourceGraph, build_graph
from kvmstate.loader import LoadedSpec, load_spec, parse_spec_text
from kvmstate.resources.base import DocSection, Resource
from kvmstate.resources.prereq import Requirement
from kvmstate.spec import Host, MigrationLimits, Name, Spec, SSHDefaults, SSHOverrides

Kind = type[Resource[Any]]

#: The blocks of the spec reference that belong to no kind (the file, ssh, hosts).
BASE_DOCS: tuple[DocSection, ...] = (
    DocSection("(top level)", Spec, "The whole file."),
    DocSection("ssh", SSHDefaults, "SSH defaults for every host; a host's `ssh:` overrides them."),
    DocSection("hosts.NAME", Host, "A machine kvmstate reaches over SSH."),
    DocSection("hosts.NAME.ssh", SSHOverrides, "Per-host SSH settings; unset fields inherit."),
    DocSection("hosts.NAME.migrations", MigrationLimits, "Concurrent live migrations per host."),
)


class Registry:
    def __init__(self, kinds: Sequence[Kind]) -> None:
        self.kinds: tuple[Kind, ...] = tuple(kinds)
        names = [k.kind for k in self.kinds]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"kinds registered twice: {', '.join(dupes)}")

    def __iter__(self) -> Any:
        return iter(self.kinds)

    # --- the spec ------------------------------------------------------------------------------
    @cached_property
    def spec_model(self) -> type[Spec]:
        """``Spec`` with a section for every kind whose section it lacks (an entry model per
        name), so a new kind's spec section is declared by the kind alone."""
        extra: dict[str, Any] = {}
        for k in self.kinds:
            if k.section in Spec.model_fields or k.section_model is None:
                continue
            extra[k.section] = (dict[Name, k.section_model], Field(default_factory=dict))  # type: ignore[name-defined]
        if not extra:
            return Spec
        model: type[Spec] = create_model("Spec", __base__=Spec, **extra)
        return model

    def check(self, spec: Any) -> list[Finding]:
        return [f for k in self.kinds for f in k.check(spec)]

    def parse(self, text: str, path: str = "<spec>") -> LoadedSpec:
        return parse_spec_text(text, path, self.spec_model, self.check)

    def load(self, path: str | Path) -> LoadedSpec:
        return load_spec(path, self.spec_model, self.check)

    # --- the graph and the hosts ---------------------------------------------------------------
    def graph(
        self,
        spec: Any,
        *,
        path: str = "<spec>",
        lines: dict[tuple[str | int, ...], int] | None = None,
    ) -> ResourceGraph:
        graph = build_graph(spec, self.kinds, path=path, lines=lines)
        resources = [r for r in graph.resources.values() if isinstance(r, Resource)]
        union: dict[str, frozenset[Requirement]] = {}
        for r in resources:
            for host, reqs in r.needs().items():
                union[host] = union.get(host, frozenset()) | reqs
        for r in resources:
            r.host_needs = union  # one prerequisite probe per host, shared
        return graph

    def needs_for_host(self, spec: Any, host: str) -> set[str]:
        """The requirement names ``host`` needs for the resources the spec puts on it."""
        return {
            req.name
            for kind in self.kinds
            for r in kind.expand(spec)
            for req in r.needs().get(host, ())
        }

    # --- docs ----------------------------------------------------------------------------------
    def docs(self) -> list[DocSection]:
        """The spec reference's blocks: the base ones, then each kind's, in kind order."""
        out: dict[str, DocSection] = {d.where: d for d in BASE_DOCS}
        for k in self.kinds:
            for d in k.docs:
                out.setdefault(d.where, d)
        return list(out.values())

    def sections(self) -> dict[str, list[Kind]]:
        out: dict[str, list[Kind]] = {}
        for k in self.kinds:
            out.setdefault(k.section, []).append(k)
        return out
