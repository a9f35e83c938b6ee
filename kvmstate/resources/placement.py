"""Where a domain runs. A different host in the spec is a MIGRATE change with pre-flight checks.

Policies: ``pinned`` (always on ``host``), ``preferred`` (move back to ``host`` when the checks
pass; otherwise stay, NOOP with the reason), ``floating`` (any allowed host is fine). A host
with ``drain: true`` is never a target. A running domain is live-migrated with ``migrate3``
(LIVE|PERSIST_DEST|UNDEFINE_SOURCE|ABORT_ON_ERROR + the policy), its progress polled from
``jobStats`` and emitted as ``migration-progress`` events; a timeout or a cancellation (Ctrl-C)
aborts the job and leaves the guest running on the source. A shut-off domain is moved by
defining it on the target first, then undefining it on the source (undone on failure).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from kvmstate import hostfacts, virt
from kvmstate import spec as spec_models
from kvmstate.checks import covering_mount
from kvmstate.errors import KvmstateError, RefusedError
from kvmstate.facts import Fact
from kvmstate.ids import ResourceId
from kvmstate.model import Action, Change, Check, MigrationDone, MigrationProgress, Payload
from kvmstate.resources.base import DocSection, Resource, RunContext
from kvmstate.resources.common import diff
from kvmstate.resources.domain import domain_hosts, locate
from kvmstate.spec import Domain, MigrationPolicy, Spec

T = TypeVar("T")


def _log_failure(log: Any, what: str) -> Callable[[asyncio.Future[Any]], None]:
    def done(fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            log.debug("%s failed: %s", what, fut.exception())

    return done


MiB = 2**20


@dataclass(frozen=True)
class TargetMemory:
    """Memory on a migration's target, net of what migrations in flight onto it hold."""

    available: int  # MemAvailable minus in-flight reservations
    committed: int  # memory of the domains running there, in-flight reservations included
    cap: int | None  # the host's max_guest_memory

    def fits(self, need: int) -> bool:
        return need <= self.available and (self.cap is None or self.committed + need <= self.cap)

    def describe(self, host: str, need: int) -> str:
        text = f"{self.available // MiB} MiB available on {host}"
        if self.cap is not None:
            text += (
                f", guests there use {self.committed // MiB} of {self.cap // MiB} MiB "
                "(max_guest_memory)"
            )
        return f"{text}, guest needs {need // MiB} MiB"


@dataclass(frozen=True)
class PlacementObs:
    host: str
    state: str
    target: str
    checks: tuple[Check, ...] = ()
    memory: TargetMemory | None = None


@dataclass(frozen=True)
class Move(Payload):
    """What a migrate change carries to ``arrange`` and ``apply``."""

    source: str
    target: str
    live: bool
    memory: int  # the domain's memory, in bytes
    target_memory: TargetMemory | None = None  # the target's, from the pre-flight


def _move(c: Change) -> Move:
    assert isinstance(c.data, Move), c
    return c.data


def reserved_memory(ctx: RunContext) -> dict[str, dict[str, int]]:
    """Memory held on a host by migrations in flight onto it, {host: {domain: bytes}}: the
    placement kind's scratch state for one run."""
    return ctx.scratch("placement", dict)


