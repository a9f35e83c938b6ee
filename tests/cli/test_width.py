"""Every piece of kvmstate's human output fits 80 columns when it does not go to a terminal
(or when COLUMNS=80): long names and long paths wrap or fold, and are never cut off."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from resources.fakelab import LAB_SPEC
from rich.cells import cell_len
from rich.console import Console

from kvmstate import cli
from kvmstate.cli import views
from kvmstate.cli.progress import EventPrinter
from kvmstate.engine.graph import build_graph
from kvmstate.errors import Problem
from kvmstate.ids import ResourceId
from kvmstate.loader import parse_spec_text
from kvmstate.model import (
    Action,
    ApplyDone,
    ApplyFailed,
    ApplyStart,
    Change,
    Check,
    FieldDiff,
    Message,
    MigrationDone,
    MigrationProgress,
    Outcome,
    Plan,
    Report,
    Status,
)
from kvmstate.resources import KINDS
from kvmstate.testing.fake import FakeCluster, FakeMount
from kvmstate.ui.console import make_console
from kvmstate.ui.layout import Hanging

ROOT = Path(__file__).resolve().parents[2]
WIDTH = 80

# names as long as a spec allows them to be (63 at most), so that an id such as
# volume:<host>:<name> is far wider than 80 columns on its own
STORAGE = "storage-array-in-the-second-basement-rack-of-building-b"
KVM1 = "hypervisor-one-in-the-accounting-departments-rack-a"
KVM2 = "hypervisor-two-in-the-accounting-departments-rack-a"
GUEST = "general-ledger-database-for-the-accounting-department"
IMAGES = "shared-disk-images-of-the-accounting-department-cluster"
LONG_SPEC = (
    LAB_SPEC.replace("storage", STORAGE)
    .replace("kvm-1", KVM1)
    .replace("kvm-2", KVM2)
    .replace("guest", GUEST)
    .replace("images", IMAGES)
)
POOL_PATH = f"/var/lib/libvirt/{IMAGES}"
VOLUME = f"{GUEST}.qcow2"


def too_wide(text: str, width: int = WIDTH) -> list[str]:
    return [line for line in text.splitlines() if cell_len(line) > width]


def squeezed(text: str) -> str:
    """The text without whitespace: what wrapping and folding must leave unchanged."""
    return "".join(text.split())


def assert_fits(text: str, *keep: str) -> None:
    assert text.strip(), "no output"
    wide = too_wide(text)
    assert not wide, f"{len(wide)} lines over {WIDTH} columns:\n" + "\n".join(wide)
    for needle in keep:
        assert squeezed(needle) in squeezed(text), f"lost {needle!r} in:\n{text}"


def console() -> tuple[io.StringIO, Console]:
    buf = io.StringIO()
    return buf, make_console(file=buf, no_color=True)


# --- the width -------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_not_a_terminal_is_80_columns_unless_columns_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert make_console(file=io.StringIO()).width == 80
    for columns, width in (("132", 132), ("60", 60), ("wide", 80), ("0", 80), ("", 80)):
        monkeypatch.setenv("COLUMNS", columns)
        assert make_console(file=io.StringIO()).width == width, columns


def test_stdout_and_stderr_consoles_follow_the_same_rule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert make_console().width == 80
    assert make_console(stderr=True).width == 80
    monkeypatch.setenv("COLUMNS", "100")
    assert make_console(stderr=True).width == 100


def test_a_terminal_gets_the_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    # rich asks the terminal; COLUMNS (as a shell exports it) stands in for one here
    monkeypatch.setenv("COLUMNS", "157")
    assert make_console(file=_Terminal()).width == 157


@pytest.mark.parametrize("width", range(2, 41))
def test_hanging_lines_fit_any_width_and_keep_every_character(width: int) -> None:
    texts = [
        f"✗ volume:{KVM1}:{VOLUME}: {KVM1}: `qemu-img create` exit 1: {POOL_PATH}/{VOLUME}",
        "日本語のドメイン名 ist ein sehr langer Name: 仮想マシン/ディスク/イメージ.qcow2",
        "a  b   c " + "x" * 90 + " , / : - end",
        "",
    ]
    for text in texts:
        for indent, hang in ((0, 0), (2, 2), (6, 4)):
            lines = Hanging(text, indent=indent, hang=hang).lines(width)
            rendered = "\n".join(line.plain for line in lines)
            assert not too_wide(rendered, width), (width, rendered)
            assert squeezed(rendered) == squeezed(text)


# --- plans, reports, events, the observed-state table ----------------------------------------


def long_plan() -> Plan:
    subvol = ResourceId("subvolume", IMAGES, STORAGE)
    export = ResourceId("export", IMAGES, STORAGE)
    mount = ResourceId("mount", IMAGES, KVM2)
    pool = ResourceId("pool", IMAGES, KVM2)
    volume = ResourceId("volume", VOLUME, KVM1)
    return Plan(
        (
            Change(
                subvol,
                Action.CREATE,
                (
                    FieldDiff("mountpoint", None, f"/srv/{IMAGES}"),
                    FieldDiff("mount_options", None, ["noatime", "compress=zstd:3", "ssd"]),
                ),
            ),
            Change(
                mount,
                Action.UPDATE,
                (
                    FieldDiff(
                        "options",
                        ["vers=3", "nolock", "_netdev", "hard", "timeo=600"],
                        ["vers=4.2", "nolock", "_netdev", "hard", "timeo=600", "retrans=5"],
                    ),
                    FieldDiff("mounted", False, True, "runtime"),
                ),
                reason=f"{STORAGE}:/srv/{IMAGES} is not mounted at {POOL_PATH}",
            ),
            Change(
                pool,
                Action.CREATE,
                (FieldDiff("path", None, POOL_PATH),),
                blocked=f"{POOL_PATH} is not a directory on {KVM2}",
            ),
            Change(
                ResourceId("placement", GUEST),
                Action.MIGRATE,
                (FieldDiff("host", KVM1, KVM2, "runtime"),),
                reason=f"{KVM1} → {KVM2} (live, 2 GiB, auto-converge, bandwidth 100MiB/s)",
                checks=(
                    Check(f"libvirtd on {KVM2}", True, "reachable over qemu+ssh"),
                    Check(f"pool {IMAGES} on {KVM2}", False, f"inactive: {POOL_PATH} missing"),
                    Check("same disk path", True, f"{POOL_PATH}/{VOLUME} on both hosts"),
                ),
            ),
            Change(
                volume,
                Action.DELETE,
                (FieldDiff("capacity", "64MiB", None),),
                blocked="deleting needs --allow-destroy (it holds data no spec describes)",
            ),
            Change(
                ResourceId("domain", GUEST),
                Action.NOOP,
                (
                    FieldDiff("memory", "1GiB", "2GiB", "pending-restart"),
                    FieldDiff(
                        "cmdline",
                        "console=ttyS0",
                        "console=ttyS0 root=/dev/vda1 rw quiet systemd.unit=multi-user.target",
                        "pending-restart",
                    ),
                ),
                "running",
            ),
            Change(ResourceId("pool", IMAGES, KVM1), Action.NOOP, (), f"active at {POOL_PATH}"),
        ),
        errors={export: f"{STORAGE}: `exportfs -v` exit 1: cannot open /etc/exports.d/kvm.exports"},
        deferred=frozenset({pool}),
    )


def test_plan_with_long_ids_paths_checks_and_blocked_items_fits() -> None:
    buf, out = console()
    views.plan(out, long_plan(), title=f"kvmstate plan /etc/kvmstate/{IMAGES}/cluster.yaml")
    text = buf.getvalue()
    assert_fits(
        text,
        f"+ subvolume:{STORAGE}:{IMAGES} create",
        f"mountpoint: /srv/{IMAGES}",
        "options: [vers=3, nolock, _netdev, hard, timeo=600] → "
        "[vers=4.2, nolock, _netdev, hard, timeo=600, retrans=5]",
        f"→ placement:{GUEST} migrate {KVM1} → {KVM2}",
        f"✗ pool {IMAGES} on {KVM2}: inactive: {POOL_PATH} missing",
        f"blocked now: {POOL_PATH} is not a directory on {KVM2}",
        "blocked: deleting needs --allow-destroy (it holds data no spec describes)",
        f"! domain:{GUEST} pending restart",
        "systemd.unit=multi-user.target",
        f"✗ export:{STORAGE}:{IMAGES} cannot observe: {STORAGE}: `exportfs -v` exit 1",
        "Plan: 2 to create, 1 to update, 1 to migrate, 1 to delete. 1 pending restart. "
        "1 blocked. 1 could not be observed.",
    )
    # a wrapped line goes on indented under its start, not at the left margin
    for line in text.splitlines()[1:]:
        assert not line or line.startswith((" ", "Plan: ")), line


def test_verbose_plan_lists_unchanged_resources_within_80_columns() -> None:
    buf, out = console()
    views.plan(out, long_plan(), verbose=True)
    assert_fits(buf.getvalue(), f"pool:{KVM1}:{IMAGES} (active at {POOL_PATH})")


def test_report_with_long_errors_and_skipped_lists_fits() -> None:
    mount = ResourceId("mount", IMAGES, KVM1)
    skipped = [
        ResourceId("pool", IMAGES, KVM1),
        ResourceId("volume", VOLUME, KVM1),
        ResourceId("domain", GUEST),
        ResourceId("placement", GUEST),
    ]
    error = (
        f"{KVM1}: `mount -t nfs -o vers=3,nolock {STORAGE}:/srv/{IMAGES} {POOL_PATH}` "
        "exit 32: mount.nfs: access denied by server while mounting"
    )
    report = Report(
        (
            Outcome(mount, Status.FAILED, error=error),
            *(Outcome(rid, Status.SKIPPED, cause=mount) for rid in skipped),
            Outcome(
                ResourceId("volume", VOLUME, KVM2),
                Status.BLOCKED,
                error="deleting needs --allow-destroy",
            ),
        ),
        rounds=3,
        converged=False,
        elapsed=12.5,
    )
    buf, out = console()
    views.report(out, report)
    assert_fits(
        buf.getvalue(),
        f"✗ mount:{KVM1}:{IMAGES}: {error}",
        f"· skipped because of mount:{KVM1}:{IMAGES}: " + ", ".join(map(str, skipped)),
        "Apply failed: 2 failed, 4 skipped, 0 changed in 12.5s.",
    )


def test_apply_events_and_the_migration_line_fit() -> None:
    buf, out = console()
    printer = EventPrinter(out)
    vid = f"volume:{KVM1}:{VOLUME}"
    printer(ApplyStart(id=vid, action="create"))
    printer(ApplyDone(id=vid, action="create"))
    printer(ApplyFailed(id=vid, error=f"{KVM1}: qemu-img: {POOL_PATH}: no"))
    printer(Message(text=f"waiting for {GUEST} to boot on {KVM2} " * 2))
    printer(MigrationDone(domain=GUEST, source=KVM1, target=KVM2, time_elapsed=2300, downtime=120))
    printer.close()
    assert_fits(
        buf.getvalue(),
        f"… {vid} create",
        f"✓ {vid} create",
        f"✗ {vid}: {KVM1}: qemu-img: {POOL_PATH}: no",
        f"→ {GUEST}: migrated {KVM1} → {KVM2}, in 2.30s, downtime 120 ms",
    )


def test_migration_progress_bar_fits_with_a_long_domain_name() -> None:
    _, out = console()
    printer = EventPrinter(out)
    printer(
        MigrationProgress(
            GUEST,
            "kvm-1",
            "kvm-2",
            memory_processed=1536 << 20,
            memory_remaining=2560 << 20,
            iteration=12,
            dirty_rate=250 << 20,
        )
    )
    assert printer._progress is not None
    shown, view = console()
    view.print(printer._progress.get_renderable())
    printer.close()
    assert_fits(shown.getvalue(), f"→ {GUEST}", "1.5/4.0 GiB", "iter 12  dirty 250 MiB/s")


def columns(table: str) -> dict[str, str]:
    """A rendered table's text, column by column (the header names where each begins)."""
    lines = table.splitlines()
    header = lines[0]
    names = header.split()
    starts = [header.index(name) for name in names]
    bounds = [*zip(starts, [*starts[1:], None], strict=True)]
    return {
        name: "\n".join(line[a:b] for line in lines[1:])
        for name, (a, b) in zip(names, bounds, strict=True)
    }


