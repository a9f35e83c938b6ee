"""The kvmstate command as a user or a script runs it: output and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED = str(ROOT / "specs" / "seed.yaml")


def kvmstate(
    *args: str, stdin: str | None = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmstate.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "100", **(env or {})},
        timeout=60,
    )


def test_validate_seed_exits_0() -> None:
    r = kvmstate("validate", SEED)
    assert r.returncode == 0, r.stderr
    assert "valid (3 hosts" in r.stdout
    assert r.stderr == ""


def test_plan_assume_empty_shows_the_whole_chain_in_order_and_exits_2() -> None:
    r = kvmstate("plan", SEED, "--assume-empty")
    assert r.returncode == 2, r.stderr
    expected = [
        "+ subvolume:xcloud:images  create",
        "+ export:xcloud:images  create",
        "+ mount:devstack-1:images  create",
        "+ mount:devstack-2:images  create",
        "+ pool:devstack-1:images  create",
        "+ pool:devstack-2:images  create",
        "+ volume:devstack-1:nested-ubuntu18.04.qcow2  create",
        "+ domain:nested-ubuntu18.04  create",
    ]
    positions = [r.stdout.find(line) for line in expected]
    assert all(p >= 0 for p in positions), r.stdout
    assert positions == sorted(positions), "not in dependency order:\n" + r.stdout
    assert "Plan: " in r.stdout and "to create" in r.stdout


def test_plan_json_is_machine_readable() -> None:
    r = kvmstate("plan", SEED, "--assume-empty", "--json")
    assert r.returncode == 2, r.stderr
    data = json.loads(r.stdout)
    assert data["has_changes"] is True
    kinds = [c["kind"] for c in data["changes"]]
    assert kinds.index("subvolume") < kinds.index("export") < kinds.index("mount")
    assert kinds.index("pool") < kinds.index("volume") < kinds.index("domain")


def test_bad_spec_gives_file_line_field_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = (
        Path(SEED)
        .read_text()
        .replace("memory: 2GiB", "memory: 2 parsecs")
        .replace("export: images", "export: imgs")
    )
    bad.write_text(text)
    r = kvmstate("plan", str(bad), "--assume-empty")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = text.splitlines()
    mem_line = next(i for i, line in enumerate(lines, 1) if "2 parsecs" in line)
    export_line = next(i for i, line in enumerate(lines, 1) if "export: imgs" in line)
    # both at once, in file order; the location starts the line and a long problem wraps
    # (indented) at the output's width
    assert r.stderr.startswith(f"{bad}:{export_line}: mounts.images.export:")
    flat = " ".join(r.stderr.split())
    assert f"{bad}:{mem_line}: domains.nested-ubuntu18.04.memory: invalid size" in flat
    assert "2 errors in the spec; nothing was contacted." in flat


def test_apply_refuses_to_ask_without_a_terminal() -> None:
    r = kvmstate("apply", SEED, stdin="yes\n")
    assert r.returncode == 1
    assert "stdin is not a terminal" in r.stderr


@pytest.mark.parametrize(
    "fmt,needle",
    [
        ("text", "domain:nested-ubuntu18.04  <- "),
        ("dot", "digraph kvmstate"),
        ("mermaid", "flowchart LR"),
    ],
)
def test_graph_formats(fmt: str, needle: str) -> None:
    r = kvmstate("graph", SEED, "--format", fmt)
    assert r.returncode == 0, r.stderr
    assert needle in r.stdout


def test_schema_is_json() -> None:
    r = kvmstate("schema")
    assert r.returncode == 0
    assert json.loads(r.stdout)["title"] == "kvmstate spec"


def test_no_command_prints_help_and_fails() -> None:
    r = kvmstate()
    assert r.returncode == 1
    assert "validate" in r.stdout


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_scripts_name_every_command(shell: str) -> None:
    r = kvmstate("completion", shell)
    assert r.returncode == 0, r.stderr
    for command in ("validate", "plan", "apply", "drift", "graph", "show", "schema"):
        assert command in r.stdout
    if shell == "bash":
        check = subprocess.run(["bash", "-n"], input=r.stdout, text=True, capture_output=True)
        assert check.returncode == 0, check.stderr


def test_every_command_has_help_with_examples() -> None:
    for command in ("validate", "plan", "apply", "drift", "graph"):
        r = kvmstate(command, "--help")
        assert r.returncode == 0
        assert "example" in r.stdout, command


def test_no_color_output_has_no_escape_codes() -> None:
    r = kvmstate("--no-color", "plan", SEED, "--assume-empty", env={"NO_COLOR": ""})
    assert "\x1b[" not in r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 100


def test_host_down_names_an_unknown_host_and_contacts_nothing() -> None:
    r = kvmstate("plan", SEED, "--host-down", "kvm-9")
    assert r.returncode == 1
    assert "--host-down kvm-9: not a host of" in r.stderr, r.stderr
    assert "xcloud" in r.stderr  # the hosts it has


def test_fence_refuses_a_host_without_agent_unless_confirmed_off() -> None:
    r = kvmstate("fence", "xcloud", SEED)
    assert r.returncode == 1
    assert "has no fence agent" in r.stderr and "--confirm-off" in r.stderr, r.stderr


def test_fence_agent_arguments_never_appear_in_a_spec_error(tmp_path: Path) -> None:
    text = (ROOT / "specs" / "seed.yaml").read_text()
    secret = "--password=hunter2-secret"
    spec = tmp_path / "s.yaml"
    spec.write_text(
        text.replace(
            "  xcloud:\n",
            f"  xcloud:\n    fence: {{power_off: [fence_x, {secret}, off], status: [fence_x]}}\n",
            1,
        )
    )
    r = kvmstate("validate", str(spec))
    assert r.returncode == 1
    assert "quote it" in r.stdout + r.stderr
    assert "hunter2" not in r.stdout + r.stderr
