"""Plans, reports and progress as rich renderables or JSON. The only module that prints."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import IO, TYPE_CHECKING, Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.measure import Measurement
from rich.text import Text

from kvmstate.errors import Problem
from kvmstate.model import Action, Change, Outcome, Plan, Report, Status

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

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


DEFAULT_WIDTH = 80


def output_width(stream: IO[str]) -> int | None:
    """``COLUMNS`` when it is set (as rich and argparse read it); else the terminal's own width
    on a terminal (None: rich asks it), and 80 columns anywhere else (a pipe, a file, cron)."""
    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    return None if stream.isatty() else DEFAULT_WIDTH


def make_console(
    *, stderr: bool = False, no_color: bool = False, file: IO[str] | None = None
) -> Console:
    no_color = no_color or bool(os.environ.get("NO_COLOR"))
    stream = file or (sys.stderr if stderr else sys.stdout)
    return Console(
        file=stream,
        no_color=no_color,
        highlight=False,
        width=output_width(stream),
        soft_wrap=False,
    )


_WORD = re.compile(r"\S+\s*")
_FOLD_AFTER = ("/:,", "-_.")  # where a word wider than a line (a path, an id) folds best


def _fold_point(word: str, room: int, *, started: bool) -> int:
    """How many characters of ``word`` to keep on a line with ``room`` cells left: as many as
    fit, back to just after the last '/', ':' or ',' among them, else after a '-', '_' or
    '.'; on a line that holds nothing else yet, only back as far as half of them."""
    n, used = 0, 0
    for ch in word:
        used += cell_len(ch)
        if used > room:
            break
        n += 1
    lowest = 1 if started else n // 2
    for chars in _FOLD_AFTER:
        for i in range(n - 1, lowest - 1, -1):
            if word[i] in chars:
                return i + 1
    return n


def wrap_offsets(plain: str, first: int, rest: int) -> list[int]:
    """Where to break one line of ``plain`` so that its first line takes at most ``first``
    cells and every other line ``rest``: between words, and inside a word only when it is
    wider than a line (then it starts on the current line and folds)."""
    breaks: list[int] = []
    width = first
    used = cell_len(plain) - cell_len(plain.lstrip())
    for m in _WORD.finditer(plain):
        word = m.group().rstrip()
        size = cell_len(word)
        if used + size <= width:
            used += cell_len(m.group())
            continue
        if used and (size <= rest or width - used < min(12, rest // 3)):
            breaks.append(m.start())  # on a line of its own (or folded from one)
            width, used = rest, 0
            if size <= width:
                used = cell_len(m.group())
                continue
        pos, end = m.start(), m.start() + len(word)
        while cell_len(plain[pos:end]) > width - used:
            cut = _fold_point(plain[pos:end], width - used, started=used > 0)
            cut = cut or (0 if used else 1)
            pos += cut
            breaks.append(pos)
            width, used = rest, 0
        used += cell_len(plain[pos : m.end()])
    return breaks


class Hanging:
    """One line of output, word-wrapped to the width it is given with a hanging indent (which
    rich has not): the first line starts ``indent`` columns in, the lines it wraps onto
    ``indent + hang``. A word wider than a line (a long path or id) is folded, never cut."""

    MIN_WIDTH = 20  # narrower than this, indenting would leave too little room: do not

    def __init__(self, text: Text | str, *, indent: int = 0, hang: int = 2) -> None:
        self.text = text if isinstance(text, Text) else Text(text)
        self.indent = indent
        self.hang = hang

    def lines(self, width: int) -> list[Text]:
        indent, hang = self.indent, self.hang
        if width - indent - hang < self.MIN_WIDTH:
            indent = hang = 0
        first, rest = max(width - indent, 1), max(width - indent - hang, 1)
        out: list[Text] = []
        for part in self.text.split("\n", allow_blank=True):
            part.expand_tabs()
            pieces = part.divide(wrap_offsets(part.plain, rest if out else first, rest))
            for piece in pieces:
                piece.rstrip()
                piece.pad_left(indent + hang if out else indent)
                out.append(piece)
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Text("\n").join(self.lines(options.max_width))

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        plain = self.text.plain
        longest = max((cell_len(w) for w in plain.split()), default=0)
        widest = max((cell_len(line) for line in plain.splitlines()), default=0)
        return Measurement(min(longest, 12), widest + self.indent).clamp(
            max_width=options.max_width
        )


def wrapped(console: Console, text: str, *, hang: int = 4) -> None:
    """Print plain text (several lines maybe) with each line wrapped under a hanging indent."""
    for line in text.splitlines():
        console.print(Hanging(line, hang=hang))


def fmt_value(value: Any) -> str:
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
    return text


def plan(console: Console, p: Plan, *, title: str = "", verbose: bool = False) -> None:
    if title:
        console.print(Hanging(Text(title, style="bold"), hang=4))
    if not p.has_changes and not p.errors:
        console.print(
            Text(f"No changes. {len(p.changes)} resources match the spec.", style="green")
        )
        return
    for c in p.changes:
        for line in _change_lines(c, verbose=verbose, deferred=c.id in p.deferred):
            console.print(line)
    for rid, err in p.errors.items():
        console.print(Hanging(Text(f"✗ {rid}  cannot observe: {err}", style="red"), indent=2))
    console.print()
    console.print(Hanging(Text(plan_summary(p), style="bold"), hang=len("Plan: ")))


def report(console: Console, r: Report) -> None:
    failed = [o for o in r.outcomes if o.status in (Status.FAILED, Status.BLOCKED)]
    skipped = [o for o in r.outcomes if o.status is Status.SKIPPED]
    changed = [o for o in r.outcomes if o.status is Status.CHANGED]
    for o in failed:
        mark, style = STATUS_STYLE[o.status]
        console.print(Hanging(Text(f"{mark} {o.id}: {o.error}", style=style), indent=2))
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
                f"{len(changed)} changed in {r.elapsed:.1f}s.",
                style="red bold",
            )
        )


def outcome_line(o: Outcome) -> Text:
    mark, style = STATUS_STYLE[o.status]
    action = o.change.action.value if o.change else ""
    return Text(f"  {mark} {o.id} {action} ({o.elapsed:.1f}s)", style=style)


def silence_stdout() -> None:
    """Point a stdout whose reader went away at /dev/null: the interpreter flushes it again at
    exit, and would print a BrokenPipeError there."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


