"""A toy resource kind, written as docs/resource-guide.md says, in this one file: a line of
text per note in ``/etc/kvmstate-notes`` on a host. ``test_toy_kind.py`` registers it with one
line and gets plan/apply/drift, the graph, prerequisites, import and docs through the same code
paths as the real kinds."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from kvmstate.facts import Fact
from kvmstate.model import Action, Change
from kvmstate.resources.base import DocSection, Resource, RunContext
from kvmstate.resources.common import diff
from kvmstate.resources.imports import Existing, Imported, Inventory
from kvmstate.resources.prereq import Requirement
from kvmstate.spec import Model, Name, State
from kvmstate.tabfiles import replace_lines
from kvmstate.transport.base import CommandResult, write_file

PATH = "/etc/kvmstate-notes"


# 1. the spec section: the model of one entry
class Note(Model):
    host: Name = Field(description="the host the note is kept on")
    text: str = Field(pattern=r"^[A-Za-z0-9 .,_-]{1,200}$", description="one line of text")
    state: State = "present"


# 2. a fact: a command plus a pure parser of its output
def parse_notes(res: CommandResult) -> dict[str, str]:
    """``NAME TEXT`` lines; a missing file is no notes."""
    if not res.ok:
        if "No such file" in res.stderr:
            return {}
        res.check()
    out = {}
    for line in res.stdout.splitlines():
        name, _, text = line.partition(" ")
        if name:
            out[name] = text
    return out


NOTES = Fact("notes", ("cat", "--", PATH), parse_notes)


# 3. the class
@dataclass(frozen=True)
class NoteState:
    text: str


class NoteResource(Resource[NoteState]):
    kind = "note"
    section = "notes"
    section_model = Note
    requires = (Requirement("notectl", "command", "kvmstate-notes", "notectl", "notes"),)
    docs = (DocSection("notes.NAME", Note, "A line of text kept on a host (a toy kind)."),)

    def __init__(self, spec: Any, name: str, host: str | None = None) -> None:
        self.note: Note = spec.notes[name]
        super().__init__(spec, name, self.note.host)

    @classmethod
    def expand(cls, spec: Any) -> Iterable[NoteResource]:
        return [cls(spec, n) for n in spec.notes]

    @property
    def absent(self) -> bool:
        return self.note.state == "absent"

    def facts(self) -> Iterable[tuple[str, Fact[Any]]]:
        return [(self.note.host, NOTES)]

    async def observe(self, ctx: RunContext) -> NoteState | None:
        notes = await ctx.facts(self.note.host).get(NOTES)
        return NoteState(notes[self.name]) if self.name in notes else None

    def diff(self, observed: NoteState | None) -> Change:
        if self.absent:
            if observed is None:
                return self.noop(f"note {self.name} is absent")
            return self.change(Action.DELETE, [diff("text", observed.text, None)], "absent")
        if observed is None:
            return self.change(Action.CREATE, [diff("text", None, self.note.text)])
        if observed.text != self.note.text:
            return self.change(Action.UPDATE, [diff("text", observed.text, self.note.text)])
        return self.noop(f"note {self.name} says {observed.text!r}")

    async def apply(
        self, change: Change, observed: NoteState | None, ctx: RunContext
    ) -> NoteState | None:
        shell = ctx.shell(self.note.host)
        current = (await shell.run(["cat", "--", PATH], check=False)).stdout
        line = None if self.absent else f"{self.name} {self.note.text}"
        self.log.info("%s: note %s -> %s", self.note.host, self.name, line)
        lines = current.splitlines(keepends=True)
        new = replace_lines(lines, lambda _i, s: s.partition(" ")[0] == self.name, line)
        await write_file(shell, PATH, new)
        ctx.invalidate(self.note.host)
        return await self.observe(ctx)

    # 4. import: what hosts have -> spec entries
    @classmethod
    def import_facts(cls) -> Sequence[Fact[Any]]:
        return (NOTES,)

    @classmethod
    def import_into(cls, invs: Sequence[Inventory], out: Imported, existing: Existing) -> None:
        for inv in invs:
            for name, text in inv.facts[NOTES.name].items():
                if name not in existing.names(cls.section):
                    out.data[cls.section][name] = {"host": inv.host, "text": text}
