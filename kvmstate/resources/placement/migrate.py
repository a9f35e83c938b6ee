"""Placement's live-migration driver: ``migrate3`` with the policy's flags and parameters,
progress polled from ``jobStats`` and emitted as ``MigrationProgress`` events, the downtime
steps applied as time passes, post-copy switched on when the policy says, and a timeout or a
cancellation (Ctrl-C) aborting the job with the guest left running on the source."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from kvmstate import virt
from kvmstate.errors import KvmstateError
from kvmstate.model import Check, MigrationDone, MigrationProgress
from kvmstate.resources.base import RunContext
from kvmstate.spec import MigrationPolicy

T = TypeVar("T")


def _log_failure(log: Any, what: str) -> Callable[[asyncio.Future[Any]], None]:
    def done(fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            log.debug("%s failed: %s", what, fut.exception())

    return done


class LiveMigration:
    """One live migration of domain ``name`` under ``policy``."""

    poll_interval = 0.5

    def __init__(
        self,
        name: str,
        policy: MigrationPolicy,
        autostart: bool,
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self.name = name
        self.policy = policy
        self.autostart = autostart
        self.log = log

    async def run(self, ctx: RunContext, src: str, dst: str) -> None:
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
                if timed_out and not switched and p.on_timeout != "postcopy":
                    await self._abort(slv, sconn, task)
                    raise KvmstateError(
                        f"migration of {self.name} {src} -> {dst} timed out after "
                        f"{p.timeout:g}s; aborted, the domain is still running on {src}"
                    )
                if postcopy and not switched and (late or timed_out):
                    self.log.info("switching %s to post-copy after %.1fs", self.name, elapsed)
                    # not switched when the call failed or was late: tried again next poll
                    switched = bool(
                        await self._bounded(slv.run(virt.start_postcopy, sconn, self.name))
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
        # migrate3 returning is not proof: QEMU 7.2's destination can die at the switchover
        # (post-copy with parallel connections) after the source has already handed over.
        state = await dlv.run(virt.domain_state, dconn, self.name)
        if state != "running":
            raise KvmstateError(
                f"migration of {self.name} {src} -> {dst} returned, but {self.name} is "
                f"{state or 'not defined'} on {dst} (its QEMU failed: see "
                f"/var/log/libvirt/qemu/{self.name}.log on {dst})"
            )
        if self.autostart:  # autostart is host-local: it does not travel with the guest
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


def policy_checks(p: MigrationPolicy, qemu_version: int | None) -> list[Check]:
    """What the target's QEMU (``qemu_version`` as libvirt encodes it, 7002000 = 7.2.0) does
    not do of the policy, as plan checks: a failed one blocks the move before anything moves.
    Seen on QEMU 7.2 / libvirt 9.0 (tests/real/test_migration_policies_lab.py)."""
    out: list[Check] = []
    shown = _qemu(qemu_version)
    postcopy = p.postcopy is not None or (p.on_timeout == "postcopy" and p.timeout is not None)
    if postcopy and p.parallel_connections and (qemu_version or 0) < QEMU_POSTCOPY_MULTIFD:
        out.append(
            Check(
                "migration policy",
                False,
                f"post-copy with parallel connections: not on QEMU {shown} (before 10.0; "
                "7.2 accepts both, then its destination crashes at the switch and the guest "
                "is lost); use one or the other",
            )
        )
    if p.compressed and p.parallel_connections:
        out.append(
            Check(
                "migration policy",
                True,
                "warning: compressed is XBZRLE, which QEMU never applies to pages sent over "
                "parallel connections: no effect with parallel_connections",
            )
        )
    return out


# QEMU 10.0 is the first to run post-copy with multifd channels (before it, 7.2 crashes).
QEMU_POSTCOPY_MULTIFD = 10_000_000


def _qemu(version: int | None) -> str:
    if not version:
        return "(version unknown)"
    return f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"


def describe_policy(p: MigrationPolicy) -> str:
    """What a live migration under ``p`` will do, in the plan's words: "max downtime 300ms,
    raised to 1s after 20s, post-copy after 1m, abort after 10m". Empty: libvirt's defaults.
    The times count from the start of the migration, as :meth:`LiveMigration.run` does."""
    from kvmstate.units import format_duration, format_size

    parts = []
    if p.max_downtime is not None:
        parts.append(f"max downtime {format_duration(p.max_downtime)}")
    elif p.downtime_steps:
        parts.append("max downtime QEMU's default (300ms)")
    for step in p.downtime_steps or []:
        parts.append(
            f"raised to {format_duration(step.max_downtime)} after {format_duration(step.after)}"
        )
    if p.bandwidth is not None:
        parts.append(f"bandwidth {format_size(p.bandwidth)}/s")
    if p.auto_converge:
        parts.append("auto-converge (vCPUs throttled while not converging)")
    if p.parallel_connections:
        parts.append(f"{p.parallel_connections} parallel connections")
    if p.compressed:
        parts.append("compressed (XBZRLE)")
    if p.postcopy is not None:
        parts.append(f"post-copy after {format_duration(p.postcopy)}")
    if p.timeout is not None:
        if p.on_timeout == "postcopy":
            if p.postcopy is None or p.timeout < p.postcopy:
                parts.append(f"post-copy after {format_duration(p.timeout)} (timeout)")
        elif p.postcopy is not None and p.postcopy <= p.timeout:
            parts.append(f"abort after {format_duration(p.timeout)} if post-copy did not start")
        else:
            parts.append(f"abort after {format_duration(p.timeout)}")
    return ", ".join(parts)