def test_show_table_folds_long_ids_and_values_instead_of_cutting_them() -> None:
    buf, out = console()
    views.show(out, long_plan())
    text = buf.getvalue()
    assert_fits(text)
    assert "…" not in text
    cols = columns(text)
    for rid in (
        f"subvolume:{STORAGE}:{IMAGES}",
        f"volume:{KVM1}:{VOLUME}",
        f"export:{STORAGE}:{IMAGES}",
        f"domain:{GUEST}",
    ):
        assert squeezed(rid) in squeezed(cols["resource"]), cols["resource"]
    for value in (
        f"mountpoint: (none) (want /srv/{IMAGES})",
        "mount_options: (none) (want [noatime, compress=zstd:3, ssd])",
        f"active at {POOL_PATH}",
        "memory, cmdline",
        "cannot open /etc/exports.d/kvm.exports",
    ):
        assert squeezed(value) in squeezed(cols["observed"]), cols["observed"]
    states = {line.strip() for line in cols["state"].splitlines()}
    assert {"missing", "config/runtime", "pending restart", "unknown", "ok"} <= states


def test_spec_problems_wrap_indented_after_their_file_line_and_field() -> None:
    spec = "/etc/kvmstate/cluster.yaml"
    deep = f"/etc/kvmstate/{IMAGES}/{GUEST}.yaml"
    found = [
        Problem(
            spec,
            42,
            ("domains", "web", "memory"),
            "invalid size '2 parsecs': use a number with a unit, like 2GiB or 512MiB; " * 2,
        ),
        Problem(deep, 7, ("domains", GUEST, "memory"), "invalid size", severity="warning"),
    ]
    buf, out = console()
    views.problems(out, found)
    text = buf.getvalue()
    lines = text.splitlines()
    assert_fits(text, *map(str, found))
    assert lines[0].startswith(f"{spec}:42: domains.web.memory: invalid size '2 parsecs'")
    assert lines[1].startswith("    ") and lines[2].startswith("    "), lines
    # a path wider than a line folds (after a '/'); the field after it stays whole
    assert lines[3] == f"/etc/kvmstate/{IMAGES}/", lines
    assert f"    domains.{GUEST}.memory:" in lines, lines


