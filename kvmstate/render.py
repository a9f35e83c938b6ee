"""Plans, reports and progress as rich renderables or JSON. The only module that prints."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from kvmstate.errors import Problem
from kvmstate.model import Action, Change, Outcome, Plan, Report, Status
from kvmstate.units import human_size

SYMBOL = {
    Action.NOOP: (" ", "dim"),
    Action.CREATE: ("+", "green"),
    Action.UPDATE: ("~", "yellow"),
    Action.REPLACE: ("±", "magenta"),
    Action.MIGRATE: ("→", "cyan"),
    Action.DELETE: ("-", "red"),
}
STATUS_STYLE = {
    Status.OK: ("✓", "green"),
    Status.CHANGED: ("✓", "green"),
    Status.FAILED: ("✗", "red bold"),
    Status.BLOCKED: ("⊘", "red"),
    Status.SKIPPED: ("·", "yellow"),
}


def make_console(
    *, stderr: bool = False, no_color: bool = False, file: IO[str] | None = None
) -> Console:
    no_color = no_color or bool(os.environ.get("NO_COLOR"))
    width = None if (file or (sys.stderr if stderr else sys.stdout)).isatty() else 100
    return Console(
        file=file or (sys.stderr if stderr else sys.stdout),
        no_color=no_color,
        highlight=False,
        width=width,
        soft_wrap=False,
    )


def fmt_value(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(fmt_value(v) for v in value) + "]"
    return str(value)


def problems(console: Console, found: Iterable[Problem]) -> None:
    for p in found:
        style = "yellow" if p.severity == "warning" else "red"
        console.print(Text(str(p), style=style), soft_wrap=True)


def _change_lines(c: Change, *, verbose: bool = False, deferred: bool = False) -> list[Text]:
    sym, style = SYMBOL[c.action]
    out: list[Text] = []
    if c.is_noop:
        if c.pending:
            head = Text(f"  ! {c.id}", style="yellow")
            head.append("  pending restart", style="yellow")
            out.append(head)
            for d in c.pending:
                out.append(
                    Text(
                        f"      {d.field}: {fmt_value(d.before)} → {fmt_value(d.after)}",
                        style="yellow",
                    )
                )
        elif verbose:
            out.append(Text(f"    {c.id}  ({c.reason or 'no changes'})", style="dim"))
        return out
    head = Text(f"  {sym} ", style=style)
    head.append(str(c.id), style="bold")
    head.append(f"  {c.action.value}", style=style)
    if c.reason:
        head.append(f"  {c.reason}", style="default")
    out.append(head)
    for d in c.diffs:
        line = Text(f"      {d.field}: ", style="default")
        if c.action is Action.CREATE or d.before is None:
            line.append(fmt_value(d.after), style="green")
        elif c.action is Action.DELETE:
            line.append(fmt_value(d.before), style="red")
        else:
            line.append(fmt_value(d.before), style="red")
            line.append(" → ")
            line.append(fmt_value(d.after), style="green")
        if d.drift != "config":
            line.append(f"  ({d.drift})", style="dim")
        out.append(line)
    for chk in c.checks:
        mark, cstyle = ("✓", "green") if chk.ok else ("✗", "red")
        out.append(Text(f"      {mark} {chk.name}: {chk.detail}", style=cstyle))
    if c.blocked and deferred:
        out.append(
            Text(
                f"      blocked now: {c.blocked} (checked again once its dependencies are applied)",
                style="yellow",
            )
        )
    elif c.blocked:
        out.append(Text(f"      blocked: {c.blocked}", style="red bold"))
    return out


def plan_summary(plan: Plan) -> str:
    counts = plan.counts()
    parts = [
        f"{counts.get(a.value, 0)} to {a.value}"
        for a in (Action.CREATE, Action.UPDATE, Action.MIGRATE, Action.REPLACE, Action.DELETE)
        if counts.get(a.value) or a in (Action.CREATE, Action.UPDATE, Action.DELETE)
    ]
    pending = sum(1 for c in plan.changes if c.is_noop and c.pending)
    blocked = sum(1 for c in plan.changes if c.blocked and c.id not in plan.deferred)
    text = "Plan: " + ", ".join(parts) + "."
    if pending:
        text += f" {pending} pending restart."
    if blocked:
        text += f" {blocked} blocked."
    if plan.errors:
        text += f" {len(plan.errors)} could not be observed."
    return text


def plan(console: Console, p: Plan, *, title: str = "", verbose: bool = False) -> None:
    if title:
        console.print(Text(title, style="bold"))
    if not p.has_changes and not p.errors:
        console.print(
            Text(f"No changes. {len(p.changes)} resources match the spec.", style="green")
        )
        return
    for c in p.changes:
        for line in _change_lines(c, verbose=verbose, deferred=c.id in p.deferred):
            console.print(line)
    for rid, err in p.errors.items():
        console.print(Text(f"  ✗ {rid}  cannot observe: {err}", style="red"))
    console.print()
    console.print(Text(plan_summary(p), style="bold"))


def report(console: Console, r: Report) -> None:
    failed = [o for o in r.outcomes if o.status in (Status.FAILED, Status.BLOCKED)]
    skipped = [o for o in r.outcomes if o.status is Status.SKIPPED]
    changed = [o for o in r.outcomes if o.status is Status.CHANGED]
    for o in failed:
        mark, style = STATUS_STYLE[o.status]
        console.print(Text(f"  {mark} {o.id}: {o.error}", style=style))
    if skipped:
        by_cause: dict[str, list[str]] = {}
        for o in skipped:
            by_cause.setdefault(str(o.cause), []).append(str(o.id))
        for cause, ids in by_cause.items():
            console.print(Text(f"  · skipped because of {cause}: {', '.join(ids)}", style="yellow"))
    if r.converged:
        console.print(
            Text(
                f"Apply complete: {len(changed)} changed, "
                f"{len(r.outcomes) - len(changed)} unchanged in {r.elapsed:.1f}s "
                f"({r.rounds} round{'s' if r.rounds != 1 else ''}).",
                style="green bold",
            )
        )
    else:
        console.print(
            Text(
                f"Apply failed: {len(failed)} failed, {len(skipped)} skipped, "
                f"{len(changed)} changed in {r.elapsed:.1f}s.",
                style="red bold",
            )
        )


def outcome_line(o: Outcome) -> Text:
    mark, style = STATUS_STYLE[o.status]
    action = o.change.action.value if o.change else ""
    return Text(f"  {mark} {o.id} {action} ({o.elapsed:.1f}s)", style=style)


class EventPrinter:
    """Shows apply/plan events as they happen: a line per finished change, a progress bar per
    migration. With ``json_out``, writes every event as one JSON line instead."""

    def __init__(self, console: Console, *, json_out: IO[str] | None = None) -> None:
        self.console = console
        self.json_out = json_out
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, event: Mapping[str, Any]) -> None:
        if self.json_out is not None:
            self.json_out.write(json.dumps(dict(event), default=str) + "\n")
            self.json_out.flush()
            return
        kind = event.get("event")
        if kind == "apply-start":
            self.console.print(Text(f"  … {event['id']} {event['action']}", style="dim"))
        elif kind == "apply-done":
            self.console.print(Text(f"  ✓ {event['id']} {event['action']}", style="green"))
        elif kind == "apply-failed":
            self.console.print(Text(f"  ✗ {event['id']}: {event['error']}", style="red"))
        elif kind == "migration-progress":
            self._migration_progress(event)
        elif kind == "migration-done":
            self._migration_done(event)
        elif kind == "message":
            self.console.print(Text(f"  {event.get('text', '')}"))

    def _migration_progress(self, event: Mapping[str, Any]) -> None:
        if self._progress is None:
            self._progress = Progress(
                TextColumn("  → {task.fields[name]}"),
                BarColumn(bar_width=24),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TextColumn("iter {task.fields[iteration]}  dirty {task.fields[dirty]}"),
                console=self.console,
                transient=True,
            )
            self._progress.start()
        name = str(event.get("domain"))
        processed = float(event.get("memory_processed") or event.get("data_processed") or 0)
        remaining = float(event.get("memory_remaining") or event.get("data_remaining") or 0)
        total = processed + remaining or None
        dirty = event.get("dirty_rate")
        fields = {
            "name": name,
            "iteration": event.get("iteration", 0),
            "dirty": f"{human_size(float(dirty))}/s" if dirty else "-",
        }
        if name not in self._tasks:
            self._tasks[name] = self._progress.add_task("", total=total, **fields)
        self._progress.update(self._tasks[name], completed=processed, total=total, **fields)

    def _migration_done(self, event: Mapping[str, Any]) -> None:
        name = str(event.get("domain"))
        if self._progress is not None and name in self._tasks:
            self._progress.remove_task(self._tasks.pop(name))
            if not self._tasks:
                self._progress.stop()
                self._progress = None
        total = event.get("time_elapsed")
        downtime = event.get("downtime")
        parts = [f"  → {name}: migrated {event.get('source')} → {event.get('target')}"]
        if total is not None:
            parts.append(f"in {float(total) / 1000:.2f}s")
        if downtime is not None:
            parts.append(f"downtime {downtime} ms")
        self.console.print(Text(", ".join(parts), style="cyan bold"))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)


def show(console: Console, p: Plan) -> None:
    """The observed state of every resource: what is there, and whether it matches."""
    from rich.table import Table

    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    table.add_column("resource", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("observed")
    for c in p.changes:
        if c.is_noop and not c.pending:
            table.add_row(str(c.id), Text("ok", style="green"), c.reason)
            continue
        if c.is_noop:
            fields = ", ".join(d.field for d in c.pending)
            table.add_row(str(c.id), Text("pending restart", style="yellow"), fields)
            continue
        classes: list[str] = sorted({d.drift for d in c.diffs})
        state = "missing" if c.action is Action.CREATE else "/".join(classes) or c.action.value
        detail = "; ".join(
            f"{d.field}: {fmt_value(d.before)} (want {fmt_value(d.after)})" for d in c.diffs
        )
        table.add_row(str(c.id), Text(state, style="red"), detail or c.reason)
    for rid, err in p.errors.items():
        table.add_row(str(rid), Text("unknown", style="red bold"), err)
    console.print(table)
