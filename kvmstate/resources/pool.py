"""A libvirt ``dir`` storage pool on one host: defined, started, autostarted, refreshed.

When the spec puts the pool's path on an NFS mount, apply checks that the mount is really
there (mountinfo, read fresh) before starting the pool, and refuses otherwise: a pool started
on the bare directory under a missing mount would silently use local disk. Changing the path
of a pool whose volumes are in use by running domains is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kvmstate import hostfacts, virt
from kvmstate import spec as spec_models
from kvmstate.checks import covering_mount
from kvmstate.errors import RefusedError
from kvmstate.facts import Fact
from kvmstate.ids import ResourceId
from kvmstate.model import Action, Change, FieldDiff
from kvmstate.resources import prereq
from kvmstate.resources.base import DocSection, Resource, RunContext
from kvmstate.resources.common import diff, mkdir_p
from kvmstate.resources.imports import Existing, Imported, Inventory
from kvmstate.spec import Pool, Spec, is_valid_name


@dataclass(frozen=True)
class PoolObs:
    path: str
    active: bool
    autostart: bool
    volumes: frozenset[str]
    in_use: tuple[str, ...] = ()  # running domains using the old path (only if path differs)


class PoolResource(Resource[PoolObs]):
    kind = "pool"
    section = "pools"
    section_model = spec_models.Pool
    docs = (
        DocSection(
            "pools.NAME",
            spec_models.Pool,
            "A libvirt storage pool on each listed host.",
        ),
    )
    requires = (prereq.LIBVIRTD_BINARY, prereq.LIBVIRTD)
    uses_libvirt = True

    @classmethod
    def import_into(cls, invs: Sequence[Inventory], out: Imported, existing: Existing) -> None:
        import_pools(invs, out, existing)

    def __init__(self, spec: Spec, name: str, host: str | None = None) -> None:
        super().__init__(spec, name, host)
        self.p: Pool = spec.pools[name]
        self.h: str = host or self.p.hosts[0]
        self.mount = covering_mount(spec, self.h, self.p.path)

    @classmethod
    def expand(cls, spec: Spec) -> Iterable[PoolResource]:
        return [cls(spec, n, h) for n, p in spec.pools.items() for h in p.hosts]

    @property
    def absent(self) -> bool:
        return self.p.state == "absent"

    def depends_on(self) -> frozenset[ResourceId]:
        return frozenset({ResourceId("mount", self.mount, self.h)} if self.mount else set())

    def facts(self) -> Iterable[tuple[str, Fact[Any]]]:
        return [(self.h, hostfacts.MOUNTINFO)] if self.mount else []

    async def observe(self, ctx: RunContext) -> PoolObs | None:
        lv = ctx.libvirt(self.h)
        conn = await lv.connect()
        st = await lv.run(virt.observe_pool, conn, self.name)
        if st is None:
            return None
        in_use: tuple[str, ...] = ()
        if st.path != self.p.path:
            users = await lv.run(virt.users_of_path, conn, st.path)
            in_use = tuple(u for u in users if u.startswith("running domain"))
        return PoolObs(st.path, st.active, st.autostart, st.volumes, in_use)

    def diff(self, observed: PoolObs | None) -> Change:
        if self.absent:
            if observed is None:
                return self.noop(f"pool {self.name} is not defined")
            return self.change(Action.DELETE, [diff("defined", True, False)], "state: absent")
        if observed is None:
            return self.change(
                Action.CREATE,
                [diff("path", None, self.p.path), diff("active", None, True, "runtime")],
                f"dir pool {self.name} at {self.p.path}",
            )
        o = observed
        diffs: list[FieldDiff] = []
        if o.path != self.p.path:
            diffs.append(diff("path", o.path, self.p.path))
        if o.autostart != self.p.autostart:
            diffs.append(diff("autostart", o.autostart, self.p.autostart))
        if not o.active:
            diffs.append(diff("active", False, True, "runtime"))
        if not diffs:
            n = len(o.volumes)
            return self.noop(
                f"pool {self.name} active at {o.path}"
                f"{' (autostart)' if o.autostart else ''}, {n} volume{'s' if n != 1 else ''}"
            )
        ch = self.change(Action.UPDATE, diffs, f"pool {self.name} on {self.h}")
        if o.path != self.p.path and o.in_use:
            return ch.with_blocked(
                f"pool {self.name} on {self.h}: will not move it from {o.path} to {self.p.path} "
                f"while its volumes are in use ({', '.join(o.in_use)})"
            )
        return ch

    async def _check_mounted(self, ctx: RunContext) -> None:
        if self.mount is None:
            return
        mp = self.spec.mounts[self.mount].mountpoint
        ctx.invalidate(self.h)
        mounts = await ctx.facts(self.h).get(hostfacts.MOUNTINFO)
        if hostfacts.mounted_at(mounts, mp) is None:
            raise RefusedError(
                f"{self.h}: pool {self.name} path {self.p.path} must be on mount {self.mount} "
                f"({mp}), which is not mounted; refusing to start the pool on the bare directory"
            )

    async def apply(
        self, change: Change, observed: PoolObs | None, ctx: RunContext
    ) -> PoolObs | None:
        lv = ctx.libvirt(self.h)
        conn = await lv.connect()
        if self.absent:
            self.log.info("%s: undefining pool %s", self.h, self.name)
            await lv.run(virt.undefine_pool, conn, self.name)
            return await self.observe(ctx)
        cur = observed
        if cur is not None and cur.path != self.p.path:
            if cur.in_use:
                raise RefusedError(f"pool {self.name}: path change refused, in use: {cur.in_use}")
            self.log.info(
                "%s: redefining pool %s: %s -> %s", self.h, self.name, cur.path, self.p.path
            )
            await lv.run(virt.undefine_pool, conn, self.name)
            cur = None
        if cur is None:
            self.log.info("%s: defining dir pool %s at %s", self.h, self.name, self.p.path)
            await lv.run(virt.define_pool, conn, self.name, self.p.path)
        if cur is None or not cur.active:
            await self._check_mounted(ctx)
            await mkdir_p(ctx, self.h, self.p.path, self.log)
            self.log.info("%s: starting pool %s", self.h, self.name)
            await lv.run(virt.start_pool, conn, self.name)
        if cur is None or cur.autostart != self.p.autostart:
            self.log.info("%s: pool %s autostart=%s", self.h, self.name, self.p.autostart)
            await lv.run(virt.set_pool_autostart, conn, self.name, self.p.autostart)
        await lv.run(virt.refresh_pool, conn, self.name)
        ctx.invalidate(self.h)
        return await self.observe(ctx)


# --- import: what hosts have -> spec entries ------------------------------------------------------


def import_pools(invs: Sequence[Inventory], out: Imported, existing: Existing) -> None:
    for inv in invs:
        for p in inv.pools:
            what = f"pool {p.name}"
            if p.name in existing.names("pools"):
                continue
            if p.type != "dir":
                out.skip(inv.host, what, f"type {p.type!r} (kvmstate manages dir pools)")
                continue
            if not is_valid_name(p.name):
                out.skip(inv.host, what, "not a usable spec name")
                continue
            have = out.data["pools"].get(p.name)
            if have is None:
                out.data["pools"][p.name] = {
                    "type": "dir",
                    "path": p.path,
                    "hosts": [inv.host],
                    "autostart": p.autostart,
                }
            elif have["path"] != p.path or have["autostart"] != p.autostart:
                out.skip(
                    inv.host,
                    what,
                    f"differs from the same pool on {have['hosts'][0]} (path or autostart)",
                )
            else:
                have["hosts"].append(inv.host)
            if not p.active:
                out.notes.append(f"{inv.host}: pool {p.name} is not active; apply will start it")
