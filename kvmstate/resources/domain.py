"""A libvirt domain: defined from the typed spec, started/stopped to ``state``, autostart.

The domain is looked for on every host it may be on (its allowed hosts and the hosts of its
disks' pools); its config is managed wherever it is defined (moving it is the placement's job).
Defined on two hosts at once is an error and nothing is started. Persistent config changes
are applied by redefining; memory/vCPU changes are then tried live (``setMemoryFlags`` /
``setVcpusFlags`` with AFFECT_LIVE) and whatever libvirt refuses stays "pending restart" (NOOP
with pending diffs): a guest is never restarted behind the operator's back. It is restarted
only when asked: ``apply --restart-pending`` (this run) or ``restart: on-change`` (this
domain); the plan then shows the restart, and apply shuts the guest down gracefully and starts
it again.

Shutting down (``state: shut-off``, a restart) is graceful: the guest agent when the domain has
one (``guest_agent: true``), the ACPI power button otherwise (the XML always has
``<features><acpi/>``); kvmstate waits up to ``shutdown_timeout`` for the guest to power off,
then powers it off (``destroy``), saying so in the log and as a message event.
``shutdown_timeout: 0`` powers off at once. ``state: absent`` still destroys at once.

A domain with ``cloud_init:`` gets its seed ISO (the ``seed`` kind) as a read-only CD-ROM.
A domain without kvmstate's ``<metadata>`` marker is only adopted with ``--adopt``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from kvmstate import spec as spec_models
from kvmstate import virt, virtxml
from kvmstate.checks import Finding
from kvmstate.errors import KvmstateError, RefusedError
from kvmstate.ids import ResourceId
from kvmstate.model import Action, Change, DriftClass, FieldDiff, Message, Shown
from kvmstate.resources import cpu, prereq
from kvmstate.resources.base import DocSection, Resource, RunContext
from kvmstate.resources.capacity import reserved_memory, target_memory
from kvmstate.resources.common import diff
from kvmstate.resources.ha import Readiness, Restart, readiness, restarts
from kvmstate.resources.imports import DomainInfo, Existing, Imported, Inventory
from kvmstate.resources.seed import SEED_SUFFIX, seed_path, seed_pool
from kvmstate.resources.whereabouts import Whereabouts, domain_hosts, locate
from kvmstate.spec import Domain, Spec, is_valid_name
from kvmstate.units import format_duration, format_size
from kvmstate.virtxml import DomainConfig, build_domain_xml, desired_config

# how often a shutdown in progress looks at the domain's state
SHUTDOWN_POLL = 0.5


@dataclass(frozen=True)
class DomainObs:
    host: str
    config: DomainConfig
    live: DomainConfig | None
    state: str
    autostart: bool
    adopt: bool = False  # the run allows adopting an unmarked domain (from ctx.options)
    restart_pending: bool = False  # the run may restart it (apply --restart-pending)
    addresses: tuple[str, ...] = ()  # leased by its networks' DHCP (running, on a network)
    reason: str = ""  # why it is paused ("migration", "ioerror", "user", "postcopy-failed"...)
    # hosts that did not answer and may hold a copy (not fenced): nothing is started then
    unsure: str = ""
    ha: Readiness | None = None  # an HA domain's fencing and storage locks


@dataclass(frozen=True)
class Away:
    """Defined on no host that answered, while some could not tell (down or unreachable)."""

    where: Whereabouts
    restart: Restart | None  # an HA restart elsewhere (None: the domain has no ha: policy)


@dataclass(frozen=True)
class GuestAddresses(Shown):
    """A running guest's addresses, leased by its networks' DHCP (`show --json`: observed)."""

    addresses: tuple[str, ...]


def disk_sources(spec: Spec, d: Domain) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for disk in d.disks:
        vol = spec.volumes[disk.volume]
        out.append((f"{spec.pools[vol.pool].path}/{disk.volume}", vol.format))
    return out


_COMPARED = ("type", "memory_kib", "vcpus", "disks", "nics")


def config_diffs(
    want: DomainConfig, have: DomainConfig, d: Domain, drift: DriftClass
) -> list[FieldDiff]:
    names = list(_COMPARED)
    if drift == "pending-restart":  # the live guest: compare the balloon, not the maximum
        names[names.index("memory_kib")] = "current_kib"
    if d.boot is not None:
        names += ["kernel", "initrd", "cmdline"] + (["firmware"] if d.boot.firmware else [])
    if d.serial is not None:
        names.append("serial")
    # CD-ROMs: only where the spec has one (cloud_init's seed); one the spec does not
    # describe is not compared (an imported domain's, a seed left after cloud_init was
    # taken off: detach it by hand), though a redefinition by kvmstate does not keep it
    if d.cloud_init is not None:
        names.append("cdroms")
    names.append("guest_agent")
    out = []
    if (cpu_change := _cpu_diff(want, have, drift)) is not None:
        out.append(cpu_change)
    for f in names:
        w, h = getattr(want, f), getattr(have, f)
        if f == "nics":  # compare a MAC only where the spec sets one
            h = (
                tuple(
                    n if wn.mac else type(n)(n.kind, n.source, n.model, None)
                    for n, wn in zip(h, w, strict=False)
                )
                + h[len(w) :]
            )
        if w != h:
            out.append(diff(f, _plain(h), _plain(w), drift))
    return out


def _cpu_diff(want: DomainConfig, have: DomainConfig, drift: DriftClass) -> FieldDiff | None:
    """The CPU, when the spec sets one: its mode, its model when named, the features the spec
    lists (libvirt lists more in a running guest's definition). A running host-model guest's
    definition shows the model it was expanded to: compared in the persistent config only."""
    w = want.cpu
    if w is None or (drift == "pending-restart" and w.mode == "host-model"):
        return None
    h = have.cpu.projected(w) if have.cpu is not None else None
    if h == w:
        return None
    return diff("cpu", h.describe() if h else None, w.describe(), drift)


def _plain(v: object) -> object:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if hasattr(v, "__dataclass_fields__"):
        return {f.name: getattr(v, f.name) for f in fields(v)}  # type: ignore[arg-type]
    return v


class DomainResource(Resource[DomainObs | Away]):
    kind = "domain"
    section = "domains"
    section_model = spec_models.Domain
    docs = (
        DocSection(
            "domains.NAME",
            spec_models.Domain,
            "A libvirt domain (VM) and its placement.",
        ),
        DocSection(
            "domains.NAME.boot",
            spec_models.Boot,
            "Firmware boot, or direct kernel boot.",
        ),
        DocSection(
            "domains.NAME.disks[]",
            spec_models.Disk,
            "A disk backed by a volume.",
        ),
        DocSection(
            "domains.NAME.interfaces[]",
            spec_models.Interface,
            "A network interface on a bridge or network.",
        ),
        DocSection(
            "domains.NAME.cpu",
            spec_models.Cpu,
            "The guest CPU: the host's, a named model with features, or the baseline of the "
            "allowed hosts.",
        ),
        DocSection(
            "domains.NAME.ha",
            spec_models.HaPolicy,
            "High availability: restart elsewhere when the host is dead and fenced.",
        ),
        DocSection(
            "domains.NAME.serial",
            spec_models.Serial,
            "The serial console (`pty` or `file`).",
        ),
    )
    requires = (prereq.LIBVIRTD_BINARY, prereq.LIBVIRTD, prereq.QEMU_SYSTEM)
    uses_libvirt = True

    @classmethod
    def import_into(cls, invs: Sequence[Inventory], out: Imported, existing: Existing) -> None:
        import_domains(invs, out, existing)

    @classmethod
    def check(cls, spec: Any) -> Iterable[Finding]:
        for name, d in spec.domains.items():
            if d.ha is None:
                continue
            where = ("domains", name, "ha")
            mode = d.placement.policy if d.placement else "pinned"
            if mode == "pinned":
                yield (
                    where,
                    f"domain {name} is pinned to {d.host}: an HA restart would run it "
                    "elsewhere; use placement.policy preferred (back home when it returns) or "
                    "floating",
                    "error",
                )
            allowed = set(d.allowed_hosts())
            for i, h in enumerate(d.ha.hosts or []):
                if h not in allowed:
                    yield (
                        (*where, "hosts", i),
                        f"{h} is not one of the domain's allowed hosts "
                        f"({', '.join(d.allowed_hosts())})",
                        "error",
                    )
            if not any(h != d.host for h in d.ha_hosts()):
                yield (where, f"domain {name}: no HA host other than {d.host}", "error")
            shared = all(
                len(spec.pools[spec.volumes[k.volume].pool].hosts) > 1
                for k in d.disks
                if k.volume in spec.volumes and spec.volumes[k.volume].pool in spec.pools
            )
            if not shared:
                yield (
                    where,
                    f"domain {name}: a disk is in a pool on one host only; an HA restart "
                    "needs its disks on shared storage",
                    "warning",
                )

    def __init__(self, spec: Spec, name: str, host: str | None = None) -> None:
        super().__init__(spec, name, None)
        self.d: Domain = spec.domains[name]
        self.want = desired_config(self.d, disk_sources(spec, self.d), seed_path(spec, name))

    @classmethod
    def expand(cls, spec: Spec) -> Iterable[DomainResource]:
        return [cls(spec, n) for n in spec.domains]

    @property
    def absent(self) -> bool:
        return self.d.state == "absent"

    def hosts(self) -> tuple[str, ...]:
        return tuple(domain_hosts(self.spec, self.name))

    async def _resolve_cpu(self, ctx: RunContext) -> None:
        """A baseline CPU is computed from the allowed hosts' capabilities (memoized per
        plan): the definition, the diff and the plan then carry the resolved model."""
        if self.d.cpu is not None and self.d.cpu.mode == "baseline" and not self.absent:
            self.want = replace(self.want, cpu=await cpu.resolve_cpu(ctx, self.d))

    def needs(self) -> dict[str, frozenset[prereq.Requirement]]:
        # libvirt on every host it may be found on; QEMU (and /dev/kvm) where it may run
        run = {*self.requires, *([prereq.KVM_DEVICE] if self.d.type == "kvm" else [])}
        looks = {prereq.LIBVIRTD_BINARY, prereq.LIBVIRTD}
        allowed = set(self.d.allowed_hosts())
        return {h: frozenset(run if h in allowed else looks) for h in self.hosts()}

    def depends_on(self) -> frozenset[ResourceId]:
        deps = set()
        for disk in self.d.disks:
            vol = self.spec.volumes[disk.volume]
            deps.add(ResourceId("volume", disk.volume, self.spec.pools[vol.pool].hosts[0]))
            if self.d.host in self.spec.pools[vol.pool].hosts:
                deps.add(ResourceId("pool", vol.pool, self.d.host))
        pool = seed_pool(self.spec, self.name)
        if pool is not None and pool in self.spec.pools:
            deps.add(ResourceId("seed", self.name, self.spec.pools[pool].hosts[0]))
        return frozenset(deps)

    async def observe(self, ctx: RunContext) -> DomainObs | Away | None:
        await self._resolve_cpu(ctx)
        where = await locate(ctx, self.name, self.hosts())
        found = where.found
        if len(found) > 1:
            back = [h for h in sorted(found) if ctx.liveness.ledger.get(h) is not None]
            if back:  # a fenced host that came back: its fence node cleans up first
                raise KvmstateError(
                    f"domain {self.name} is defined on {', '.join(sorted(found))}: "
                    f"{', '.join(back)} came back after it was fenced, and fence:{back[0]} "
                    "removes its stale definition first"
                )
            raise KvmstateError(
                f"domain {self.name} is defined on {len(found)} hosts "
                f"({', '.join(sorted(found))}); "
                "undefine all but one by hand: kvmstate starts nothing until then"
            )
        if not found:
            if not where.unavailable:
                return None
            plan = await restarts(ctx) if self.d.ha is not None else {}
            return Away(where, plan.get(self.name))
        h, st = next(iter(found.items()))
        addresses: tuple[str, ...] = ()
        if st.state == "running" and any(i.network for i in self.d.interfaces):
            lv = ctx.libvirt(h)
            addresses = tuple(await lv.run(virt.domain_addresses, await lv.connect(), self.name))
        return DomainObs(
            h,
            st.config,
            st.live,
            st.state,
            st.autostart,
            ctx.options.adopt,
            ctx.options.restart_pending,
            addresses,
            st.reason,
            where.unsure(),
            await readiness(ctx, self.name) if self.d.ha is not None and not self.absent else None,
        )

    def restart_fields(self, live: DomainConfig) -> list[FieldDiff]:
        """What the running guest lacks of the spec and gets only by a restart (the balloon,
        set back live when it fits under the live maximum, is not among them)."""
        return [
            x
            for x in config_diffs(self.want, live, self.d, "pending-restart")
            if not (x.field == "current_kib" and self.want.memory_kib <= live.memory_kib)
        ]

    def _cpu_create_diff(self) -> list[FieldDiff]:
        c = self.want.cpu
        if c is None:
            return []
        if c.mode == "baseline":  # not resolved: --assume-empty reads no host
            hosts = ", ".join(self.d.allowed_hosts())
            extra = c.describe().removeprefix("baseline")
            return [diff("cpu", None, f"baseline of {hosts}{extra}, from their CPUs at plan")]
        return [diff("cpu", None, c.describe())]

    def _restart_diff(self) -> FieldDiff:
        how = f"graceful shutdown (up to {format_duration(self.d.shutdown_timeout)}), then start"
        return diff("restart", None, how, "runtime")

    def _away(self, o: Away) -> Change:
        """Defined on no host that answered: a host that could not tell may have it."""
        d = self.d
        lost = "; ".join(
            s.describe() for s in (*o.where.unreachable.values(), *o.where.down.values())
        )
        if self.absent or d.state != "running":
            return self.noop(f"domain {self.name} not found on the hosts that answer ({lost})")
        r = o.restart
        if r is None:
            if o.where.unreachable:
                why = (
                    f"domain {self.name} may be running on a host that does not answer "
                    f"({lost}): it is not started anywhere else"
                )
            else:
                why = f"domain {self.name} was on a host that is down ({lost})"
            return self.change(Action.CREATE, [diff("defined", None, d.host)], why).with_blocked(
                f"{why}; it has no ha: policy, so it waits for its host to return"
            )
        ch = self.change(
            Action.CREATE,
            [
                diff("defined", None, r.target),
                diff("state", None, d.state, "runtime"),
                diff("ha", None, f"restart from {', '.join(sorted(o.where.unavailable))}"),
            ],
            r.why
            + (
                f"; waiting for fencing: this apply fences {', '.join(r.fence_first)} first "
                "(its fence agent powers it off and must report it off)"
                if r.fence_first and not r.blocked
                else ""
            ),
            data=r,
        )
        if r.target is None or r.blocked:
            return ch.with_blocked(f"waiting for fencing: {r.blocked}" if r.target else r.blocked)
        return ch

    def diff(self, observed: DomainObs | Away | None) -> Change:
        d = self.d
        if isinstance(observed, Away):
            return self._away(observed)
        if self.absent:
            if observed is None:
                return self.noop(f"domain {self.name} is not defined")
            ch = self.change(Action.DELETE, [diff("defined", observed.host, None)], "state: absent")
            return (
                ch
                if observed.config.managed or observed.adopt
                else ch.with_blocked(
                    f"domain {self.name} on {observed.host} was not created by kvmstate; "
                    "pass --adopt to manage (and delete) it"
                )
            )
        if observed is None:
            return self.change(
                Action.CREATE,
                [
                    diff("defined", None, d.host),
                    diff("state", None, d.state, "runtime"),
                    *self._cpu_create_diff(),
                ],
                f"{d.type} domain, {d.vcpus} vCPU, {self.want.memory_kib // 1024} MiB on {d.host}",
            )
        o = observed
        diffs = config_diffs(self.want, o.config, d, "config")
        if not o.config.managed:
            diffs.append(diff("managed", False, True))
        if o.autostart != d.libvirt_autostart:
            diffs.append(diff("autostart", o.autostart, d.libvirt_autostart))
        may_restart = d.restart == "on-change" or o.restart_pending
        if (o.state == "running") != (d.state == "running"):
            now = f"paused ({o.reason})" if o.state == "paused" and o.reason else o.state
            diffs.append(diff("state", now, d.state, "runtime"))
        elif (
            o.live is not None
            and d.state == "running"
            and may_restart
            and (restart := self.restart_fields(o.live))
        ):
            diffs += [*restart, self._restart_diff()]
        elif o.live is not None and d.state == "running" and not diffs:
            pending = config_diffs(self.want, o.live, d, "pending-restart")
            # the balloon can be set back live (up to the live maximum): runtime drift
            live_fix = [
                diff(x.field, x.before, x.after, "runtime")
                for x in pending
                if x.field == "current_kib" and self.want.memory_kib <= o.live.memory_kib
            ]
            pending = [x for x in pending if not live_fix or x.field != "current_kib"]
            if live_fix:
                diffs += live_fix + pending
            elif pending:
                return self.noop(
                    f"domain {self.name} {o.state} on {o.host}; persistent config applied, "
                    "live guest pending restart: `kvmstate apply --restart-pending` (or "
                    "restart: on-change) restarts it with a graceful shutdown",
                    pending,
                )
        if not diffs:
            where = f", addresses {', '.join(o.addresses)}" if o.addresses else ""
            shown = GuestAddresses(o.addresses) if o.addresses else None
            text = f"domain {self.name} {o.state} on {o.host}{where}"
            if o.ha is not None:  # shown beside the policy in every plan (a "!" line)
                said = f"{o.ha.problem}. {o.ha.summary}" if o.ha.problem else o.ha.summary
                return self.noop(f"{text}; {said}", [diff("ha", None, o.ha.summary)], shown)
            return self.noop(text, data=shown)
        ch = self.change(Action.UPDATE, diffs, f"domain {self.name} on {o.host}")
        if not o.config.managed and not o.adopt:
            return ch.with_blocked(
                f"domain {self.name} on {o.host} exists but was not created by kvmstate "
                "(no ownership marker); pass --adopt to manage it"
            )
        if o.unsure and d.state == "running" and o.state != "running":
            return ch.with_blocked(
                f"domain {self.name} is {o.state} on {o.host}, and {o.unsure}: a copy may run "
                "there; not started until that host answers or is fenced"
            )
        return ch

    async def apply(
        self, change: Change, observed: DomainObs | Away | None, ctx: RunContext
    ) -> DomainObs | Away | None:
        if isinstance(observed, Away):
            assert observed.restart is not None and observed.restart.target is not None
            await self._restart_elsewhere(ctx, observed, observed.restart.target)
            return await self.observe(ctx)
        cur = observed
        host = cur.host if cur else self.d.host
        lv = ctx.libvirt(host)
        conn = await lv.connect()
        if self.absent:
            if cur is not None:
                self.log.info("%s: destroying and undefining domain %s", host, self.name)
                await lv.run(virt.undefine_domain, conn, self.name)
            return await self.observe(ctx)
        fixes = config_diffs(self.want, cur.config, self.d, "config") if cur else [None]
        if cur is None or fixes or not cur.config.managed:
            self.log.info("%s: defining domain %s", host, self.name)
            await lv.run(virt.define_domain, conn, build_domain_xml(self.name, self.want))
        if cur is None or cur.autostart != self.d.libvirt_autostart:
            self.log.info("%s: domain %s autostart=%s", host, self.name, self.d.libvirt_autostart)
            await lv.run(virt.set_domain_autostart, conn, self.name, self.d.libvirt_autostart)
        running = cur is not None and cur.state == "running"
        may_restart = self.d.restart == "on-change" or ctx.options.restart_pending
        if self.d.state == "running" and cur is not None and cur.state == "paused":
            await self._resume(ctx, host, cur)
        elif self.d.state == "running" and not running:
            self.log.info("%s: starting domain %s", host, self.name)
            await lv.run(virt.start_domain, conn, self.name)
        elif self.d.state == "shut-off" and cur is not None and cur.state != "shut-off":
            await self.shutdown(ctx, host)
        elif running and cur is not None and cur.live is not None:
            restart = self.restart_fields(cur.live) if may_restart else []
            if restart:
                fields = ", ".join(x.field for x in restart)
                self.log.info("%s: restarting domain %s to apply %s", host, self.name, fields)
                await self.shutdown(ctx, host)
                self.log.info("%s: starting domain %s", host, self.name)
                await lv.run(virt.start_domain, conn, self.name)
                ctx.emit(Message(f"domain {self.name} on {host}: restarted to apply {fields}"))
            else:
                await self._live_resize(ctx, host, cur.live)
        return await self.observe(ctx)

    async def _restart_elsewhere(self, ctx: RunContext, away: Away, dst: str) -> None:
        """Start an HA domain on ``dst`` from its disk on shared storage, after every host
        that may have held it was found down (fenced): checked again now, with ``dst``'s
        memory read again under its lock and held for the rest of the run."""
        if away.where.unreachable:  # the engine's re-check: fencing did not happen
            raise RefusedError(f"domain {self.name}: {away.where.unsure()}; not restarted on {dst}")
        async with ctx.lock(f"memory:{dst}"):
            ctx.invalidate(dst)
            mem = await target_memory(ctx, dst, self.name)
            if not mem.fits(self.d.memory):
                raise RefusedError(
                    f"HA restart of {self.name} on {dst} refused: "
                    f"{mem.describe(dst, self.d.memory)}"
                )
            reserved_memory(ctx).setdefault(dst, {})[self.name] = self.d.memory
        lv = ctx.libvirt(dst)
        conn = await lv.connect()
        down = ", ".join(f"{s.describe()}" for s in away.where.down.values())
        self.log.warning("%s: HA restart of domain %s (%s)", dst, self.name, down)
        await lv.run(virt.define_domain, conn, build_domain_xml(self.name, self.want))
        await lv.run(virt.set_domain_autostart, conn, self.name, self.d.libvirt_autostart)
        await lv.run(virt.start_domain, conn, self.name)
        for h in away.where.down:
            ctx.liveness.ledger.note_restart(h, self.name, dst)
        ctx.emit(Message(f"domain {self.name}: restarted on {dst} ({down})"))

    async def _resume(self, ctx: RunContext, host: str, cur: DomainObs) -> None:
        """A domain paused on its one host (found nowhere else: ``observe`` refuses two copies)
        is resumed, saying why it was paused. One paused by an I/O error is resumed only once
        its disks answer again, read fresh from that host."""
        if cur.reason == "ioerror":
            for disk in self.want.disks:
                res = await ctx.shell(host).run(["test", "-r", disk.path], check=False)
                if not res.ok:
                    raise RefusedError(
                        f"domain {self.name} on {host} was paused by an I/O error and its disk "
                        f"{disk.path} still does not answer there; not resumed"
                    )
        why = cur.reason or "unknown reason"
        self.log.info("%s: resuming domain %s (it was paused: %s)", host, self.name, why)
        lv = ctx.libvirt(host)
        await lv.run(virt.resume_domain, await lv.connect(), self.name)
        ctx.emit(Message(f"domain {self.name} on {host}: resumed (it was paused: {why})"))

    async def shutdown(self, ctx: RunContext, host: str) -> str:
        """Shut the guest down gracefully: ask it (guest agent, ACPI power button), wait up to
        ``shutdown_timeout`` for it to power off, then power it off. Returns how it ended:
        ``guest`` (it shut itself down), ``power-off`` (forced), ``not-running``."""
        lv = ctx.libvirt(host)
        conn = await lv.connect()
        timeout = self.d.shutdown_timeout
        limit = format_duration(timeout)
        if timeout > 0:
            how = (
                "guest agent, then ACPI power button" if self.d.guest_agent else "ACPI power button"
            )
            self.log.info(
                "%s: shutting down domain %s (%s; waiting up to %s)", host, self.name, how, limit
            )
            try:
                asked = await lv.run(virt.shutdown_domain, conn, self.name, self.d.guest_agent)
            except KvmstateError as e:
                self.log.warning("%s: the shutdown request for %s failed: %s", host, self.name, e)
                asked = True  # still running: powered off below
            if not asked:
                return "not-running"
            loop = asyncio.get_running_loop()
            started = loop.time()
            while True:
                state = await lv.run(virt.domain_state, conn, self.name)
                waited = loop.time() - started
                if state in (None, "shut-off"):
                    text = f"domain {self.name} on {host}: the guest shut down in {waited:.1f}s"
                    self.log.info("%s", text)
                    ctx.emit(Message(text))
                    return "guest"
                if waited >= timeout:
                    break
                await asyncio.sleep(min(SHUTDOWN_POLL, timeout - waited))
            text = (
                f"domain {self.name} on {host} did not shut down within {limit} "
                "(shutdown_timeout): powering it off"
            )
            self.log.warning("%s", text)
            ctx.emit(Message(text))
        else:
            self.log.info("%s: powering off domain %s (shutdown_timeout: 0)", host, self.name)
        await lv.run(virt.destroy_domain, conn, self.name)
        return "power-off"

    async def _live_resize(self, ctx: RunContext, host: str, live: DomainConfig) -> None:
        lv = ctx.libvirt(host)
        conn = await lv.connect()
        if live.current_kib != self.want.memory_kib and self.want.memory_kib <= live.memory_kib:
            try:
                self.log.info(
                    "%s: live memory of %s -> %d KiB", host, self.name, self.want.memory_kib
                )
                await lv.run(virt.set_live_memory, conn, self.name, self.want.memory_kib)
            except KvmstateError as e:
                self.log.warning("%s: live memory change refused: %s (pending restart)", host, e)
        if live.vcpus != self.want.vcpus:
            try:
                self.log.info("%s: live vCPUs of %s -> %d", host, self.name, self.want.vcpus)
                await lv.run(virt.set_live_vcpus, conn, self.name, self.want.vcpus)
            except KvmstateError as e:
                self.log.warning("%s: live vCPU change refused: %s (pending restart)", host, e)


# --- import: what hosts have -> spec entries ------------------------------------------------------

_DOMAIN_STATES = {"running": "running", "shut-off": "shut-off"}
# devices the spec models (or libvirt adds to every guest by itself)
_MODELED_DEVICES = {"disk", "interface", "serial", "console", "emulator", "controller"}
_MODELED_DEVICES |= {"memballoon", "input", "rng", "audio"}


def _disks(
    inv: Inventory, cfg: virtxml.DomainConfig, out: Imported
) -> tuple[list[dict[str, Any]] | None, str]:
    """The spec disks of a domain, or None and why not."""
    by_path = {}
    for vname, v in out.data["volumes"].items():
        pool = out.data["pools"][v["pool"]]
        if inv.host in pool["hosts"]:
            by_path[f"{pool['path'].rstrip('/')}/{vname}"] = (vname, v)
    disks = []
    for i, d in enumerate(cfg.disks):
        found = by_path.get(d.path)
        if found is None:
            return None, f"disk {d.path or '(no source)'} is not a volume of an imported dir pool"
        vname, vol = found
        if d.format != vol["format"]:
            return None, f"disk {d.path} is used as {d.format}, the volume is {vol['format']}"
        bus = d.bus or "virtio"
        if bus not in ("virtio", "sata", "scsi", "ide"):
            return None, f"disk {d.path} is on bus {bus!r}"
        cache = d.cache or "default"
        if cache not in ("none", "writeback", "writethrough", "directsync", "unsafe", "default"):
            return None, f"disk {d.path} has cache {cache!r}"
        disk: dict[str, Any] = {"volume": vname, "bus": bus, "cache": cache}
        prefix = {"virtio": "vd", "ide": "hd"}.get(bus, "sd")
        if d.target and d.target != f"{prefix}{chr(97 + i)}":
            disk["target"] = d.target
        disks.append(disk)
    return disks, ""


def _interfaces(cfg: virtxml.DomainConfig) -> tuple[list[dict[str, Any]] | None, str]:
    nics = []
    for n in cfg.nics:
        if n.kind not in ("bridge", "network") or not n.source:
            return None, f"an interface of type {n.kind!r} (bridge or network only)"
        if (n.model or "virtio") not in ("virtio", "e1000", "rtl8139"):
            return None, f"an interface of model {n.model!r}"
        nic: dict[str, Any] = {n.kind: n.source, "model": n.model or "virtio"}
        if n.mac:
            nic["mac"] = n.mac
        nics.append(nic)
    return nics, ""


_CPU_POLICIES = ("force", "require", "optional", "disable", "forbid")
_CPU_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # the spec's CpuModel
_CPU_FEATURE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")  # the spec's CpuFeature


def _cpu(cfg: virtxml.DomainConfig) -> tuple[dict[str, Any] | None, str]:
    """The spec ``cpu:`` of a definition's CPU (None and why not, "" when it has none). A
    baseline cannot be told from the named model it was resolved to: it comes back as one."""
    c = cfg.cpu
    if c is None:
        return None, ""
    if c.mode in ("host-passthrough", "host-model") and cfg.type != "kvm":
        return None, f"mode {c.mode} on a {cfg.type} (TCG) domain"
    if c.mode not in ("host-passthrough", "host-model", "custom"):
        return None, f"cpu mode {c.mode!r}"
    bad = [f"{n}={p}" for n, p in c.features if p not in _CPU_POLICIES or not _CPU_FEATURE.match(n)]
    if bad or (c.model is not None and not _CPU_NAME.match(c.model)):
        return None, f"features or model the spec cannot name ({', '.join(bad) or c.model})"
    out: dict[str, Any] = {"mode": c.mode}
    if c.mode == "custom":
        if c.model is None:
            return None, "a custom CPU without a model"
        out["model"] = c.model
    if c.features:
        out["features"] = dict(c.features)
    return out, ""


def _domain(inv: Inventory, dom: DomainInfo, out: Imported) -> dict[str, Any] | str:
    """The spec of one domain, or why it cannot be expressed."""
    st, cfg = dom.state, dom.state.config
    if not st.persistent:
        return "transient (not defined persistently)"
    if cfg.type not in ("kvm", "qemu"):
        return f"domain type {cfg.type!r}"
    if st.state not in _DOMAIN_STATES:
        return f"it is {st.state} (running or shut-off only)"
    disks, why = _disks(inv, cfg, out)
    if disks is None:
        return why
    nics, why = _interfaces(cfg)
    if nics is None:
        return why
    if cfg.serial is not None and cfg.serial[0] not in ("pty", "file"):
        return f"a serial port of type {cfg.serial[0]!r}"
    data: dict[str, Any] = {
        "type": cfg.type,
        "memory": format_size(cfg.memory_kib * 1024),
        "vcpus": cfg.vcpus,
    }
    boot: dict[str, Any] = {}
    if cfg.firmware == "uefi":
        boot["firmware"] = "uefi"
    for key in ("kernel", "initrd", "cmdline"):
        if getattr(cfg, key):
            boot[key] = getattr(cfg, key)
    if boot:
        data["boot"] = boot
    if disks:
        data["disks"] = disks
    if nics:
        data["interfaces"] = nics
    if cfg.serial is not None:
        kind, path = cfg.serial
        data["serial"] = {"type": kind, **({"path": path} if path else {})}
    if cfg.guest_agent:
        data["guest_agent"] = True
    cpu_spec, why = _cpu(cfg)
    if cpu_spec is not None:
        data["cpu"] = cpu_spec
    elif why:
        out.notes.append(f"{inv.host}: domain {dom.name}: its CPU is left out: {why}")
    data |= {"state": _DOMAIN_STATES[st.state], "autostart": st.autostart, "host": inv.host}
    return data


def import_domains(invs: Sequence[Inventory], out: Imported, existing: Existing) -> None:
    seen: dict[str, str] = {}
    for inv in invs:
        for dom in inv.domains:
            if dom.name in existing.names("domains"):
                continue
            what = f"domain {dom.name}"
            if dom.name in seen:
                out.data["domains"].pop(dom.name, None)
                out.skip(inv.host, what, f"also defined on {seen[dom.name]}; undefine one first")
                continue
            seen[dom.name] = inv.host
            if not is_valid_name(dom.name):
                out.skip(inv.host, what, "not a usable spec name")
                continue
            got = _domain(inv, dom, out)
            if isinstance(got, str):
                out.skip(inv.host, what, got)
                continue
            out.data["domains"][dom.name] = got
            if not dom.state.config.managed:
                out.notes.append(
                    f"{inv.host}: domain {dom.name} was not created by kvmstate: plan shows it "
                    "as `managed: false -> true`; `apply --adopt` redefines it from the spec"
                )
            for cd in dom.state.config.cdroms:
                what_cd = (
                    "a cloud-init seed CD-ROM"
                    if cd.path.endswith(SEED_SUFFIX)
                    else "a CD-ROM the spec cannot describe"
                )
                out.notes.append(
                    f"{inv.host}: domain {dom.name} has {what_cd} ({cd.path or 'empty'}), left "
                    "out: a seed's password hashes and keys cannot be read back into "
                    "cloud_init, so add `cloud_init:` by hand (kvmstate then writes its own "
                    "seed, applied at the next boot); a redefinition by kvmstate would detach it"
                )
            extra = sorted(set(dom.devices) - _MODELED_DEVICES)
            if extra:
                out.notes.append(
                    f"{inv.host}: domain {dom.name} has devices the spec does not describe "
                    f"({', '.join(extra)}); a redefinition by kvmstate would not keep them"
                )
