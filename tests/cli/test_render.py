"""The plan and report as a person reads them (rendered to a string, no colour)."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from kvmstate.cli import views
from kvmstate.cli.progress import EventPrinter
from kvmstate.ids import ResourceId
from kvmstate.model import (
    Action,
    ApplyDone,
    ApplyStart,
    Change,
    Check,
    FieldDiff,
    MigrationDone,
    MigrationProgress,
    Outcome,
    Plan,
    Report,
    Status,
)
from kvmstate.ui.console import make_console


def _console() -> tuple[io.StringIO, Console]:
    buf = io.StringIO()
    return buf, make_console(file=buf, no_color=True)


def test_plan_shows_each_action_with_field_diffs_checks_and_summary() -> None:
    plan = Plan(
        (
            Change(
                ResourceId("subvolume", "images", "storage"),
                Action.CREATE,
                (FieldDiff("mountpoint", None, "/srv/images"),),
            ),
            Change(
                ResourceId("mount", "images", "kvm-1"),
                Action.UPDATE,
                (
                    FieldDiff("options", ["vers=3"], ["vers=4"], "config"),
                    FieldDiff("mounted", False, True, "runtime"),
                ),
            ),
            Change(
                ResourceId("placement", "web"),
                Action.MIGRATE,
                (FieldDiff("host", "kvm-1", "kvm-2", "runtime"),),
                reason="kvm-1 → kvm-2 (live, 2 GiB)",
                checks=(
                    Check("target libvirtd", True, "reachable"),
                    Check("pool images on kvm-2", False, "inactive"),
                ),
            ),
            Change(
                ResourceId("volume", "old.qcow2", "kvm-1"),
                Action.DELETE,
                (FieldDiff("capacity", "1GiB", None),),
                blocked="deleting needs --allow-destroy",
            ),
            Change(
                ResourceId("domain", "db"),
                Action.NOOP,
                (FieldDiff("memory", "1GiB", "2GiB", "pending-restart"),),
                "running",
            ),
            Change(ResourceId("pool", "images", "kvm-1"), Action.NOOP, (), "active"),
        )
    )
    buf, console = _console()
    views.plan(console, plan, title="kvmstate plan specs/x.yaml")
    text = buf.getvalue()
    assert "+ subvolume:storage:images  create" in text
    assert "mountpoint: /srv/images" in text
    assert "~ mount:kvm-1:images  update" in text
    assert "options: [vers=3] → [vers=4]" in text
    assert "mounted: false → true  (runtime)" in text
    assert "→ placement:web  migrate  kvm-1 → kvm-2 (live, 2 GiB)" in text
    assert "✓ target libvirtd: reachable" in text
    assert "✗ pool images on kvm-2: inactive" in text
    assert "- volume:kvm-1:old.qcow2  delete" in text
    assert "blocked: deleting needs --allow-destroy" in text
    assert "! domain:db  pending restart" in text
    assert "memory: 1GiB → 2GiB" in text
    assert "pool:kvm-1:images" not in text  # unchanged resources are not listed
    assert (  # wrapped to 80 columns
        "Plan: 1 to create, 1 to update, 1 to migrate, 1 to delete. 1 pending restart. 1 blocked."
        in " ".join(text.split())
    )
    assert max(len(line) for line in text.splitlines()) <= 80


def test_no_changes_is_one_line() -> None:
    plan = Plan((Change(ResourceId("pool", "images", "kvm-1"), Action.NOOP, (), "active"),))
    buf, console = _console()
    views.plan(console, plan)
    assert buf.getvalue().strip() == "No changes. 1 resources match the spec."


def test_a_noop_with_something_to_say_is_shown_above_no_changes() -> None:
    vid = ResourceId("volume", "img.qcow2", "kvm-1")
    note = Change(vid, Action.NOOP, (FieldDiff("source", "a", "b"),), "source differs: data kept")
    buf, console = _console()
    views.plan(console, Plan((note,)))
    lines = buf.getvalue().strip().splitlines()
    assert lines == [
        f"! {vid}  source differs: data kept",
        "No changes. 1 resources match the spec.",
    ]


def test_report_names_root_causes_and_groups_skipped() -> None:
    a, b, c = (
        ResourceId("mount", "images", "kvm-1"),
        ResourceId("pool", "images", "kvm-1"),
        ResourceId("domain", "web"),
    )
    report = Report(
        (
            Outcome(a, Status.FAILED, error="kvm-1: `mount /x` exit 32: access denied"),
            Outcome(b, Status.SKIPPED, cause=a),
            Outcome(c, Status.SKIPPED, cause=a),
        ),
        rounds=1,
        converged=False,
        elapsed=1.25,
    )
    buf, console = _console()
    views.report(console, report)
    text = buf.getvalue()
    assert "✗ mount:kvm-1:images: kvm-1: `mount /x` exit 32: access denied" in text
    assert "skipped because of mount:kvm-1:images: pool:kvm-1:images, domain:web" in text
    assert "Apply failed: 1 failed, 2 skipped, 0 changed in 1.2s." in text


def test_event_printer_shows_migration_result_with_downtime() -> None:
    buf, console = _console()
    printer = EventPrinter(console)
    printer(
        MigrationProgress(
            "web",
            "kvm-1",
            "kvm-2",
            memory_processed=10 << 20,
            memory_remaining=20 << 20,
            iteration=1,
            dirty_rate=0,
        )
    )
    printer(
        MigrationDone(domain="web", source="kvm-1", target="kvm-2", time_elapsed=2300, downtime=120)
    )
    printer.close()
    assert "→ web: migrated kvm-1 → kvm-2, in 2.30s, downtime 120 ms" in buf.getvalue()


def test_event_printer_json_mode_writes_one_object_per_line() -> None:
    buf, console = _console()
    out = io.StringIO()
    printer = EventPrinter(console, json_out=out)
    printer(ApplyStart(id="pool:kvm-1:images", action="create"))
    printer(ApplyDone(id="pool:kvm-1:images", action="create"))
    lines = out.getvalue().splitlines()
    assert [line.count("\n") for line in lines] == [0, 0]
    assert '"event": "apply-done"' in lines[1]
    assert buf.getvalue() == ""


class _Gone(io.StringIO):
    """A reader that went away: every write fails as on a closed pipe."""

    def write(self, s: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_reader_that_went_away_never_breaks_a_run() -> None:
    console = Console(file=_Gone(), width=80)
    for json_out in (_Gone(), None):  # --json events, then the human display
        printer = EventPrinter(console, json_out=json_out)
        printer(ApplyStart(id="placement:web", action="migrate"))
        printer(MigrationProgress("web", "kvm-1", "kvm-2", memory_processed=1))
        printer(ApplyDone(id="placement:web", action="migrate"))
        assert printer.json_out is None and console.quiet


def test_plan_into_a_closed_pipe_exits_without_a_traceback() -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    for extra in ((), ("--json",)):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvmstate.cli",
                "plan",
                "specs/seed.yaml",
                "--assume-empty",
                *extra,
            ],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        proc.stdout.close()  # `| head -0`: gone before kvmstate writes a byte
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, err
        assert "Traceback" not in err and "Exception ignored" not in err, err