class EventPrinter:
    """Shows apply/plan events as they happen: a line per finished change, a progress bar per
    migration. With ``json_out``, writes every event as one JSON line instead."""

    def __init__(self, console: Console, *, json_out: IO[str] | None = None) -> None:
        self.console = console
        self.json_out = json_out
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, event: Mapping[str, Any]) -> None:
        """Never raises for its output's sake: a reader that went away (``| head``, a closed
        pipe) must not break an apply half-way through a migration."""
        try:
            self._show(event)
        except OSError as e:  # BrokenPipeError and friends: stop showing, keep working
            self._output_lost(e)

    def _output_lost(self, e: OSError) -> None:
        import logging

        logging.getLogger(__name__).debug("output lost (%s); the run goes on", e)
        lost = self.json_out if self.json_out is not None else self.console.file
        self.json_out = None
        self.console.quiet = True
        if lost is sys.stdout:
            silence_stdout()

    def _show(self, event: Mapping[str, Any]) -> None:
        if self.json_out is not None:
            self.json_out.write(json.dumps(dict(event), default=str) + "\n")
            self.json_out.flush()
            return
        if self.console.quiet:
            return
        kind = event.get("event")
        if kind == "apply-start":
            self._line(Text(f"… {event['id']} {event['action']}", style="dim"))
        elif kind == "apply-done":
            self._line(Text(f"✓ {event['id']} {event['action']}", style="green"))
        elif kind == "apply-failed":
            self._line(Text(f"✗ {event['id']}: {event['error']}", style="red"))
        elif kind == "migration-progress":
            self._migration_progress(event)
        elif kind == "migration-done":
            self._migration_done(event)
        elif kind == "message":
            self._line(Text(str(event.get("text", ""))))

    def _migration_progress(self, event: Mapping[str, Any]) -> None:
        from kvmstate.units import human_size  # units imports pydantic

        if self._progress is None:
            self._progress = _migration_bars(self.console)
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
        parts = [f"→ {name}: migrated {event.get('source')} → {event.get('target')}"]
        if total is not None:
            parts.append(f"in {float(total) / 1000:.2f}s")
        if downtime is not None:
            parts.append(f"downtime {downtime} ms")
        self._line(Text(", ".join(parts), style="cyan bold"))

    def _line(self, text: Text) -> None:
        self.console.print(Hanging(text, indent=2))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _migration_bars(console: Console) -> Progress:
    """Progress of migrations, in two lines each: the domain's name (which may be long), then
    the bar and the numbers (the bar narrows to leave room for them)."""
    # only an apply that migrates shows progress bars: rich.progress is imported then
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
    from rich.table import Column

    class Bars(Progress):
        def get_renderables(self) -> Iterable[RenderableType]:
            for task in self.tasks:
                yield Hanging(Text(f"→ {task.fields['name']}", style="cyan"), indent=2)
                yield self.make_tasks_table([task])

    fixed = Column(no_wrap=True)
    return Bars(
        TextColumn("   ", table_column=fixed),
        BarColumn(bar_width=None, table_column=Column(max_width=24)),
        DownloadColumn(binary_units=True, table_column=fixed),
        TransferSpeedColumn(table_column=fixed),
        TextColumn("iter {task.fields[iteration]}  dirty {task.fields[dirty]}", table_column=fixed),
        console=console,
        transient=True,
    )


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)


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
