"""A storage volume, created through libvirt in its pool on the pool's first host.

Capacity grows in place (never shrinks: blocked); owner/group are applied with ``chown`` by
name. After a create or a resize, the pool is refreshed on every other host of the pool so the
volume is visible wherever a domain may run. A volume is a disk: deleting it always counts as
"holds data" and needs ``force_destroy: true`` (plus ``--allow-destroy``).
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kvmstate import hostfacts, virt
from kvmstate import spec as spec_models
from kvmstate.errors import KvmstateError, RefusedError
from kvmstate.ids import ResourceId
from kvmstate.model import Action, Change, FieldDiff
from kvmstate.resources import prereq
from kvmstate.resources.base import DocSection, Resource, RunContext
from kvmstate.resources.common import diff
from kvmstate.resources.imports import Existing, Imported, Inventory
from kvmstate.spec import Spec, Volume, is_valid_name
from kvmstate.units import format_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VolumeObs:
    path: str
    format: str | None
    capacity: int
    owner: str | None = None
    group: str | None = None
    unknown: str | None = None  # why the volume cannot be seen right now (pool inactive)


class VolumeResource(Resource[VolumeObs]):
    kind = "volume"
    section = "volumes"
    section_model = spec_models.Volume
    docs = (
        DocSection(
            "volumes.NAME",
            spec_models.Volume,
            "A disk image in a pool; NAME is its file name.",
        ),
    )
    requires = (prereq.LIBVIRTD_BINARY, prereq.LIBVIRTD, prereq.QEMU_IMG)
    uses_libvirt = True

    @classmethod
    def import_into(cls, invs: Sequence[Inventory], out: Imported, existing: Existing) -> None:
        import_volumes(invs, out, existing)

    def __init__(self, spec: Spec, name: str, host: str | None = None) -> None:
        self.v: Volume = spec.volumes[name]
        self.pool_hosts = spec.pools[self.v.pool].hosts
        super().__init__(spec, name, host or self.pool_hosts[0])
        self.h: str = self.pool_hosts[0]

    @classmethod
    def expand(cls, spec: Spec) -> Iterable[VolumeResource]:
        return [cls(spec, n) for n in spec.volumes]

    @property
    def absent(self) -> bool:
        return self.v.state == "absent"

    def needs(self) -> dict[str, frozenset[prereq.Requirement]]:
        return {h: frozenset(self.requires) for h in self.pool_hosts}  # every host of its pool

    def depends_on(self) -> frozenset[ResourceId]:
        return frozenset({ResourceId("pool", self.v.pool, self.h)})

    async def observe(self, ctx: RunContext) -> VolumeObs | None:
        lv = ctx.libvirt(self.h)
        conn = await lv.connect()
        st = await lv.run(virt.observe_volume, conn, self.v.pool, self.name)
        if st is None:
            if await lv.run(virt.pool_is_active, conn, self.v.pool) is False:
                why = f"pool {self.v.pool} is not active on {self.h}"
                return VolumeObs("", None, 0, unknown=why)
            return None
        owner = group = None
        if self.v.owner or self.v.group:
            res = await ctx.shell(self.h).run(["stat", "-c", "%U:%G", "--", st.path], check=False)
            got = hostfacts.stat_owner_fact(st.path).parse(res)
            if got is not None:
                owner, group = got
        return VolumeObs(st.path, st.format, st.capacity, owner, group)

    def diff(self, observed: VolumeObs | None) -> Change:
        v = self.v
        if self.absent:
            if observed is None or observed.unknown:
                why = observed.unknown if observed else "does not exist"
                return self.noop(f"volume {self.name}: {why}")
            ch = self.change(Action.DELETE, [diff("volume", observed.path, None)], "state: absent")
            if not v.force_destroy:
                return ch.with_blocked(
                    f"volume {self.name} holds data; set force_destroy: true to delete it"
                )
            return ch
        owner = [("owner", v.owner), ("group", v.group)]
        diffs: list[FieldDiff]
        if observed is None:
            diffs = [
                diff("capacity", None, format_size(v.capacity)),
                diff("format", None, v.format),
                *[diff(f, None, want) for f, want in owner if want],
            ]
            return self.change(Action.CREATE, diffs, f"{v.format} volume in pool {v.pool}")
        o = observed
        if o.unknown:  # never plan a "create" over a disk we merely cannot see
            return self.noop(f"volume {self.name} not checked: {o.unknown} (checked once it runs)")
        diffs = []
        blocked = None
        if o.format != v.format:
            diffs.append(diff("format", o.format, v.format))
            blocked = (
                f"volume {self.name} is {o.format}, spec says {v.format}: kvmstate does not convert"
            )
        if o.capacity < v.capacity:
            diffs.append(diff("capacity", format_size(o.capacity), format_size(v.capacity)))
        elif o.capacity > v.capacity:
            diffs.append(diff("capacity", format_size(o.capacity), format_size(v.capacity)))
            blocked = (
                f"volume {self.name}: shrinking {format_size(o.capacity)} -> "
                f"{format_size(v.capacity)} would lose data; refused"
            )
        for f, want in owner:
            have = getattr(o, f)
            if want and have != want:
                diffs.append(diff(f, have, want))
        if not diffs:
            return self.noop(
                f"volume {self.name}: {o.format} {format_size(o.capacity)} at {o.path}"
            )
        ch = self.change(Action.UPDATE, diffs, f"volume {self.name}")
        return ch.with_blocked(blocked) if blocked else ch

    async def apply(
        self, change: Change, observed: VolumeObs | None, ctx: RunContext
    ) -> VolumeObs | None:
        lv = ctx.libvirt(self.h)
        conn = await lv.connect()
        cur = observed
        if cur is not None and cur.unknown:
            raise RefusedError(f"volume {self.name}: {cur.unknown}")
        if self.absent:
            if cur is not None:
                self.log.info("%s: deleting volume %s from pool %s", self.h, self.name, self.v.pool)
                await lv.run(virt.delete_volume, conn, self.v.pool, self.name)
                await self._refresh_others(ctx)
            return await self.observe(ctx)
        if cur is None:
            self.log.info(
                "%s: creating %s volume %s (%s) in pool %s",
                self.h,
                self.v.format,
                self.name,
                format_size(self.v.capacity),
                self.v.pool,
            )
            await lv.run(
                virt.create_volume, conn, self.v.pool, self.name, self.v.format, self.v.capacity
            )
            await self._refresh_others(ctx)
        elif cur.capacity < self.v.capacity:
            users = await self._running_users(ctx, cur.path)
            if users:
                raise RefusedError(
                    f"volume {self.name} is the disk of {', '.join(users)}; growing an image "
                    "under a running guest is refused (shut it off, then apply)"
                )
            self.log.info(
                "%s: growing volume %s to %s", self.h, self.name, format_size(self.v.capacity)
            )
            await lv.run(virt.resize_volume, conn, self.v.pool, self.name, self.v.capacity)
            await self._refresh_others(ctx)
        # a new volume: its owner is whatever libvirt made it; an existing one: as observed
        path = posixpath.join(self.spec.pools[self.v.pool].path, self.name)
        owner, group = (None, None) if cur is None else (cur.owner, cur.group)
        if cur is not None:
            path = cur.path
        if (self.v.owner and owner != self.v.owner) or (self.v.group and group != self.v.group):
            who = f"{self.v.owner or ''}:{self.v.group or ''}"
            self.log.info("%s: chown %s %s", self.h, who, path)
            await ctx.shell(self.h).run(["chown", who, "--", path])
        return await self.observe(ctx)

    async def _running_users(self, ctx: RunContext, path: str) -> list[str]:
        out = []
        for h in self.pool_hosts:
            lv = ctx.libvirt(h)
            users = await lv.run(virt.users_of_path, await lv.connect(), path)
            out += [f"{u} on {h}" for u in users if u.startswith("running domain")]
        return out

    async def _refresh_others(self, ctx: RunContext) -> None:
        for h in self.pool_hosts[1:]:
            lv = ctx.libvirt(h)
            try:
                if await lv.run(virt.refresh_pool, await lv.connect(), self.v.pool):
                    self.log.info("%s: refreshed pool %s", h, self.v.pool)
            except KvmstateError as e:
                self.log.warning("%s: could not refresh pool %s: %s", h, self.v.pool, e)


# --- import: what hosts have -> spec entries ------------------------------------------------------


def import_volumes(invs: Sequence[Inventory], out: Imported, existing: Existing) -> None:
    for inv in invs:
        for v in inv.volumes:
            pool = out.data["pools"].get(v.pool)
            if pool is None or v.name in existing.names("volumes"):
                continue
            what = f"volume {v.name} in pool {v.pool}"
            have = out.data["volumes"].get(v.name)
            if have is not None:
                if have["pool"] != v.pool:
                    out.skip(inv.host, what, f"the name is taken by pool {have['pool']}'s volume")
                continue  # the same shared volume seen from another host of the pool
            if inv.host != pool["hosts"][0]:
                continue  # kvmstate reads a volume on its pool's first host
            if not is_valid_name(v.name):
                out.skip(inv.host, what, "not a usable spec name")
                continue
            if v.state.format not in ("qcow2", "raw") or v.state.capacity <= 0:
                out.skip(inv.host, what, f"format {v.state.format!r} (qcow2 or raw only)")
                continue
            data: dict[str, Any] = {
                "pool": v.pool,
                "format": v.state.format,
                "capacity": format_size(v.state.capacity),
            }
            if v.owner and v.group:
                data |= {"owner": v.owner, "group": v.group}
            out.data["volumes"][v.name] = data
