"""What a command loads before it needs it: the guard for start-up time (bench B1b) that times
nothing. A no-op `plan` from cron pays for every import of every run, so modules that only some
commands use are imported inside those commands. Each check runs in a new interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED = str(ROOT / "specs" / "seed.yaml")

# what `kvmstate plan` imports (bench/startup.py measures the same line)
PLAN_IMPORTS = (
    "import kvmstate.cli, kvmstate.cli.plan, kvmstate.loader, kvmstate.engine.graph, "
    "kvmstate.resources, kvmstate.engine, kvmstate.transport.real"
)

# needed by some commands only, imported there: never by the plan / validate path
ONLY_WHEN_NEEDED = (
    "rich.progress",  # apply, while a domain migrates
    "rich.table",  # show
    "rich.logging",  # -v
    "libvirt",  # the first libvirt call (hosts with pools, volumes or domains)
    "networkx",  # naming a dependency cycle (a spec error); the graph is kvmstate's own
    "urllib.request",  # apply of a volume imaged from a URL
    "pycdlib",  # apply of a cloud-init seed
    "jsonschema",  # tests of `schema` only
    "kvmstate.lab",  # kvmstate lab
    "kvmstate.docgen",  # schema
    "kvmstate.importer",  # import
    "kvmstate.cli.completion",  # completion
    "kvmstate.cli.apply",  # apply, evacuate
    "kvmstate.cli.progress",  # apply, evacuate
    "kvmstate.cli.drift",  # drift
    "kvmstate.cli.importing",  # import
    "kvmstate.ops.drift",  # drift
    "kvmstate.ops.evacuate",  # evacuate
    "kvmstate.ops.journal",  # apply
    "kvmstate.ops.metrics",  # drift --textfile
    "kvmstate.testing",  # tests
)


def modules_after(code: str) -> set[str]:
    """The modules a new interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    r = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert r.returncode in (0, 2), r.stderr
    loaded: list[str] = json.loads(r.stdout.strip().splitlines()[-1])
    return set(loaded)


def heavy(loaded: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(m == n or m.startswith(n + ".") for m in loaded))


def run_main(*argv: str) -> str:
    return f"from kvmstate.cli import main\nmain({list(argv)!r})"


def test_the_bare_cli_loads_no_spec_machinery() -> None:
    """`kvmstate --help`, `completion`, `lab`: argparse first, pydantic and asyncssh later."""
    loaded = modules_after("import kvmstate.cli")
    assert heavy(loaded, (*ONLY_WHEN_NEEDED, "pydantic", "yaml", "asyncssh", "networkx")) == []
    assert "kvmstate.spec" not in loaded and "kvmstate.loader" not in loaded


def test_the_plan_path_imports_only_what_a_plan_uses() -> None:
    assert heavy(modules_after(PLAN_IMPORTS), ONLY_WHEN_NEEDED) == []


def test_a_plan_that_reaches_for_the_hosts_imports_only_what_a_plan_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole `kvmstate plan` path (spec, graph, engine, SSH transports, the output), not
    only its imports: every host is unreachable (no identity file), so nothing is contacted
    (the spec bench/startup.py times the same process with)."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.startup import unreachable_lab_spec

    loaded = modules_after(run_main("plan", str(unreachable_lab_spec(tmp_path))))
    assert "asyncssh" in loaded  # the plan did reach for the hosts
    assert heavy(loaded, ONLY_WHEN_NEEDED) == []


@pytest.mark.parametrize(
    "argv",
    [
        ("validate", SEED),
        ("plan", SEED, "--assume-empty"),
        ("plan", SEED, "--assume-empty", "--json"),
    ],
)
def test_commands_that_contact_no_host_load_no_transport(argv: tuple[str, ...]) -> None:
    loaded = modules_after(run_main(*argv))
    assert "kvmstate.spec" in loaded  # the command did run
    assert heavy(loaded, (*ONLY_WHEN_NEEDED, "asyncssh", "kvmstate.transport.ssh")) == []