class PlacementResource(Resource[PlacementObs]):
    kind = "placement"
    section = "domains"
    cannot_import = "imported with its domain: the host a domain is found on becomes its `host:`"
    docs = (
        DocSection(
            "domains.NAME.placement",
            spec_models.Placement,
            "Where the domain may run, and the policy.",
        ),
        DocSection(
            "migration / domains.NAME.migration",
            spec_models.MigrationPolicy,
            "Live-migration policy.",
        ),
        DocSection(
            "...downtime_steps[]",
            spec_models.DowntimeStep,
            "One step of the downtime escalation schedule.",
        ),
    )
    uses_libvirt = True
    poll_interval = 0.5

    def __init__(self, spec: Spec, name: str, host: str | None = None) -> None:
        super().__init__(spec, name, None)
        self.d: Domain = spec.domains[name]
        self.policy: MigrationPolicy = spec.migration_for(name)

    @classmethod
    def expand(cls, spec: Spec) -> Iterable[PlacementResource]:
        return [cls(spec, n) for n, d in spec.domains.items() if d.state != "absent"]

    def hosts(self) -> tuple[str, ...]:
        return tuple(domain_hosts(self.spec, self.name))

    def depends_on(self) -> frozenset[ResourceId]:
        deps = {ResourceId("domain", self.name)}
        for disk in self.d.disks:
            pool = self.spec.volumes[disk.volume].pool
            if self.d.host in self.spec.pools[pool].hosts:
                deps.add(ResourceId("pool", pool, self.d.host))
        return frozenset(deps)

    def target_for(self, current: str) -> str:
        allowed = [h for h in self.d.allowed_hosts() if not self.spec.hosts[h].drain]
        mode = self.d.placement.policy if self.d.placement else "pinned"
        if mode == "floating" and current in allowed:
            return current
        if self.d.host in allowed or not allowed:
            return self.d.host
        return current if current in allowed else allowed[0]

    async def recheck(self, ctx: RunContext) -> PlacementObs | None:
        # The target's memory and bridges are checked again by apply itself, under the
        # target's lock and net of the migrations in flight (``_check_target``): reading
        # them here as well would be one more round trip to the target for nothing.
        return await self.observe(ctx, target_facts=False)

    async def observe(
        self, ctx: RunContext, *, preflight: bool = True, target_facts: bool = True
    ) -> PlacementObs | None:
        found = await locate(ctx, self.name, self.hosts())
        if len(found) > 1:
            raise KvmstateError(f"domain {self.name} is defined on {', '.join(sorted(found))}")
        if not found:
            return None
        host, st = next(iter(found.items()))
        target = self.target_for(host)
        checks: tuple[Check, ...] = ()
        mem = None
        if target != host and preflight:
            found_checks, mem = await self._preflight(
                ctx, host, target, st.state == "running", target_facts
            )
            checks = tuple(found_checks)
        return PlacementObs(host, st.state, target, checks, mem)

    async def _target_memory(self, ctx: RunContext, dst: str) -> TargetMemory:
        held = {n: b for n, b in reserved_memory(ctx).get(dst, {}).items() if n != self.name}
        free = await ctx.facts(dst).get(hostfacts.MEM_AVAILABLE)
        cap = self.spec.hosts[dst].max_guest_memory
        committed = 0
        if cap is not None:
            lv = ctx.libvirt(dst)

            async def read() -> dict[str, int]:
                return await lv.run(virt.running_memory, await lv.connect())

            running = await ctx.memo(dst, ("running-memory",), read)
            committed = sum(b for n, b in running.items() if n not in held and n != self.name)
        reserved = sum(held.values())
        return TargetMemory(free - reserved, committed + reserved, cap)

    async def _preflight(
        self, ctx: RunContext, src: str, dst: str, running: bool, target_facts: bool
    ) -> tuple[list[Check], TargetMemory | None]:
        out: list[Check] = []
        mem = None
        try:
            dconn = await ctx.libvirt(dst).connect()
            out.append(Check("target libvirtd", True, f"connected to {dst}"))
        except KvmstateError as e:
            return [Check("target libvirtd", False, f"{dst}: {e}")], None
        dlv = ctx.libvirt(dst)
        for disk in self.d.disks:
            pool = self.spec.volumes[disk.volume].pool
            ok = await dlv.run(virt.volume_visible, dconn, pool, disk.volume)
            out.append(
                Check(
                    f"disk {disk.volume}",
                    ok,
                    f"pool {pool} active on {dst} with the volume"
                    if ok
                    else f"volume not visible in an active pool {pool} on {dst}",
                )
            )
            mount = covering_mount(self.spec, dst, self.spec.pools[pool].path)
            m = self.spec.mounts.get(mount) if mount else None
            fmt = self.spec.volumes[disk.volume].format
            if (
                m is not None
                and m.nfs_version == "3"
                and "nolock" not in m.options
                and fmt == "qcow2"
            ):
                out.append(
                    Check(
                        "nfs locking",
                        False,
                        f"{dst}: NFSv3 mount {mount} without "
                        "nolock under a qcow2 disk: QEMU image locking fails",
                    )
                )
        sconn = await ctx.libvirt(src).connect()
        compatible, detail = await ctx.libvirt(src).run(
            virt.cpu_compatible, sconn, dconn, self.name
        )
        out.append(Check("cpu", compatible is not False, detail))
        if target_facts:
            target_checks, mem = await self._target_checks(ctx, dst, running)
            out += target_checks
        return out, mem

    async def _target_checks(
        self, ctx: RunContext, dst: str, running: bool
    ) -> tuple[list[Check], TargetMemory | None]:
        """The checks read from the target's shell, in one round trip: memory (for a
        running domain) and the bridges its interfaces need."""
        out: list[Check] = []
        mem = None
        facts = ctx.facts(dst)
        bridges = {i.bridge for i in self.d.interfaces if i.bridge}
        wanted: list[Fact[Any]] = []
        if running:
            wanted.append(hostfacts.MEM_AVAILABLE)
        if bridges:
            wanted.append(hostfacts.BRIDGES)
        if wanted:
            await facts.prefetch(wanted)
        if running:
            mem = await self._target_memory(ctx, dst)
            out.append(Check("memory", mem.fits(self.d.memory), mem.describe(dst, self.d.memory)))
        if bridges:
            have = await facts.get(hostfacts.BRIDGES)
            missing = sorted(bridges - have)
            out.append(
                Check(
                    "bridges",
                    not missing,
                    f"missing on {dst}: {', '.join(missing)}" if missing else "present",
                )
            )
        return out, mem

    def diff(self, observed: PlacementObs | None) -> Change:
        if observed is None:
            return self.noop(f"domain {self.name} not defined yet (created on {self.d.host})")
        o = observed
        if o.target == o.host:
            return self.noop(f"domain {self.name} {o.state} on {o.host}")
        failed = [c for c in o.checks if not c.ok]
        live = o.state == "running" and self.policy.live is not False
        mode = self.d.placement.policy if self.d.placement else "pinned"
        if failed and mode == "preferred":
            return self.noop(
                f"domain {self.name} stays on {o.host}: {o.target} not ready "
                f"({'; '.join(c.detail for c in failed)})"
            )
        ch = Change(
            self.id,
            Action.MIGRATE,
            (diff("host", o.host, o.target, "runtime"),),
            f"{'live-migrate' if live else 'move'} {self.name} {o.host} -> {o.target}",
            checks=o.checks,
            data=Move(o.host, o.target, live, self.d.memory, o.memory),
        )
        if failed:
            return ch.with_blocked(
                "pre-flight failed: " + "; ".join(f"{c.name}: {c.detail}" for c in failed)
            )
        return ch

    @classmethod
    def arrange(cls, changes: tuple[Change, ...]) -> tuple[Change, ...]:
        """Order live migrations so that no target runs short of memory on the way.

        Simulated one at a time on the pre-flight numbers: a migration whose target is too
        full now, but has room once domains leaving it are gone (two domains swapping hosts),
        waits for those (``Change.after``) instead of being blocked. One that fits in no order
        (a swap between two full hosts) stays blocked with that reason. At apply time every
        migration checks its target again under a per-host lock and reserves its memory there
        until it is done, so concurrent ones never add up past what the host has.
        """
        moves = {
            c.id: c
            for c in changes
            if isinstance(c.data, Move)
            and c.data.target_memory is not None
            and all(k.ok or k.name == "memory" for k in c.checks)
        }
        if not moves:
            return changes
        mem: dict[str, TargetMemory] = {}
        for c in moves.values():
            m = _move(c)
            assert m.target_memory is not None  # moves has only those
            mem.setdefault(m.target, m.target_memory)

        def shift(host: str, delta: int) -> None:
            if host in mem:
                m = mem[host]
                mem[host] = TargetMemory(m.available - delta, m.committed + delta, m.cap)

        def fits(c: Change) -> bool:
            return mem[_move(c).target].fits(_move(c).memory)

        done: list[Change] = []
        after: dict[ResourceId, tuple[ResourceId, ...]] = {}
        todo = sorted(moves.values(), key=lambda c: str(c.id))
        fits_now = {c.id for c in todo if fits(c)}
        while todo:
            ready = next((c for c in todo if fits(c)), None)
            if ready is None:
                break
            todo.remove(ready)
            move = _move(ready)
            if ready.id not in fits_now:
                after[ready.id] = tuple(d.id for d in done if _move(d).source == move.target)
            shift(move.target, move.memory)
            shift(move.source, -move.memory)
            done.append(ready)
        stuck = {c.id for c in todo}
        out = []
        for c in changes:
            dst = c.data.target if isinstance(c.data, Move) else None
            if c.id in after:
                first = after[c.id]
                verb = "leaves" if len(first) == 1 else "leave"
                leaving = f"{', '.join(a.name for a in first)} {verb} {dst}"
                checks = tuple(
                    Check(k.name, True, f"{k.detail}: room once {leaving}")
                    if k.name == "memory"
                    else k
                    for k in c.checks
                )
                c = replace(
                    c,
                    blocked=None,
                    after=first,
                    checks=checks,
                    reason=f"{c.reason}, after {leaving}",
                )
            elif c.id in stuck and c.id not in fits_now:
                target_memory = _move(moves[c.id]).target_memory
                assert target_memory is not None and dst is not None
                now = target_memory.describe(dst, _move(c).memory)
                c = c.with_blocked(
                    f"pre-flight failed: memory: no order of this apply's migrations makes room "
                    f"for {c.id.name} on {dst} ({now}); move a domain off {dst} first "
                    "(two full hosts swapping domains need a third host)"
                )
            elif c.id in stuck:
                c = c.with_blocked(
                    f"pre-flight failed: memory: {dst} cannot take {c.id.name} "
                    "together with the other migrations onto it"
                )
            out.append(c)
        return tuple(out)

    async def apply(
        self, change: Change, observed: PlacementObs | None, ctx: RunContext
    ) -> PlacementObs | None:
        # where the domain is now: the engine's re-check, just before this (the memory check
        # is made again below, under the target's lock)
        cur = observed
        if cur is None or cur.target == cur.host:
            return cur
        src, dst = cur.host, cur.target
        out_limit = self.spec.hosts[src].migrations.outgoing
        in_limit = self.spec.hosts[dst].migrations.incoming
        async with (
            ctx.semaphore(f"migrate-out:{src}", out_limit),
            ctx.semaphore(f"migrate-in:{dst}", in_limit),
        ):
            running = cur.state == "running"
            await self._check_target(ctx, dst, running)
            if running:
                try:
                    await self._migrate_live(ctx, src, dst)
                finally:
                    reserved_memory(ctx)[dst].pop(self.name, None)
            else:
                await self._move_defined(ctx, src, dst)
        return await self.observe(ctx)

    async def _check_target(self, ctx: RunContext, dst: str, running: bool) -> None:
        """Check the target's memory and bridges again, now, in one round trip, net of the
        migrations in flight onto it; a running guest's memory is then held until its
        migration ends (one check at a time per target host)."""
        async with ctx.lock(f"memory:{dst}"):
            ctx.invalidate(dst)
            checks, _ = await self._target_checks(ctx, dst, running)
            failed = [c for c in checks if not c.ok]
            if failed:
                why = "; ".join(f"{c.name}: {c.detail}" for c in failed)
                raise RefusedError(
                    f"migration of {self.name} to {dst} refused: {why}; "
                    "the domain stays where it is"
                )
            if running:
                reserved_memory(ctx).setdefault(dst, {})[self.name] = self.d.memory

    async def _move_defined(self, ctx: RunContext, src: str, dst: str) -> None:
        slv, dlv = ctx.libvirt(src), ctx.libvirt(dst)
        sconn, dconn = await slv.connect(), await dlv.connect()
        xml = await slv.run(virt.inactive_xml, sconn, self.name)
        self.log.info("moving shut-off domain %s: define on %s", self.name, dst)
        await dlv.run(virt.define_domain, dconn, xml)
        try:
            self.log.info("moving shut-off domain %s: undefine on %s", self.name, src)
            await slv.run(virt.undefine_domain, sconn, self.name)
        except BaseException:
            self.log.warning("undefine on %s failed; removing the copy on %s", src, dst)
            await dlv.run(virt.undefine_domain, dconn, self.name)
            raise
        await dlv.run(virt.set_domain_autostart, dconn, self.name, self.d.autostart)

    async def _migrate_live(self, ctx: RunContext, src: str, dst: str) -> None:
        p = self.policy
        slv, dlv = ctx.libvirt(src), ctx.libvirt(dst)
        sconn, dconn = await slv.connect(), await dlv.connect()
        postcopy = p.postcopy is not None or p.on_timeout == "postcopy"
        flags = virt.migration_flags(
            p.live is not False,
            auto_converge=bool(p.auto_converge),
            postcopy=postcopy,
            parallel=bool(p.parallel_connections),
            compressed=bool(p.compressed),
        )
        params = virt.migration_params(p.bandwidth, p.parallel_connections)
        self.log.info("live-migrating %s %s -> %s", self.name, src, dst)
        task = asyncio.ensure_future(slv.run(virt.migrate, sconn, dconn, self.name, params, flags))
        loop = asyncio.get_running_loop()
        start, downtime, switched = loop.time(), None, False
        tuning: asyncio.Future[Any] | None = None  # one policy call in flight at most
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=self.poll_interval)
                if task.done():
                    break
                elapsed = loop.time() - start
                late = p.postcopy is not None and elapsed >= p.postcopy
                timed_out = p.timeout is not None and elapsed >= p.timeout
                if (
                    postcopy
                    and not switched
                    and (late or (timed_out and p.on_timeout == "postcopy"))
                ):
                    self.log.info("switching %s to post-copy after %.1fs", self.name, elapsed)
                    await self._bounded(slv.run(virt.start_postcopy, sconn, self.name))
                    switched = True
                elif timed_out and not switched:
                    await self._abort(slv, sconn, task)
                    raise KvmstateError(
                        f"migration of {self.name} {src} -> {dst} timed out after "
                        f"{p.timeout:g}s; aborted, the domain is still running on {src}"
                    )
                # Progress and policy calls must never hold up the timeout above: libvirt can
                # make them wait for its job lock (before the migration's perform phase).
                stats = await self._bounded(slv.run(virt.job_progress, sconn, self.name))
                if not stats:
                    continue  # not migrating memory yet
                ctx.emit(self._progress(stats, src, dst))
                want_dt = self._downtime_at(elapsed)
                if (
                    want_dt is not None
                    and want_dt != downtime
                    and (tuning is None or tuning.done())
                ):
                    downtime = want_dt
                    tuning = asyncio.ensure_future(
                        slv.run(virt.set_max_downtime, sconn, self.name, int(want_dt * 1000))
                    )
                    tuning.add_done_callback(_log_failure(self.log, "max downtime"))
            await task
        except asyncio.CancelledError:
            await self._abort(slv, sconn, task)
            raise
        if self.d.autostart:  # autostart is host-local: it does not travel with the guest
            await dlv.run(virt.set_domain_autostart, dconn, self.name, True)
        stats = await dlv.run(virt.completed_job, dconn, self.name)
        done = MigrationDone(self.name, src, dst, stats.get("time_elapsed"), stats.get("downtime"))
        self.log.info(
            "migrated %s to %s (%s ms, downtime %s ms)",
            self.name,
            dst,
            done.time_elapsed,
            done.downtime,
        )
        ctx.emit(done)

    async def _bounded(self, aw: Awaitable[T], seconds: float = 2.0) -> T | None:
        """A progress or policy call, given up after ``seconds`` (its thread finishes later)."""
        fut = asyncio.ensure_future(aw)
        done, _ = await asyncio.wait({fut}, timeout=seconds)
        if not done:
            fut.add_done_callback(_log_failure(self.log, "late libvirt call"))
            return None
        try:
            return fut.result()
        except KvmstateError as e:
            self.log.debug("%s: %s", self.name, e)
            return None

    def _downtime_at(self, elapsed: float) -> float | None:
        dt = self.policy.max_downtime
        for step in self.policy.downtime_steps or []:
            if elapsed >= step.after:
                dt = step.max_downtime
        return dt

    async def _abort(self, slv: Any, sconn: Any, task: asyncio.Future[Any]) -> None:
        """Abort the job and wait for migrate3 to return, so the caller reports where the
        domain really is; retried while libvirt has no abortable job yet."""
        self.log.warning("aborting migration of %s", self.name)
        for _ in range(20):
            await self._bounded(slv.run(virt.abort_job, sconn, self.name), 5.0)
            done, _ = await asyncio.wait({task}, timeout=3.0)
            if done:
                break
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(task), timeout=60)

    def _progress(self, s: dict[str, Any], src: str, dst: str) -> MigrationProgress:
        return MigrationProgress(
            self.name,
            src,
            dst,
            time_elapsed=s.get("time_elapsed"),
            data_processed=s.get("data_processed"),
            data_remaining=s.get("data_remaining"),
            data_total=s.get("data_total"),
            memory_processed=s.get("memory_processed"),
            memory_remaining=s.get("memory_remaining"),
            memory_total=s.get("memory_total"),
            iteration=s.get("memory_iteration"),
            dirty_rate=s.get("memory_dirty_rate"),
        )
