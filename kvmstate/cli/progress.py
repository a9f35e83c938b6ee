"""Apply's progress as it happens: a line per finished change, a progress bar per migration
and per image sent into a volume, or every event as one JSON line."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any

from rich.console import Console, RenderableType
from rich.text import Text

from kvmstate.model import (
    ApplyDone,
    ApplyFailed,
    ApplyStart,
    Event,
    Message,
    MigrationDone,
    MigrationProgress,
    VolumeProgress,
)
from kvmstate.ui.console import silence_stdout
from kvmstate.ui.layout import Hanging

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


log = logging.getLogger(__name__)


class EventPrinter:
    """Shows apply/plan events as they happen: a line per finished change, a progress bar per
    migration. With ``json_out``, writes every event as one JSON line instead."""

    def __init__(self, console: Console, *, json_out: IO[str] | None = None) -> None:
        self.console = console
        self.json_out = json_out
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, event: Event) -> None:
        """Never raises for its output's sake: a reader that went away (``| head``, a closed
        pipe) must not break an apply half-way through a migration."""
        try:
            self._show(event)
        except OSError as e:  # BrokenPipeError and friends: stop showing, keep working
            self._output_lost(e)

    def _output_lost(self, e: OSError) -> None:
        log.debug("output lost (%s); the run goes on", e)
        lost = self.json_out if self.json_out is not None else self.console.file
        self.json_out = None
        self.console.quiet = True
        if lost is sys.stdout:
            silence_stdout()

    def _show(self, event: Event) -> None:
        if self.json_out is not None:
            self.json_out.write(json.dumps(dict(event), default=str) + "\n")
            self.json_out.flush()
            return
        if self.console.quiet:
            return
        if isinstance(event, ApplyStart):
            self._line(Text(f"… {event.id} {event.action}", style="dim"))
        elif isinstance(event, ApplyDone):
            self._line(Text(f"✓ {event.id} {event.action}", style="green"))
        elif isinstance(event, ApplyFailed):
            self._line(Text(f"✗ {event.id}: {event.error}", style="red"))
        elif isinstance(event, MigrationProgress):
            self._migration_progress(event)
        elif isinstance(event, MigrationDone):
            self._migration_done(event)
        elif isinstance(event, VolumeProgress):
            self._volume_progress(event)
        elif isinstance(event, Message):
            self._line(Text(event.text))

    def _volume_progress(self, event: VolumeProgress) -> None:
        """An image sent into a volume: a bar on the same display as migrations (rich shows
        one live display at a time), removed with a line when all bytes are sent."""
        if self._progress is None:
            self._progress = _migration_bars(self.console)
            self._progress.start()
        key = f"volume:{event.volume}"
        fields: dict[str, Any] = {"label": f"↑ {event.volume}", "detail": "upload"}
        if key not in self._tasks:
            self._tasks[key] = self._progress.add_task("", total=event.total, **fields)
        self._progress.update(self._tasks[key], completed=event.sent, total=event.total)
        if event.sent >= event.total:
            from kvmstate.units import human_size

            self._progress.remove_task(self._tasks.pop(key))
            if not self._tasks:
                self._progress.stop()
                self._progress = None
            self._line(Text(f"↑ {event.volume}: sent {human_size(event.total)}", style="cyan"))

    def _migration_progress(self, event: MigrationProgress) -> None:
        from kvmstate.units import human_size  # units imports pydantic

        if self._progress is None:
            self._progress = _migration_bars(self.console)
            self._progress.start()
        name = event.domain
        processed = float(event.memory_processed or event.data_processed or 0)
        remaining = float(event.memory_remaining or event.data_remaining or 0)
        total = processed + remaining or None
        dirty = event.dirty_rate
        fields: dict[str, Any] = {
            "name": name,
            "iteration": event.iteration or 0,
            "dirty": f"{human_size(float(dirty))}/s" if dirty else "-",
        }
        fields["detail"] = f"iter {fields['iteration']}  dirty {fields['dirty']}"
        if name not in self._tasks:
            self._tasks[name] = self._progress.add_task("", total=total, **fields)
        self._progress.update(self._tasks[name], completed=processed, total=total, **fields)

    def _migration_done(self, event: MigrationDone) -> None:
        name = event.domain
        if self._progress is not None and name in self._tasks:
            self._progress.remove_task(self._tasks.pop(name))
            if not self._tasks:
                self._progress.stop()
                self._progress = None
        total = event.time_elapsed
        downtime = event.downtime
        parts = [f"→ {name}: migrated {event.source} → {event.target}"]
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
                label = task.fields.get("label") or f"→ {task.fields['name']}"
                yield Hanging(Text(label, style="cyan"), indent=2)
                yield self.make_tasks_table([task])

    fixed = Column(no_wrap=True)
    return Bars(
        TextColumn("   ", table_column=fixed),
        BarColumn(bar_width=None, table_column=Column(max_width=24)),
        DownloadColumn(binary_units=True, table_column=fixed),
        TransferSpeedColumn(table_column=fixed),
        TextColumn("{task.fields[detail]}", table_column=fixed),
        console=console,
        transient=True,
    )