# --- the command, as a pipe or cron sees it ----------------------------------------------------


def kvmstate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run(
        [sys.executable, "-m", "kvmstate.cli", *args],
        input="",
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**environ, "NO_COLOR": "1", **(env or {})},
        timeout=60,
    )


COMMANDS = [
    "validate",
    "plan",
    "apply",
    "drift",
    "evacuate",
    "show",
    "completion",
    "graph",
    "import",
]
LAB_COMMANDS = ["up", "down", "install", "selftest", "status", "shell", "guest-counter"]


@pytest.mark.parametrize("columns", [None, "80"])
@pytest.mark.parametrize(
    "argv",
    [
        [],
        *([c] for c in [*COMMANDS, "schema"]),
        ["lab"],
        *(["lab", c] for c in LAB_COMMANDS),
    ],
    ids=lambda a: " ".join(a) or "kvmstate",
)
def test_help_fits(argv: list[str], columns: str | None) -> None:
    r = kvmstate(*argv, "--help", env={"COLUMNS": columns} if columns else None)
    assert r.returncode == 0, r.stderr
    assert_fits(r.stdout)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_still_has_examples(command: str) -> None:
    r = kvmstate(command, "--help")
    assert "example" in r.stdout, r.stdout


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_scripts_fit_and_still_parse(shell: str) -> None:
    r = kvmstate("completion", shell)
    assert r.returncode == 0, r.stderr
    assert_fits(r.stdout, "--lock-timeout", "--detailed-exitcode")
    assert shutil.which(shell), f"{shell} not installed (make install puts it there)"
    check = subprocess.run([shell, "-n"], input=r.stdout, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr


@pytest.fixture
def long_spec(tmp_path: Path) -> Path:
    deep = tmp_path / "etc" / "kvmstate" / IMAGES
    deep.mkdir(parents=True)
    path = deep / "accounting-department-cluster.yaml"
    path.write_text(LONG_SPEC)
    return path


def test_graph_text_fits_and_names_every_dependency(long_spec: Path) -> None:
    r = kvmstate("graph", str(long_spec))
    assert r.returncode == 0, r.stderr
    graph = build_graph(parse_spec_text(LONG_SPEC).spec, KINDS)
    assert_fits(r.stdout, f"domain:{GUEST} <- pool:{KVM1}:{IMAGES}, volume:{KVM1}:{VOLUME}")
    assert squeezed(r.stdout) == squeezed(graph.to_text())
    # a line per resource; what it wraps onto is indented
    assert sum(not line.startswith(" ") for line in r.stdout.splitlines()) == len(graph)


def test_plan_assume_empty_of_a_long_spec_fits(long_spec: Path) -> None:
    r = kvmstate("plan", str(long_spec), "--assume-empty")
    assert r.returncode == 2, r.stderr
    assert_fits(r.stdout, f"kvmstate plan {long_spec}", f"+ volume:{KVM1}:{VOLUME} create")


def test_plan_honours_a_wider_columns(long_spec: Path) -> None:
    r = kvmstate("plan", str(long_spec), "--assume-empty", env={"COLUMNS": "200"})
    assert max(cell_len(line) for line in r.stdout.splitlines()) > 100
    assert not too_wide(r.stdout, 200)


def test_validate_of_a_long_spec_fits(long_spec: Path) -> None:
    r = kvmstate("validate", str(long_spec))
    assert r.returncode == 0, r.stderr
    assert_fits(r.stdout, f"{long_spec}: valid (3 hosts")


def test_spec_errors_at_a_long_path_fit_and_keep_the_field_whole(long_spec: Path) -> None:
    text = LONG_SPEC.replace("memory: 128MiB", "memory: 128 parsecs")
    long_spec.write_text(text)
    r = kvmstate("validate", str(long_spec))
    assert r.returncode == 1
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "128 parsecs" in t)
    assert_fits(r.stderr, f"{long_spec}:{line}: domains.{GUEST}.memory: invalid size")
    assert any(t.strip() == f"domains.{GUEST}.memory:" for t in r.stderr.splitlines())


