"""The live-migration loop (progress events, downtime, timeout, Ctrl-C) through a stub seam.

libvirt's test driver cannot migrate, so these tests hand ``PlacementResource`` stub
connection/domain objects that behave like libvirt-python's (``migrate3`` blocks until the job
finishes or ``abortJob`` is called; ``jobStats`` reports progress). The real helpers in
``kvmstate.virt`` run against them unchanged. The real proof is on the lab.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt
import pytest
from fakelab import LAB_SPEC, find, make_spec

from kvmstate.errors import KvmstateError, TransportError
from kvmstate.resources.base import Event, RunContext
from kvmstate.resources.placement import PlacementResource

T = TypeVar("T")
POLICY = "    migration: {max_downtime: 300ms, timeout: 400ms}\n    placement:\n"


class StubDomain:
    def __init__(self, world: World) -> None:
        self.world = world

    def migrate3(self, dconn: Any, params: dict[str, Any], flags: int) -> None:
        w = self.world
        w.flags = flags
        w.started.set()
        while not (w.finish.is_set() or w.aborted.is_set()):
            w.iteration += 1
            w.finish.wait(0.005)
        if w.aborted.is_set():
            raise libvirt.libvirtError("operation aborted: migration out job: canceled by client")
        w.location = "kvm-2"

    def jobStats(self, flags: int = 0) -> dict[str, Any]:
        if flags & libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED:
            assert flags & libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED  # left for virsh too
            return {"type": libvirt.VIR_DOMAIN_JOB_COMPLETED, "time_elapsed": 512, "downtime": 99}
        if not self.world.started.is_set() or self.world.location != "kvm-1":
            return {"type": libvirt.VIR_DOMAIN_JOB_NONE}
        remaining = max(0, 100 - self.world.iteration)
        return {
            "type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED,
            "time_elapsed": 10 * self.world.iteration,
            "data_processed": 1000 - remaining,
            "data_remaining": remaining,
            "memory_iteration": self.world.iteration,
            "memory_dirty_rate": 7,
        }

    def abortJob(self) -> None:
        self.world.aborted.set()

    def migrateSetMaxDowntime(self, ms: int, flags: int) -> None:
        self.world.downtimes.append(ms)

    def migrateStartPostCopy(self, flags: int) -> None:
        w = self.world
        w.postcopy_calls += 1
        if w.postcopy_calls <= w.postcopy_refusals:
            raise libvirt.libvirtError("Requested operation is not valid: not yet")
        w.finish.set()  # post-copy always completes

    def state(self) -> tuple[int, int]:
        if self.world.crashed:
            return (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED)
        return (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED)


class World:
    def __init__(self) -> None:
        self.started = threading.Event()
        self.finish = threading.Event()
        self.aborted = threading.Event()
        self.iteration = 0
        self.location = "kvm-1"
        self.flags = 0
        self.downtimes: list[int] = []
        self.postcopy_calls = 0
        self.postcopy_refusals = 0
        self.crashed = False
        self.dom = StubDomain(self)


class StubConn:
    def __init__(self, world: World) -> None:
        self.world = world

    def lookupByName(self, name: str) -> StubDomain:
        return self.world.dom


class StubLibvirt:
    def __init__(self, host: str, world: World) -> None:
        self.host = host
        self.conn = StubConn(world)

    async def connect(self) -> Any:
        return self.conn

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except libvirt.libvirtError as e:
            raise TransportError(self.host, fn.__name__, None, str(e)) from e


class StubTransports:
    def __init__(self, world: World) -> None:
        self.lv = {h: StubLibvirt(h, world) for h in ("kvm-1", "kvm-2")}

    def shell(self, host: str) -> Any:
        raise AssertionError("the migration loop runs no shell command")

    def libvirt(self, host: str) -> StubLibvirt:
        return self.lv[host]

    async def close(self) -> None:
        return None


def setup(policy: str = POLICY) -> tuple[World, PlacementResource, RunContext, list[Event]]:
    spec = make_spec(LAB_SPEC.replace("    placement:\n", policy))
    world = World()
    events: list[Event] = []
    ctx = RunContext(spec, StubTransports(world), events=events.append)
    res = find(spec, "placement")
    assert isinstance(res, PlacementResource)
    res.poll_interval = 0.01
    return world, res, ctx, events


def test_progress_events_downtime_and_completion() -> None:
    world, res, ctx, events = setup()

    async def scenario() -> None:
        task = asyncio.create_task(res._migrate_live(ctx, "kvm-1", "kvm-2"))
        await asyncio.sleep(0.1)
        world.finish.set()
        await task

    asyncio.run(scenario())
    assert world.location == "kvm-2"
    for flag in ("VIR_MIGRATE_LIVE", "VIR_MIGRATE_PERSIST_DEST", "VIR_MIGRATE_UNDEFINE_SOURCE"):
        assert world.flags & getattr(libvirt, flag)
    assert world.downtimes == [300]
    progress = [e for e in events if e["event"] == "migration-progress"]
    assert progress and all(e["domain"] == "guest" for e in progress)
    assert {"data_processed", "data_remaining", "iteration", "dirty_rate"} <= set(progress[-1])
    assert progress[-1]["data_remaining"] < 100
    assert dict(events[-1]) == {
        "event": "migration-done",
        "domain": "guest",
        "source": "kvm-1",
        "target": "kvm-2",
        "time_elapsed": 512,
        "downtime": 99,
    }


def test_timeout_aborts_and_leaves_the_guest_on_the_source() -> None:
    world, res, ctx, events = setup()
    with pytest.raises(KvmstateError, match=r"timed out after 0\.4s; aborted"):
        asyncio.run(res._migrate_live(ctx, "kvm-1", "kvm-2"))
    assert world.aborted.is_set() and world.location == "kvm-1"
    assert not [e for e in events if e["event"] == "migration-done"]


def test_cancellation_aborts_the_job() -> None:
    world, res, ctx, _ = setup()

    async def scenario() -> None:
        task = asyncio.create_task(res._migrate_live(ctx, "kvm-1", "kvm-2"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert world.aborted.is_set() and world.location == "kvm-1"


def test_a_destination_that_died_at_the_switchover_is_a_failure_not_a_migration() -> None:
    """QEMU 7.2's destination crashed after migrate3 returned (post-copy + multifd, seen on
    the lab): the guest is gone, and kvmstate must not report it migrated."""
    world, res, ctx, events = setup()
    world.crashed = True

    async def scenario() -> None:
        task = asyncio.create_task(res._migrate_live(ctx, "kvm-1", "kvm-2"))
        await asyncio.sleep(0.05)
        world.finish.set()
        await task

    with pytest.raises(KvmstateError, match=r"returned, but guest is shut-off on kvm-2"):
        asyncio.run(scenario())
    assert not [e for e in events if e["event"] == "migration-done"]


def test_a_refused_post_copy_switch_is_tried_again() -> None:
    world, res, ctx, events = setup(
        "    migration: {postcopy: 20ms, timeout: 30s}\n    placement:\n"
    )
    world.postcopy_refusals = 2
    asyncio.run(res._migrate_live(ctx, "kvm-1", "kvm-2"))
    assert world.postcopy_calls == 3 and world.location == "kvm-2"
    assert events[-1]["event"] == "migration-done"


def test_a_post_copy_switch_that_never_happens_still_times_out() -> None:
    world, res, ctx, _ = setup("    migration: {postcopy: 10ms, timeout: 300ms}\n    placement:\n")
    world.postcopy_refusals = 10**6
    with pytest.raises(KvmstateError, match=r"timed out after 0\.3s; aborted"):
        asyncio.run(res._migrate_live(ctx, "kvm-1", "kvm-2"))
    assert world.aborted.is_set() and world.location == "kvm-1" and world.postcopy_calls > 1


def test_on_timeout_postcopy_switches_instead_of_aborting() -> None:
    world, res, ctx, events = setup(
        "    migration: {timeout: 50ms, on_timeout: postcopy}\n    placement:\n"
    )
    asyncio.run(res._migrate_live(ctx, "kvm-1", "kvm-2"))
    assert world.flags & libvirt.VIR_MIGRATE_POSTCOPY
    assert world.postcopy_calls == 1 and not world.aborted.is_set()
    assert world.location == "kvm-2" and events[-1]["event"] == "migration-done"
