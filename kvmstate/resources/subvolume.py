"""A btrfs subvolume, its /etc/fstab entry (``subvol=NAME``) and its live mount.

Observe is one batched read per host: fstab, mountinfo, the device resolved to its node
(``blkid -o device -t LABEL=x`` or ``readlink -e``) and, when ``toplevel`` is set, the
subvolume list. Without ``toplevel`` the subvolume's existence is known from the live mount
(mountinfo's root ``/NAME``); when it is not mounted either, existence is "unknown" and apply
looks under a temporary top-level mount (``-o subvolid=5``) before creating anything.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kvmstate import hostfacts
from kvmstate import spec as spec_models
from kvmstate.errors import KvmstateError, RefusedError
from kvmstate.facts import Fact
from kvmstate.model import Action, Change, FieldDiff
from kvmstate.resources import prereq
from kvmstate.resources.base import DocSection, Resource, RunContext
from kvmstate.resources.common import (
    VISIBLE_OPTIONS,
    describe_fstab,
    diff,
    fstab_line,
    mkdir_p,
    option_set,
    set_fstab_line,
)
from kvmstate.resources.imports import Existing, Imported, Inventory
from kvmstate.spec import Spec, Subvolume, is_valid_name

TMP_TOP = "/run/kvmstate/btrfs"


@dataclass(frozen=True)
class SubvolumeState:
    device_node: str | None
    exists: bool | None  # None: cannot tell without mounting the top level
    fstab: hostfacts.FstabEntry | None
    mount: hostfacts.MountEntry | None
    holds_data: bool | None = None


class SubvolumeResource(Resource[SubvolumeState]):
    kind = "subvolume"
    section = "subvolumes"
    section_model = spec_models.Subvolume
    docs = (
        DocSection(
            "subvolumes.NAME",
            spec_models.Subvolume,
            "A btrfs subvolume, mounted and kept in /etc/fstab.",
        ),
    )
    requires = (prereq.BTRFS, prereq.MOUNT)

    @classmethod
    def import_into(cls, invs: Sequence[Inventory], out: Imported, existing: Existing) -> None:
        import_subvolumes(invs, out, existing)

    def __init__(self, spec: Spec, name: str, host: str | None = None) -> None:
        super().__init__(spec, name, host)
        self.sv: Subvolume = spec.subvolumes[name]
        self.h: str = self.sv.host

    @classmethod
    def expand(cls, spec: Spec) -> Iterable[SubvolumeResource]:
        return [cls(spec, n, sv.host) for n, sv in spec.subvolumes.items()]

    @property
    def absent(self) -> bool:
        return self.sv.state == "absent"

    def _facts(self) -> list[Fact[Any]]:
        out: list[Fact[Any]] = [
            hostfacts.FSTAB,
            hostfacts.MOUNTINFO,
            hostfacts.device_fact(self.sv.device),
        ]
        if self.sv.toplevel:
            out.append(hostfacts.btrfs_list_fact(self.sv.toplevel))
        if self.absent:
            out.append(_data_fact(self.sv.mountpoint))
        return out

    def facts(self) -> Iterable[tuple[str, Fact[Any]]]:
        return [(self.h, f) for f in self._facts()]

    def fstab_line(self) -> str:
        opts = [f"subvol={self.name}", *self.sv.mount_options]
        return fstab_line(self.sv.device, self.sv.mountpoint, "btrfs", opts)

    async def observe(self, ctx: RunContext) -> SubvolumeState | None:
        facts = ctx.facts(self.h)
        await facts.prefetch(self._facts())
        node = await facts.get(hostfacts.device_fact(self.sv.device))
        fstab = hostfacts.fstab_entry_for(await facts.get(hostfacts.FSTAB), self.sv.mountpoint)
        mount = hostfacts.mounted_at(await facts.get(hostfacts.MOUNTINFO), self.sv.mountpoint)
        exists: bool | None = None
        if self.sv.toplevel:
            listed = await facts.get(hostfacts.btrfs_list_fact(self.sv.toplevel))
            exists = None if listed is None else self.name in listed
        if mount is not None and self._is_ours(mount, node):
            exists = True
        holds = None  # only known when the subvolume itself is mounted on its mountpoint
        if self.absent and mount is not None and self._is_ours(mount, node):
            holds = await facts.get(_data_fact(self.sv.mountpoint))
        if node is None and not self.absent:
            raise KvmstateError(
                f"{self.h}: btrfs device {self.sv.device} not found (subvolume {self.name})"
            )
        if node is None and fstab is None and mount is None:
            return None
        return SubvolumeState(node, exists, fstab, mount, holds)

    def _is_ours(self, mount: hostfacts.MountEntry, node: str | None) -> bool:
        return mount.fstype == "btrfs" and mount.source == node and mount.root == f"/{self.name}"

    def diff(self, observed: SubvolumeState | None) -> Change:
        if self.absent:
            return self._diff_absent(observed)
        o = observed or SubvolumeState(None, False, None, None)
        diffs: list[FieldDiff] = []
        if not o.exists:
            diffs.append(diff("subvolume", "unknown" if o.exists is None else None, self.name))
        want = self.fstab_line()
        if o.fstab is None or (
            o.fstab.source,
            o.fstab.fstype,
            option_set(o.fstab.options),
        ) != (self.sv.device, "btrfs", option_set([f"subvol={self.name}", *self.sv.mount_options])):
            diffs.append(diff("fstab", describe_fstab(o.fstab), want))
        where = f"{self.sv.device}:/{self.name} on {self.sv.mountpoint}"
        if o.mount is None or not self._is_ours(o.mount, o.device_node):
            before = f"{o.mount.source}:{o.mount.root}" if o.mount else None
            diffs.append(diff("mounted", before, where, "runtime"))
        else:
            missing = self._missing_options(o.mount)
            if missing:
                diffs.append(
                    diff(
                        "mount_options",
                        sorted(o.mount.options & VISIBLE_OPTIONS),
                        sorted(missing),
                        "runtime",
                    )
                )
        if not diffs:
            return self.noop(f"subvolume {self.name} mounted from {where}")
        action = Action.CREATE if o.exists is False and o.fstab is None else Action.UPDATE
        return self.change(action, diffs, f"subvolume {self.name} on {self.h}")

    def _missing_options(self, mount: hostfacts.MountEntry) -> set[str]:
        return {o for o in self.sv.mount_options if o in VISIBLE_OPTIONS} - mount.options

    def _diff_absent(self, o: SubvolumeState | None) -> Change:
        if o is None or (o.exists is False and o.fstab is None and o.mount is None):
            return self.noop(f"subvolume {self.name} is absent")
        ch = self.change(Action.DELETE, [diff("subvolume", self.name, None)], "state: absent")
        if o.holds_data is not False and not self.sv.force_destroy:
            return ch.with_blocked(
                f"subvolume {self.name} on {self.h} holds data (or cannot be checked); "
                "set force_destroy: true to delete it"
            )
        return ch

    async def apply(
        self, change: Change, observed: SubvolumeState | None, ctx: RunContext
    ) -> SubvolumeState | None:
        shell = ctx.shell(self.h)
        try:
            if self.absent:
                await self._delete(ctx, observed)
                return await self.observe(ctx)
            cur = observed or SubvolumeState(None, False, None, None)
            if cur.mount is not None and not self._is_ours(cur.mount, cur.device_node):
                # refused before anything is written: the host stays exactly as it was
                raise RefusedError(
                    f"{self.h}: {self.sv.mountpoint} has {cur.mount.source}:{cur.mount.root} "
                    f"mounted, not subvolume {self.name}; unmount it first"
                )
            fields = {d.field for d in change.diffs}
            if "subvolume" in fields:
                async with self._toplevel(ctx) as top:
                    listed = hostfacts.parse_btrfs_list(
                        (await shell.run(["btrfs", "subvolume", "list", top])).stdout
                    )
                    if self.name not in listed:
                        self.log.info("%s: btrfs subvolume create %s/%s", self.h, top, self.name)
                        await shell.run(["btrfs", "subvolume", "create", f"{top}/{self.name}"])
            if "fstab" in fields:
                await set_fstab_line(ctx, self.h, self.sv.mountpoint, self.fstab_line(), self.log)
            if cur.mount is None:
                await mkdir_p(ctx, self.h, self.sv.mountpoint, self.log)
                self.log.info("%s: mount %s", self.h, self.sv.mountpoint)
                await shell.run(["mount", self.sv.mountpoint])
            elif "fstab" in fields or self._missing_options(cur.mount):
                # new options in fstab, or options missing from the live mount: remount now
                opts = ",".join(["remount", *self.sv.mount_options])
                self.log.info("%s: mount -o %s %s", self.h, opts, self.sv.mountpoint)
                await shell.run(["mount", "-o", opts, self.sv.mountpoint])
        finally:
            ctx.invalidate(self.h)
        return await self.observe(ctx)

    @contextlib.asynccontextmanager
    async def _toplevel(self, ctx: RunContext) -> AsyncIterator[str]:
        """The top level of the filesystem: ``toplevel`` or a temporary ``subvolid=5`` mount."""
        shell = ctx.shell(self.h)
        if self.sv.toplevel:
            yield self.sv.toplevel
            return
        tmp = f"{TMP_TOP}/{self.name}"
        await mkdir_p(ctx, self.h, tmp, self.log)
        self.log.info("%s: mounting the top level of %s on %s", self.h, self.sv.device, tmp)
        await shell.run(["mount", "-t", "btrfs", "-o", "subvolid=5", self.sv.device, tmp])
        try:
            yield tmp
        finally:
            await shell.run(["umount", tmp])
            await shell.run(["rmdir", "--", tmp], check=False)

    async def _delete(self, ctx: RunContext, cur: SubvolumeState | None) -> None:
        shell = ctx.shell(self.h)
        if cur is not None and cur.mount is not None:
            self.log.info("%s: umount %s", self.h, self.sv.mountpoint)
            await shell.run(["umount", self.sv.mountpoint])
        await set_fstab_line(ctx, self.h, self.sv.mountpoint, None, self.log)
        async with self._toplevel(ctx) as top:
            listed = hostfacts.parse_btrfs_list(
                (await shell.run(["btrfs", "subvolume", "list", top])).stdout
            )
            if self.name in listed:
                self.log.info("%s: btrfs subvolume delete %s/%s", self.h, top, self.name)
                await shell.run(["btrfs", "subvolume", "delete", f"{top}/{self.name}"])
        ctx.invalidate(self.h)


def _data_fact(path: str) -> Fact[bool | None]:
    """Does ``path`` hold anything? None when it cannot be read (treated as 'holds data')."""

    def parse(res: Any) -> bool | None:
        if not res.ok:
            return None if "No such file" not in res.stderr else False
        return bool(res.stdout.strip())

    argv = ("find", path, "-mindepth", "1", "-maxdepth", "1", "-print", "-quit")
    return Fact(f"has-data:{path}", argv, parse)


# --- import: what hosts have -> spec entries ------------------------------------------------------


def import_subvolumes(invs: Sequence[Inventory], out: Imported, existing: Existing) -> None:
    declared = {(s.get("host", ""), n) for n, s in existing.section("subvolumes").items()}
    for inv, e in ((i, e) for i in invs for e in i.fstab):
        if e.fstype != "btrfs":
            continue
        sub = next((o.split("=", 1)[1] for o in e.options if o.startswith("subvol=")), None)
        if sub is None:
            continue  # a top-level mount: the filesystem itself, not a subvolume
        name = sub.strip("/")
        if (inv.host, name) in declared:
            continue
        if not is_valid_name(name) or name in out.data["subvolumes"]:
            out.skip(inv.host, f"subvolume {sub!r} on {e.mountpoint}", "not a usable spec name")
            continue
        mounted = hostfacts.mounted_at(inv.mounts, e.mountpoint)
        data: dict[str, Any] = {"host": inv.host, "device": e.source}
        if mounted is not None and mounted.fstype == "btrfs":
            top = next(
                (
                    m.mountpoint
                    for m in inv.mounts
                    if m.fstype == "btrfs" and m.source == mounted.source and m.root == "/"
                ),
                None,
            )
            if top is not None:
                data["toplevel"] = top
        data["mountpoint"] = e.mountpoint
        data["mount_options"] = [o for o in e.options if not o.startswith(("subvol=", "subvolid="))]
        out.data["subvolumes"][name] = data
