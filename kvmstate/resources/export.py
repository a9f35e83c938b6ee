"""An NFS export: its line in /etc/exports and its entry in the live table (``exportfs -v``).

kvmstate edits ``/etc/exports`` itself (the line for the export's path; every other line kept
byte for byte, atomic write) rather than a file of its own in ``/etc/exports.d``: the seed
procedure and operators look there, and the lab's ganesha ``exportfs`` stand-in reads only
``/etc/exports``. ``/etc/exports.d/*.exports`` is still read: the same path exported there too
would make two competing entries, so that is reported (blocked) instead of guessed at.
Options compare as sets; against the live table only the options the spec lists are checked
(``exportfs -v`` adds defaults such as wdelay, hide, sec=sys, secure, no_all_squash).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kvmstate import hostfacts, nfsexports
from kvmstate import spec as spec_models
from kvmstate.checks import covering_subvolume
from kvmstate.errors import RefusedError
from kvmstate.facts import Fact
from kvmstate.ids import ResourceId
from kvmstate.model import Action, Change, FieldDiff
from kvmstate.resources import prereq
from kvmstate.resources.base import DocSection, Resource, RunContext
from kvmstate.resources.common import diff
from kvmstate.resources.imports import Existing, Imported, Inventory, unique
from kvmstate.spec import Export, Spec
from kvmstate.transport.base import read_file, write_file

EXPORTS = "/etc/exports"
Clients = tuple[tuple[str, frozenset[str]], ...]


@dataclass(frozen=True)
class ExportState:
    file: Clients | None  # this path's clients in /etc/exports (None: no line)
    live: Clients  # this path's clients in the live table
    elsewhere: tuple[str, ...] = ()  # other files under /etc/exports.d exporting the path


def _clients(items: Iterable[tuple[str, Iterable[str]]]) -> Clients:
    return tuple(sorted((c, frozenset(o)) for c, o in items))


def _show(clients: Clients | None) -> str | None:
    if clients is None:
        return None
    return " ".join(f"{c}({','.join(sorted(o))})" for c, o in clients) or "(none)"


class ExportResource(Resource[ExportState]):
    kind = "export"
    section = "exports"
    section_model = spec_models.Export
    docs = (
        DocSection(
            "exports.NAME",
            spec_models.Export,
            "An NFS export in /etc/exports, active in the live table.",
        ),
        DocSection(
            "exports.NAME.clients[]",
            spec_models.ExportClient,
            "Who may mount the export, with which options.",
        ),
    )
    requires = (prereq.EXPORTFS,)

    @classmethod
    def import_into(cls, invs: Sequence[Inventory], out: Imported, existing: Existing) -> None:
        import_exports(invs, out, existing)

    def __init__(self, spec: Spec, name: str, host: str | None = None) -> None:
        super().__init__(spec, name, host)
        self.ex: Export = spec.exports[name]
        self.h: str = self.ex.host

    @classmethod
    def expand(cls, spec: Spec) -> Iterable[ExportResource]:
        return [cls(spec, n, e.host) for n, e in spec.exports.items()]

    @property
    def absent(self) -> bool:
        return self.ex.state == "absent"

    def depends_on(self) -> frozenset[ResourceId]:
        sv = covering_subvolume(self.spec, self.h, self.ex.path)
        return frozenset({ResourceId("subvolume", sv, self.h)} if sv else set())

    _FACTS: tuple[Fact[Any], ...] = (hostfacts.EXPORTS, hostfacts.EXPORTS_D, hostfacts.EXPORTFS)

    def facts(self) -> Iterable[tuple[str, Fact[Any]]]:
        return [(self.h, f) for f in self._FACTS]

    def desired(self) -> Clients:
        return _clients((c.network, c.options) for c in self.ex.clients)

    def line(self) -> str:
        return nfsexports.export_line(
            self.ex.path, [(c.network, c.options) for c in self.ex.clients]
        )

    async def observe(self, ctx: RunContext) -> ExportState | None:
        facts = ctx.facts(self.h)
        await facts.prefetch(self._FACTS)
        text: str | None = await facts.get(hostfacts.EXPORTS)
        lines = nfsexports.parse_exports(text or "")
        mine = [ln for ln in lines if ln.path == self.ex.path]
        file = _clients(c for ln in mine for c in ln.clients) if mine else None
        elsewhere = tuple(
            sorted(
                {
                    ln.source
                    for ln in await facts.get(hostfacts.EXPORTS_D)
                    if ln.path == self.ex.path
                }
            )
        )
        table = await facts.get(hostfacts.EXPORTFS)
        live = _clients((c, o) for (p, c), o in table.items() if p == self.ex.path)
        if file is None and not live and not elsewhere:
            return None
        return ExportState(file, live, elsewhere)

    def diff(self, observed: ExportState | None) -> Change:
        if self.absent:
            if observed is None or (observed.file is None and not observed.live):
                return self.noop(f"{self.ex.path} is not exported")
            return self.change(
                Action.DELETE, [diff("exported", _show(observed.live), None)], "state: absent"
            )
        o = observed or ExportState(None, ())
        want = self.desired()
        diffs: list[FieldDiff] = []
        if o.file is None or {c: set(x) for c, x in o.file} != {c: set(x) for c, x in want}:
            diffs.append(diff("/etc/exports", _show(o.file), _show(want)))
        live = dict(o.live)
        bad = [
            c
            for c, opts in want
            if c not in live or not nfsexports.normalize_export_options(opts) <= live[c]
        ]
        extra = sorted(set(live) - {c for c, _ in want})
        if bad or extra:
            diffs.append(diff("live", _show(o.live), _show(want), "runtime"))
        if not diffs:
            return self.noop(f"exported {self.ex.path} to {_show(want)}")
        action = Action.CREATE if observed is None else Action.UPDATE
        ch = self.change(action, diffs, f"export {self.ex.path} on {self.h}")
        if o.elsewhere:
            return ch.with_blocked(
                f"{self.ex.path} is also exported by {', '.join(o.elsewhere)}; "
                "remove it there (kvmstate manages it in /etc/exports)"
            )
        return ch

    async def apply(
        self, change: Change, observed: ExportState | None, ctx: RunContext
    ) -> ExportState | None:
        shell = ctx.shell(self.h)
        if not self.absent:
            res = await shell.run(["test", "-d", self.ex.path], check=False)
            if not res.ok:
                raise RefusedError(f"{self.h}: export path {self.ex.path} does not exist")
        current = await read_file(shell, EXPORTS)
        new = nfsexports.exports_with(current, self.ex.path, None if self.absent else self.line())
        if new != (current or ""):
            self.log.info("%s: writing %s line for %s", self.h, EXPORTS, self.ex.path)
            await write_file(shell, EXPORTS, new)
        self.log.info("%s: exportfs -ra", self.h)
        await shell.run(["exportfs", "-ra"])
        ctx.invalidate(self.h)
        return await self.observe(ctx)


# --- import: what hosts have -> spec entries ------------------------------------------------------


def export_names(out: Imported, existing: Existing) -> dict[tuple[str, str], str]:
    """{(host, path): export name} of the exports declared or imported so far."""
    return {
        (e.get("host", ""), e.get("path", "")): n
        for n, e in [*existing.section("exports").items(), *out.data["exports"].items()]
    }


def import_exports(invs: Sequence[Inventory], out: Imported, existing: Existing) -> None:
    """/etc/exports of each host, named after the subvolume it exports when there is one."""
    names = export_names(out, existing)
    for inv, line in ((i, line) for i in invs for line in i.exports):
        if (inv.host, line.path) in names:
            continue
        clients = [{"network": c, "options": list(o)} for c, o in line.clients]
        if not clients:
            out.skip(inv.host, f"export {line.path}", "no clients")
            continue
        sub = next(
            (
                n
                for n, s in out.data["subvolumes"].items()
                if s["host"] == inv.host and s["mountpoint"] == line.path
            ),
            None,
        )
        taken = set(out.data["exports"]) | existing.names("exports")
        name = sub if sub and sub not in taken else unique(line.path.rsplit("/", 1)[-1], taken)
        out.data["exports"][name] = {"host": inv.host, "path": line.path, "clients": clients}
        names[(inv.host, line.path)] = name
