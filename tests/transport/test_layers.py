"""Who imports what in kvmstate/ (an AST walk, every import, lazy ones included):
one module imports libvirt, two import asyncssh, the transport imports no fact parser and no
resource kind, and the modules of this layer are in no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[2]
KVMSTATE = ROOT / "kvmstate"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The modules ``path`` imports at run time (``from kvmstate import x`` counts as
    kvmstate.x; an ``if TYPE_CHECKING:`` block is for the type checker only, not counted)."""
    out: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
            "TYPE_CHECKING",
            "typing.TYPE_CHECKING",
        ):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


FILES = {_module(p): p for p in sorted(KVMSTATE.rglob("*.py"))}
IMPORTS = {m: _imports(p) for m, p in FILES.items()}


def _importers(name: str) -> list[str]:
    return sorted(
        m for m, imp in IMPORTS.items() if any(i == name or i.startswith(name + ".") for i in imp)
    )


def test_exactly_one_module_imports_libvirt() -> None:
    """The lab and the fake included; it is also the only one replacing libvirt's stderr
    error handler."""
    assert _importers("libvirt") == ["kvmstate.transport.libvirt"]
    silencers = [m for m, p in FILES.items() if "registerErrorHandler" in p.read_text()]
    assert silencers == ["kvmstate.transport.libvirt"]


def test_only_the_ssh_transport_imports_asyncssh() -> None:
    # the lab's selftest checks the lab's sshd with a client of its own
    assert _importers("asyncssh") == ["kvmstate.transport.sshlib"]
    assert _importers("kvmstate.transport.sshlib") == [
        "kvmstate.lab.selftest",
        "kvmstate.transport.ssh",
    ]


def test_the_transport_imports_no_fact_parser_and_no_resource_kind() -> None:
    forbidden = (
        "kvmstate.facts",
        "kvmstate.hostfacts",
        "kvmstate.nfsexports",
        "kvmstate.virtxml",
        "kvmstate.virt",
        "kvmstate.resources",
        "kvmstate.testing",
    )
    for m, imp in IMPORTS.items():
        if not m.startswith("kvmstate.transport") or m == "kvmstate.transport.prereq":
            continue  # prereq (kinds' prerequisites) is on its way out of the transport
        bad = {i for i in imp if any(i == f or i.startswith(f + ".") for f in forbidden)}
        assert not bad, (m, bad)


def _graph() -> nx.DiGraph:
    g: nx.DiGraph = nx.DiGraph()
    for m, imp in IMPORTS.items():
        g.add_node(m)
        for i in imp:
            if i in FILES and i != m:
                g.add_edge(m, i)
    return g


LAYER = {
    "kvmstate.ops.clusterlock",
    "kvmstate.facts",
    "kvmstate.hostfacts",
    "kvmstate.nfsexports",
    "kvmstate.tabfiles",
    "kvmstate.virt",
    "kvmstate.testing",
    "kvmstate.testing.fake",
    "kvmstate.testing.fake_cmds",
    "kvmstate.transport",
    "kvmstate.transport.base",
    "kvmstate.transport.libvirt",
    "kvmstate.transport.real",
    "kvmstate.transport.ssh",
    "kvmstate.transport.sshlib",
}


def test_no_import_cycle_through_the_transport_facts_and_the_fake() -> None:
    g = _graph()
    cycles = [c for c in nx.strongly_connected_components(g) if len(c) > 1 and c & LAYER]
    assert cycles == []


def test_the_transport_package_is_in_no_package_level_cycle() -> None:
    """Folded to packages (kvmstate.transport.* -> kvmstate.transport): the transport imports
    nothing that imports it back, prereq aside."""

    def pkg(m: str) -> str:
        return "kvmstate.transport" if m.startswith("kvmstate.transport") else m

    g: nx.DiGraph = nx.DiGraph()
    for a, b in _graph().edges:
        if a != "kvmstate.transport.prereq" and pkg(a) != pkg(b):
            g.add_edge(pkg(a), pkg(b))
    cycles = [c for c in nx.strongly_connected_components(g) if "kvmstate.transport" in c]
    assert cycles == [{"kvmstate.transport"}]
