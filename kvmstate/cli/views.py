"""Plans, apply reports, the observed-state table and spec problems, as rich renderables
for a person (the JSON forms are the models' ``as_dict``)."""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Console
from rich.text import Text

from kvmstate.errors import Problem
from kvmstate.ids import ResourceId
from kvmstate.model import Action, Change, Plan, Report, Status
from kvmstate.ui.layout import Hanging

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
    Status.DOWN: ("↓", "yellow"),
}


def fmt_value(value: object) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(fmt_value(v) for v in value) + "]"
    return str(value)


def problems(console: Console, found: Iterable[Problem]) -> None:
    """One problem a line, as ``file:line: field: message``; a long one wraps, indented."""
    for p in found:
        style = "yellow" if p.severity == "warning" else "red"
        console.print(Hanging(Text(str(p), style=style), hang=4))


def _change_lines(c: Change, *, verbose: bool = False, deferred: bool = False) -> list[Hanging]:
    sym, style = SYMBOL[c.action]
    out: list[Hanging] = []
    if c.is_noop:
        if c.pending:
            head = Text(f"! {c.id}", style="yellow")
            head.append("  pending restart", style="yellow")
            out.append(Hanging(head, indent=2))
            for d in c.pending:
                line = Text(
                    f"{d.field}: {fmt_value(d.before)} → {fmt_value(d.after)}", style="yellow"
                )
                out.append(Hanging(line, indent=6))
            if c.reason:  # says how to converge it (apply --restart-pending)
                out.append(Hanging(Text(c.reason, style="dim"), indent=6))
        elif verbose:
            out.append(
                Hanging(Text(f"{c.id}  ({c.reason or 'no changes'})", style="dim"), indent=4)
            )
        return out
    head = Text(f"{sym} ", style=style)
    head.append(str(c.id), style="bold")
    head.append(f"  {c.action.value}", style=style)
    if c.reason:
        head.append(f"  {c.reason}", style="default")
    out.append(Hanging(head, indent=2))
    for d in c.diffs:
        line = Text(f"{d.field}: ", style="default")
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
        out.append(Hanging(line, indent=6))
    for chk in c.checks:
        mark, cstyle = ("✓", "green") if chk.ok else ("✗", "red")
        out.append(Hanging(Text(f"{mark} {chk.name}: {chk.detail}", style=cstyle), indent=6))
    if c.blocked and deferred:
        out.append(
            Hanging(
                Text(
                    f"blocked now: {c.blocked} (checked again once its dependencies are applied)",
                    style="yellow",
                ),
                indent=6,
            )
        )
    elif c.blocked:
        out.append(Hanging(Text(f"blocked: {c.blocked}", style="red bold"), indent=6))
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
    if plan.down:
        text += f" {len(plan.down)} on down hosts."
    return text


def plan(console: Console, p: Plan, *, title: str = "", verbose: bool = False) -> None:
    if title:
        console.print(Hanging(Text(title, style="bold"), hang=4))
    # NOOPs that still have something to say (a volume's source changed: data kept)
    for c in p.changes:
        if c.is_noop and c.diffs and not c.pending:
            console.print(Hanging(Text(f"! {c.id}  {c.reason}", style="yellow"), indent=2))
    if not p.has_changes and not p.errors and not p.down:
        console.print(
            Text(f"No changes. {len(p.changes)} resources match the spec.", style="green")
        )
        return
    for c in p.changes:
        for line in _change_lines(c, verbose=verbose, deferred=c.id in p.deferred):
            console.print(line)
    for rid, err in p.errors.items():
        console.print(Hanging(Text(f"✗ {rid}  cannot observe: {err}", style="red"), indent=2))
    _down_lines(console, p.down.items(), "; not observed")
    console.print()
    console.print(Hanging(Text(plan_summary(p), style="bold"), hang=len("Plan: ")))


def _down_lines(console: Console, down: Iterable[tuple[ResourceId, str]], after: str = "") -> None:
    """One line per reason a host is down, naming the resources on it."""
    by_why: dict[str, list[str]] = {}
    for rid, why in down:
        by_why.setdefault(why, []).append(str(rid))
    for why, ids in by_why.items():
        line = Text(f"↓ {why}{after}: {', '.join(ids)}", style="yellow")
        console.print(Hanging(line, indent=2))


def report(console: Console, r: Report) -> None:
    failed = [o for o in r.outcomes if o.status in (Status.FAILED, Status.BLOCKED)]
    skipped = [o for o in r.outcomes if o.status is Status.SKIPPED]
    changed = [o for o in r.outcomes if o.status is Status.CHANGED]
    down = [o for o in r.outcomes if o.status is Status.DOWN]
    for o in failed:
        mark, style = STATUS_STYLE[o.status]
        console.print(Hanging(Text(f"{mark} {o.id}: {o.error}", style=style), indent=2))
    _down_lines(console, ((o.id, o.error or "host down") for o in down))
    if skipped:
        by_cause: dict[str, list[str]] = {}
        for o in skipped:
            by_cause.setdefault(str(o.cause), []).append(str(o.id))
        for cause, ids in by_cause.items():
            line = Text(f"· skipped because of {cause}: {', '.join(ids)}", style="yellow")
            console.print(Hanging(line, indent=2))
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
                + (f"{len(down)} on down hosts, " if down else "")
                + f"{len(changed)} changed in {r.elapsed:.1f}s.",
                style="red bold",
            )
        )


def show(console: Console, p: Plan) -> None:
    """The observed state of every resource: what is there, and whether it matches."""
    from rich.table import Table

    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    # ids and values are Hanging cells: long ones wrap and fold onto more lines rather than end
    # in "…", and a "[...]" in them is text, not rich markup; the state is a word or two
    table.add_column("resource")
    table.add_column("state", no_wrap=True)
    table.add_column("observed")
    for c in p.changes:
        if c.is_noop and not c.pending:
            table.add_row(Hanging(str(c.id)), Text("ok", style="green"), Hanging(c.reason))
            continue
        if c.is_noop:
            fields = ", ".join(d.field for d in c.pending)
            table.add_row(
                Hanging(str(c.id)), Text("pending restart", style="yellow"), Hanging(fields)
            )
            continue
        classes: list[str] = sorted({d.drift for d in c.diffs})
        state = "missing" if c.action is Action.CREATE else "/".join(classes) or c.action.value
        detail = "; ".join(
            f"{d.field}: {fmt_value(d.before)} (want {fmt_value(d.after)})" for d in c.diffs
        )
        table.add_row(Hanging(str(c.id)), Text(state, style="red"), Hanging(detail or c.reason))
    for rid, err in p.errors.items():
        table.add_row(Hanging(str(rid)), Text("unknown", style="red bold"), Hanging(err))
    console.print(table)
