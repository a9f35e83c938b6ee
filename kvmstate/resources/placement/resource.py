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

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from kvmstate import hostfacts, virt
from kvmstate import spec as spec_models
from kvmstate.checks import covering_mount
from kvmstate.errors import KvmstateError, RefusedError
from kvmstate.facts import Fact
from kvmstate.ids import ResourceId
from kvmstate.model import Action, Change, Check
from kvmstate.resources import cpu
from kvmstate.resources.base import DocSection, Resource, RunContext
from kvmstate.resources.capacity import reserved_memory, target_memory
from kvmstate.resources.common import diff
from kvmstate.resources.placement.migrate import LiveMigration, describe_policy, policy_checks
from kvmstate.resources.placement.schedule import Move, TargetMemory, arrange_migrations
from kvmstate.resources.whereabouts import domain_hosts, locate
from kvmstate.spec import Domain, MigrationPolicy, Spec

T = TypeVar("T")


@dataclass(frozen=True)
class PlacementObs:
    host: str
    state: str
    target: str
    checks: tuple[Check, ...] = ()
    memory: TargetMemory | None = None
    away: str = ""  # why it stays where it is: the host it should be on does not answer


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

    def target_for(self, current: str, unavailable: Iterable[str] = ()) -> str:
        """Where the domain should run, now on ``current``; hosts that do not answer (or
        are down) are no target: the domain stays until they are back."""
        gone = set(unavailable)
        allowed = [
            h for h in self.d.allowed_hosts() if not self.spec.hosts[h].drain and h not in gone
        ]
        if not allowed:
            return current
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
        where = await locate(ctx, self.name, self.hosts())
        found = where.found
        if len(found) > 1:
            raise KvmstateError(f"domain {self.name} is defined on {', '.join(sorted(found))}")
        if not found:
            return None
        host, st = next(iter(found.items()))
        target = self.target_for(host, where.unavailable)
        natural = self.target_for(host)
        if natural != host and natural in where.unavailable:
            gone = "; ".join(
                s.describe() for s in (*where.down.values(), *where.unreachable.values())
            )
            mode = self.d.placement.policy if self.d.placement else "pinned"
            if mode == "pinned":  # it must go there: a move that cannot be made now
                failed = Check("target libvirtd", False, gone)
                return PlacementObs(host, st.state, natural, (failed,))
            return PlacementObs(host, st.state, target, away=gone)
        checks: tuple[Check, ...] = ()
        mem = None
        if target != host and preflight:
            found_checks, mem = await self._preflight(
                ctx, host, target, st.state == "running", target_facts
            )
            checks = tuple(found_checks)
        return PlacementObs(host, st.state, target, checks, mem)

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
        for net in dict.fromkeys(i.network for i in self.d.interfaces if i.network):
            out.append(await self._network_check(dlv, dconn, dst, net))
        out.append(await self._cpu_check(ctx, src, dst, dconn))
        if running and self.policy.live is not False and self.policy.parallel_connections:
            # what the target's QEMU cannot do of the policy (only combinations with
            # parallel connections so far: nothing else is read otherwise)
            qemu = await dlv.run(virt.hypervisor_version, dconn)
            out += policy_checks(self.policy, qemu)
        if target_facts:
            target_checks, mem = await self._target_checks(ctx, dst, running)
            out += target_checks
        return out, mem

    async def _cpu_check(self, ctx: RunContext, src: str, dst: str, dconn: Any) -> Check:
        """The target must run the domain's CPU: the spec's (a baseline resolved as the
        domain's plan resolves it) compared with ``compareHypervisorCPU`` on the target, which
        names the features it lacks; without ``cpu:``, the CPU of the domain's definition."""
        try:
            if self.d.cpu is not None:
                ok, detail = await cpu.check_cpu(ctx, self.d, dst)
            else:
                sconn = await ctx.libvirt(src).connect()
                ok, detail = await ctx.libvirt(src).run(
                    virt.cpu_compatible, sconn, dconn, self.name
                )
        except virt.NoCpuCaps as e:  # the driver cannot tell (libvirt's test driver)
            return Check("cpu", True, f"not compared: {e}")
        except KvmstateError as e:
            return Check("cpu", False, f"{dst}: CPU not compared: {e}")
        return Check("cpu", ok is not False, f"{dst}: {detail}")

    async def _network_check(self, dlv: Any, dconn: Any, dst: str, net: str) -> Check:
        """The network an interface names must be defined and active on the target. One the
        spec manages there is started before the domain moves (its network -> domain edge),
        so at plan time "not started yet" is not a failure."""
        active = await dlv.run(virt.network_is_active, dconn, net)
        if active:
            return Check(f"network {net}", True, f"network {net} active on {dst}")
        managed = self.spec.networks.get(net)
        if managed is not None and dst in managed.hosts and managed.state != "absent":
            return Check(
                f"network {net}",
                True,
                f"network {net} not active on {dst} yet: networks.{net} starts it first",
            )
        state = "not defined" if active is None else "defined but not active"
        return Check(f"network {net}", False, f"network {net} {state} on {dst}")

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
            mem = await target_memory(ctx, dst, self.name)
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
            if o.away:
                return self.noop(f"domain {self.name} {o.state} on {o.host}, stays: {o.away}")
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
            f"{'live-migrate' if live else 'move'} {self.name} {o.host} -> {o.target}"
            + (f" ({policy})" if live and (policy := describe_policy(self.policy)) else ""),
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
        return arrange_migrations(changes)

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
        await dlv.run(virt.set_domain_autostart, dconn, self.name, self.d.libvirt_autostart)

    async def _migrate_live(self, ctx: RunContext, src: str, dst: str) -> None:
        migration = LiveMigration(self.name, self.policy, self.d.libvirt_autostart, self.log)
        migration.poll_interval = self.poll_interval
        await migration.run(ctx, src, dst)
