"""An NFS mount on one host: its /etc/fstab line and the live mount.

"Is it mounted" is decided by mount point + source (``SERVER:PATH``), never by fstype: the lab's
userspace client shows ``fuse.glusterfs``. The NFS version is enforced where the kernel shows
it (``vers=`` in the super options of a kernel NFS mount). kvmstate never unmounts under an
active libvirt pool or a running domain: it refuses and names the user instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kvmstate import hostfacts, virt
from kvmstate import spec as spec_models
from kvmstate.errors import RefusedError
from kvmstate.facts import Fact
from kvmstate.ids import ResourceId
from kvmstate.model import Action, Change, FieldDiff
from kvmstate.resources import prereq
from kvmstate.resources.base import DocSection, Resource, RunContext
from kvmstate.resources.common import (
    describe_fstab,
    diff,
    fstab_line,
    mkdir_p,
    option_set,
    set_fstab_line,
)
from kvmstate.resources.export import export_names
from kvmstate.resources.imports import Existing, Imported, Inventory, unique
from kvmstate.spec import Mount, Spec


@dataclass(frozen=True)
class MountState:
    fstab: hostfacts.FstabEntry | None
    mount: hostfacts.MountEntry | None


def version_matches(want: str, live: str) -> bool:
    """Spec ``4`` accepts any 4.x the client negotiated; ``4.1`` only 4.1; ``3`` only 3."""
    return live == want or (want == "4" and live.split(".")[0] == "4")


class MountResource(Resource[MountState]):
    kind = "mount"
    section = "mounts"
    section_model = spec_models.Mount
    docs = (
        DocSection(
            "mounts.NAME",
            spec_models.Mount,
            "An NFS mount of an export on each listed host (fstab + live).",
        ),
    )
    requires = (prereq.MOUNT, prereq.MOUNT_NFS)

    @classmethod
    def import_into(cls, invs: Sequence[Inventory], out: Imported, existing: Existing) -> None:
        import_mounts(invs, out, existing)

    def __init__(self, spec: Spec, name: str, host: str | None = None) -> None:
        super().__init__(spec, name, host)
        self.m: Mount = spec.mounts[name]
        self.h: str = host or self.m.hosts[0]
        export = spec.exports[self.m.export]
        self.source = f"{spec.hosts[export.host].address}:{export.path}"
        self.fstype = "nfs" if self.m.nfs_version == "3" else "nfs4"
        self.options = [f"vers={self.m.nfs_version}", *self.m.options]

    @classmethod
    def expand(cls, spec: Spec) -> Iterable[MountResource]:
        return [cls(spec, n, h) for n, m in spec.mounts.items() for h in m.hosts]

    @property
    def absent(self) -> bool:
        return self.m.state == "absent"

    def depends_on(self) -> frozenset[ResourceId]:
        ex = self.spec.exports[self.m.export]
        return frozenset({ResourceId("export", self.m.export, ex.host)})

    _FACTS: tuple[Fact[Any], ...] = (hostfacts.FSTAB, hostfacts.MOUNTINFO)

    def facts(self) -> Iterable[tuple[str, Fact[Any]]]:
        return [(self.h, f) for f in self._FACTS]

    def line(self) -> str:
        return fstab_line(self.source, self.m.mountpoint, self.fstype, self.options)

    async def observe(self, ctx: RunContext) -> MountState | None:
        facts = ctx.facts(self.h)
        await facts.prefetch(self._FACTS)
        fstab = hostfacts.fstab_entry_for(await facts.get(hostfacts.FSTAB), self.m.mountpoint)
        mount = hostfacts.mounted_at(await facts.get(hostfacts.MOUNTINFO), self.m.mountpoint)
        if fstab is None and mount is None:
            return None
        return MountState(fstab, mount)

    def _fstab_ok(self, e: hostfacts.FstabEntry | None) -> bool:
        return e is not None and (
            hostfacts.same_source(e.source, self.source)
            and e.fstype == self.fstype
            and option_set(e.options) == option_set(self.options)
        )

    def _live_problem(self, m: hostfacts.MountEntry | None) -> FieldDiff | None:
        if m is None:
            return diff("mounted", None, f"{self.source} on {self.m.mountpoint}", "runtime")
        if not hostfacts.same_source(m.source, self.source):
            return diff("mounted", m.source, self.source, "runtime")
        vers = m.super_option("vers")
        if m.fstype.startswith("nfs") and vers and not version_matches(self.m.nfs_version, vers):
            return diff("nfs_version", vers, self.m.nfs_version, "runtime")
        return None

    def diff(self, observed: MountState | None) -> Change:
        if self.absent:
            if observed is None:
                return self.noop(f"{self.m.mountpoint} is not mounted nor in fstab")
            before = observed.mount.source if observed.mount else describe_fstab(observed.fstab)
            return self.change(Action.DELETE, [diff("mounted", before, None)], "state: absent")
        o = observed or MountState(None, None)
        diffs: list[FieldDiff] = []
        if not self._fstab_ok(o.fstab):
            diffs.append(diff("fstab", describe_fstab(o.fstab), self.line()))
        live = self._live_problem(o.mount)
        if live is not None:
            diffs.append(live)
        if not diffs:
            assert o.mount is not None
            return self.noop(f"mounted {o.mount.source} on {self.m.mountpoint} ({o.mount.fstype})")
        action = Action.CREATE if observed is None else Action.UPDATE
        return self.change(action, diffs, f"NFS mount {self.m.mountpoint} on {self.h}")

    async def _refuse_if_in_use(self, ctx: RunContext, why: str) -> None:
        lv = ctx.libvirt(self.h)
        try:
            users = await lv.run(virt.users_of_path, await lv.connect(), self.m.mountpoint)
        except Exception as e:
            raise RefusedError(
                f"{self.h}: will not unmount {self.m.mountpoint} ({why}): cannot tell whether "
                f"libvirt uses it: {e}"
            ) from e
        if users:
            raise RefusedError(
                f"{self.h}: will not unmount {self.m.mountpoint} ({why}): in use by "
                f"{', '.join(users)}; stop them first"
            )

    async def _umount(self, ctx: RunContext, why: str) -> None:
        await self._refuse_if_in_use(ctx, why)
        self.log.info("%s: umount %s (%s)", self.h, self.m.mountpoint, why)
        await ctx.shell(self.h).run(["umount", self.m.mountpoint])

    async def apply(
        self, change: Change, observed: MountState | None, ctx: RunContext
    ) -> MountState | None:
        before = observed
        try:
            if self.absent:
                if before is not None and before.mount is not None:
                    await self._umount(ctx, "state: absent")
                await set_fstab_line(ctx, self.h, self.m.mountpoint, None, self.log)
            else:
                await self._ensure(ctx, before or MountState(None, None))
        finally:
            ctx.invalidate(self.h)
        return await self.observe(ctx)

    async def _users(self, ctx: RunContext) -> list[str]:
        lv = ctx.libvirt(self.h)
        users: list[str] = await lv.run(virt.users_of_path, await lv.connect(), self.m.mountpoint)
        return users

    async def _ensure(self, ctx: RunContext, o: MountState) -> None:
        """fstab line, then (re)mount. A remount needed for the live source or NFS version
        under a user is refused before anything is written, so a refused change leaves the
        host exactly as it was. When only the fstab line differs (options) and the live mount
        already has the spec's source and version, the line is rewritten and the remount that
        would apply the options happens only if nothing uses the mount."""
        fstab_changed = not self._fstab_ok(o.fstab)
        live = self._live_problem(o.mount)
        why = "remount with the spec's source, version and options"
        remount = o.mount is not None and live is not None
        if remount:
            await self._refuse_if_in_use(ctx, why)
        elif o.mount is not None and fstab_changed:
            users = await self._users(ctx)
            if users:
                self.log.warning(
                    "%s: %s: fstab updated; remount deferred while in use by %s",
                    self.h,
                    self.m.mountpoint,
                    ", ".join(users),
                )
            else:
                remount = True
        if fstab_changed:
            await set_fstab_line(ctx, self.h, self.m.mountpoint, self.line(), self.log)
        if remount:
            self.log.info("%s: umount %s (%s)", self.h, self.m.mountpoint, why)
            await ctx.shell(self.h).run(["umount", self.m.mountpoint])
        if o.mount is None or remount:
            await mkdir_p(ctx, self.h, self.m.mountpoint, self.log)
            self.log.info("%s: mount %s (%s)", self.h, self.m.mountpoint, self.source)
            await ctx.shell(self.h).run(["mount", self.m.mountpoint])


# --- import: what hosts have -> spec entries ------------------------------------------------------


def _nfs_version(e: hostfacts.FstabEntry) -> tuple[str | None, list[str]]:
    vers = None
    rest = []
    for o in e.options:
        k, _, v = o.partition("=")
        if k in ("vers", "nfsvers"):
            vers = v
        else:
            rest.append(o)
    if vers is None and e.fstype == "nfs4":
        vers = "4"
    return vers, rest


def import_mounts(invs: Sequence[Inventory], out: Imported, existing: Existing) -> None:
    by_addr = {i.address: i.host for i in invs} | {i.host: i.host for i in invs}
    exports: dict[str, dict[str, str]] = {i.host: {} for i in invs}
    for (h, path), name in export_names(out, existing).items():
        exports.setdefault(h, {})[path] = name
    declared = {
        (h, m.get("mountpoint", ""))
        for m in existing.section("mounts").values()
        for h in m.get("hosts", [])
    }
    groups: dict[tuple[str, str, str, tuple[str, ...]], list[str]] = {}
    for inv in invs:
        for e in inv.fstab:
            if e.fstype not in ("nfs", "nfs4"):
                continue
            if (inv.host, e.mountpoint) in declared:
                continue
            server, _, path = e.source.rpartition(":")
            what = f"NFS mount {e.source} on {e.mountpoint}"
            host = by_addr.get(server.strip("[]"))
            if host is None:
                out.skip(inv.host, what, f"its server {server} is not among the imported hosts")
                continue
            export = next(
                (n for p, n in exports[host].items() if hostfacts.same_source(p, path)), None
            )
            if export is None:
                out.skip(inv.host, what, f"{host} has no /etc/exports line for {path}")
                continue
            vers, options = _nfs_version(e)
            if vers not in ("3", "4", "4.0", "4.1", "4.2"):
                out.skip(inv.host, what, "no vers= option kvmstate can keep (3, 4, 4.x)")
                continue
            groups.setdefault((export, e.mountpoint, vers, tuple(options)), []).append(inv.host)
    for (export, mountpoint, vers, opts), hosts in groups.items():
        taken = set(out.data["mounts"]) | existing.names("mounts")
        name = export if export not in taken else unique(export, taken)
        out.data["mounts"][name] = {
            "export": export,
            "hosts": hosts,
            "mountpoint": mountpoint,
            "nfs_version": vers,
            "options": list(opts),
        }