# --- show, drift, apply and evacuate on the fake cluster, in-process ---------------------------


class _Kept:
    """The fake cluster for one kvmstate command after another: close() keeps its state."""

    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster

    def shell(self, host: str) -> Any:
        return self.cluster.shell(host)

    def libvirt(self, host: str) -> Any:
        return self.cluster.libvirt(host)

    async def close(self) -> None:
        return None


@contextlib.asynccontextmanager
async def _no_cluster_lock(*args: Any, **kwargs: Any) -> AsyncIterator[str]:
    yield STORAGE


def _prepare(cluster: FakeCluster) -> None:
    """fakelab.prepare() for the long host names."""
    storage = cluster[STORAGE]
    storage.add_btrfs("/dev/loop0", label="labpool", uuid="9492ea86")
    storage.dirs |= {"/srv/btrfs"}
    storage.mounts.append(
        FakeMount(
            "/dev/loop0", "/srv/btrfs", "btrfs", ("rw", "relatime"), "/", ("subvolid=5", "subvol=/")
        )
    )
    for name in (KVM1, KVM2):
        cluster[name].bridges.add("br0")
        cluster[name].users.add("libvirt-qemu")
        cluster[name].groups.add("kvm")


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def on_fake_cluster(
    long_spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> Iterator[tuple[Run, FakeCluster]]:
    import kvmstate.ops.clusterlock
    import kvmstate.transport.real

    cluster = FakeCluster(parse_spec_text(LONG_SPEC).spec)
    _prepare(cluster)
    monkeypatch.setattr(kvmstate.transport.real, "RealTransports", lambda spec: _Kept(cluster))
    monkeypatch.setattr(kvmstate.ops.clusterlock, "cluster_lock", _no_cluster_lock)
    monkeypatch.setenv("KVMSTATE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("NO_COLOR", "1")

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main([a.replace("SPEC", str(long_spec)) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    yield run, cluster
    asyncio.run(cluster.close())


def test_apply_drift_show_and_evacuate_on_a_long_spec_fit(
    on_fake_cluster: tuple[Run, FakeCluster],
) -> None:
    run, cluster = on_fake_cluster
    code, out, err = run("apply", "SPEC", "--auto-approve")
    assert code == 0, out + err
    assert_fits(out, f"+ volume:{KVM1}:{VOLUME} create", "Apply complete:")
    assert not too_wide(err)

    code, out, err = run("show", "SPEC")
    assert code == 0, out + err
    assert_fits(out)
    assert squeezed(f"volume:{KVM1}:{VOLUME}") in squeezed(columns(out)["resource"])

    storage, kvm2 = cluster[STORAGE], cluster[KVM2]
    fstab = storage.read("/etc/fstab") or ""
    storage.write("/etc/fstab", fstab.replace(f"subvol={IMAGES},noatime", f"subvol={IMAGES}"))
    kvm2.mounts.remove(kvm2.mount_at(POOL_PATH))  # type: ignore[arg-type]
    code, out, err = run("drift", "SPEC")
    assert code == 2, out + err
    assert_fits(
        out, f"drift (config): subvolume:{STORAGE}:{IMAGES} update fstab:", f"mount:{KVM2}:{IMAGES}"
    )
    assert not too_wide(err)

    code, out, err = run("show", "SPEC")
    assert_fits(out)
    resources = squeezed(columns(out)["resource"])
    assert squeezed(f"mount:{KVM2}:{IMAGES}") in resources
    assert squeezed(f"subvolume:{STORAGE}:{IMAGES}") in resources

    code, out, err = run("apply", "SPEC", "--auto-approve")
    assert code == 0, out + err
    code, out, err = run("evacuate", KVM1, "SPEC", "--auto-approve")
    assert code == 0, out + err
    assert_fits(out, f"→ {GUEST}: migrated {KVM1} → {KVM2}")
    assert not too_wide(err)


def test_lab_status_table_fits() -> None:
    from kvmstate.lab import cli as lab_cli

    lab_dir = f"/var/lib/kvmstate-lab/{IMAGES}"
    status: dict[str, object] = {
        "dir": lab_dir,
        "up": True,
        "spec": f"{lab_dir}/lab-spec-with-a-long-name.yaml",
        "ssh_config": f"{lab_dir}/ssh_config",
        "hosts": [
            {
                "name": name,
                "role": role,
                "address": address,
                "daemons": [
                    {"name": d, "pid": 100000 + i, "alive": i % 3 != 0}
                    for i, d in enumerate(["sshd", "libvirtd", "virtlogd", "rpc.mountd", "nfsd"])
                ],
            }
            for name, role, address in (
                (STORAGE, "storage", "10.77.0.10"),
                (KVM1, "kvm", "10.77.0.21"),
                (KVM2, "kvm", "10.77.0.22"),
            )
        ],
    }
    buf, out = console()
    lab_cli._print_status(out, status)
    text = buf.getvalue()
    assert_fits(text, f"ssh -F {lab_dir}/ssh_config")
    assert "…" not in text
    cells: dict[int, str] = {}
    for line in text.splitlines():
        if line.startswith("│"):
            for i, cell in enumerate(line.strip("│").split("│")):
                cells[i] = cells.get(i, "") + cell
    assert all(squeezed(name) in squeezed(cells[0]) for name in (STORAGE, KVM1, KVM2))
    assert squeezed("rpc.mountd(100003 dead), nfsd(100004)") in squeezed(cells[3])
