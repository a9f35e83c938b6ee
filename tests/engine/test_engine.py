"""The engine's contract, on a toy resource kind over an in-memory world.

The toy kind knows nothing of hosts' real commands: it lets these tests control exactly when
a node fails, how long it takes and what the world looks like between plan and apply.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

from kvmstate.engine import Engine, EngineConfig
from kvmstate.engine.graph import build_graph
from kvmstate.errors import SpecError, TemporaryError
from kvmstate.ids import ResourceId
from kvmstate.model import Action, Change, FieldDiff, Status
from kvmstate.resources.base import Options, Resource, RunContext


@dataclass
class ToyNode:
    value: str = "v1"
    deps: tuple[str, ...] = ()
    host: str = "h1"
    absent: bool = False
    fail_apply: bool = False
    temporary_failures: int = 0
    apply_delay: float = 0.0
    ineffective: bool = False  # apply does nothing: never converges
    blocked_until: str | None = None  # blocked (a failed pre-flight) until that node exists
    unobservable_until: str | None = None  # observe fails until that node exists


@dataclass
class World:
    nodes: dict[str, ToyNode]
    state: dict[str, str] = field(default_factory=dict)
    applied: list[str] = field(default_factory=list)
    running: int = 0
    max_running: dict[str, int] = field(default_factory=dict)
    running_per_host: dict[str, int] = field(default_factory=dict)


class Toy(Resource[str]):
    kind = "toy"
    section = "nodes"

    def __init__(self, spec: World, name: str) -> None:
        self.world = spec
        self.node = spec.nodes[name]
        super().__init__(spec, name, self.node.host)  # type: ignore[arg-type]

    @classmethod
    def expand(cls, spec: Any) -> Iterable[Resource[Any]]:
        return [cls(spec, n) for n in spec.nodes]

    def depends_on(self) -> frozenset[ResourceId]:
        nodes = self.world.nodes
        return frozenset(
            ResourceId("toy", d, nodes[d].host if d in nodes else "h1") for d in self.node.deps
        )

    @property
    def absent(self) -> bool:
        return self.node.absent

    async def observe(self, ctx: RunContext) -> str | None:
        await asyncio.sleep(0)
        needs = self.node.unobservable_until
        if needs and needs not in self.world.state:
            raise RuntimeError(f"stale file handle: {needs} is gone")
        return self.world.state.get(self.name)

    def diff(self, observed: str | None) -> Change:
        if self.node.absent:
            if observed is None:
                return self.noop("absent as the spec says")
            return self.change(Action.DELETE, [FieldDiff("value", observed, None)])
        if observed is None:
            change = self.change(Action.CREATE, [FieldDiff("value", None, self.node.value)])
            needs = self.node.blocked_until
            if needs and needs not in self.world.state:
                return change.with_blocked(f"pre-flight failed: {needs} missing")
            return change
        if observed != self.node.value:
            return self.change(Action.UPDATE, [FieldDiff("value", observed, self.node.value)])
        return self.noop(f"value is {observed}")

    async def apply(self, change: Change, observed: str | None, ctx: RunContext) -> str | None:
        w = self.world
        host = self.node.host
        w.running_per_host[host] = w.running_per_host.get(host, 0) + 1
        w.max_running[host] = max(w.max_running.get(host, 0), w.running_per_host[host])
        w.running += 1
        w.max_running["*"] = max(w.max_running.get("*", 0), w.running)
        try:
            await asyncio.sleep(self.node.apply_delay)
            if self.node.temporary_failures > 0:
                self.node.temporary_failures -= 1
                raise TemporaryError("busy, try again", delay=0.01)
            if self.node.fail_apply:
                raise RuntimeError(f"{self.name} exploded")
            w.applied.append(self.name)
            if not self.node.ineffective:
                if change.action is Action.DELETE:
                    w.state.pop(self.name, None)
                else:
                    w.state[self.name] = self.node.value
            return w.state.get(self.name)
        finally:
            w.running -= 1
            w.running_per_host[host] -= 1


class NoTransports:
    def shell(self, host: str) -> Any:
        raise AssertionError("toy resources use no transport")

    def libvirt(self, host: str) -> Any:
        raise AssertionError("toy resources use no transport")

    async def close(self) -> None:
        return None


def engine(world: World, *, allow_destroy: bool = False, **config: Any) -> Engine:
    graph = build_graph(world, [Toy])
    ctx = RunContext(world, NoTransports(), Options(allow_destroy=allow_destroy))  # type: ignore[arg-type]
    config.setdefault("retry_delay", 0.01)
    return Engine(graph, ctx, EngineConfig(**config))


def rid(name: str, host: str = "h1") -> ResourceId:
    return ResourceId("toy", name, host)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def chain_world() -> World:
    return World(
        {
            "a": ToyNode(),
            "b": ToyNode(deps=("a",)),
            "c": ToyNode(deps=("b",)),
            "d": ToyNode(deps=("a",)),
            "x": ToyNode(host="h2"),
        }
    )


def test_apply_converges_and_is_idempotent() -> None:
    world = chain_world()
    e = engine(world)
    plan = run(e.plan())
    assert {c.action for c in plan.changes} == {Action.CREATE}
    report = run(e.apply(plan))
    assert report.converged
    assert {o.status for o in report.outcomes} == {Status.CHANGED}
    assert world.state == {n: "v1" for n in "abcdx"}
    # dependency order: a before b before c
    assert world.applied.index("a") < world.applied.index("b") < world.applied.index("c")
    again = run(engine(world).plan())
    assert not again.has_changes
    assert all(c.reason == "value is v1" for c in again.changes)


def test_failed_node_skips_exactly_its_descendants() -> None:
    world = chain_world()
    world.nodes["b"].fail_apply = True
    report = run(engine(world).apply())
    by_id = {o.id: o for o in report.outcomes}
    assert by_id[rid("b")].status is Status.FAILED
    assert "b exploded" in (by_id[rid("b")].error or "")
    assert by_id[rid("c")].status is Status.SKIPPED
    assert by_id[rid("c")].cause == rid("b")
    for name, host in (("a", "h1"), ("d", "h1"), ("x", "h2")):
        assert by_id[rid(name, host)].status is Status.CHANGED
    assert not report.converged
    assert [o.id for o in report.root_causes] == [rid("b")]
    assert "c" not in world.state


def test_skip_reports_the_root_cause_through_a_chain() -> None:
    world = chain_world()
    world.nodes["a"].fail_apply = True
    report = run(engine(world).apply())
    by_id = {o.id: o for o in report.outcomes}
    for name in "bcd":
        assert by_id[rid(name)].status is Status.SKIPPED
        assert by_id[rid(name)].cause == rid("a")
    assert by_id[rid("x", "h2")].status is Status.CHANGED


def test_per_host_concurrency_limit_is_respected() -> None:
    nodes = {f"n{i}": ToyNode(host="h1", apply_delay=0.02) for i in range(8)}
    nodes.update({f"m{i}": ToyNode(host="h2", apply_delay=0.02) for i in range(8)})
    world = World(nodes)
    report = run(engine(world, host_concurrency=2).apply())
    assert report.converged
    assert world.max_running["h1"] == 2
    assert world.max_running["h2"] == 2
    assert world.max_running["*"] == 4  # the two hosts ran in parallel


def test_recheck_before_mutate_skips_work_already_done() -> None:
    world = World({"a": ToyNode()})
    e = engine(world)
    plan = run(e.plan())
    assert plan.get(rid("a")).action is Action.CREATE  # type: ignore[union-attr]
    world.state["a"] = "v1"  # someone else did it between plan and apply
    report = run(e.apply(plan))
    assert report.outcomes[0].status is Status.OK
    assert world.applied == []


def test_recheck_refuses_when_the_world_moved_away_from_the_plan() -> None:
    world = World({"a": ToyNode(), "b": ToyNode(deps=("a",))})
    e = engine(world)
    plan = run(e.plan())
    world.state["a"] = "someone-elses"  # planned CREATE, now it would be an UPDATE
    report = run(e.apply(plan))
    by_id = {o.id: o for o in report.outcomes}
    assert by_id[rid("a")].status is Status.FAILED
    assert "changed since the plan" in (by_id[rid("a")].error or "")
    assert by_id[rid("b")].status is Status.SKIPPED
    assert world.state == {"a": "someone-elses"}
    assert world.applied == []


def test_drift_is_seen_and_restored() -> None:
    world = chain_world()
    run(engine(world).apply())
    world.state["b"] = "changed-behind-our-back"
    plan = run(engine(world).plan())
    drifted = [c for c in plan.changes if not c.is_noop]
    assert [(c.id, c.action) for c in drifted] == [(rid("b"), Action.UPDATE)]
    assert drifted[0].diffs[0].before == "changed-behind-our-back"
    report = run(engine(world).apply())
    assert report.converged
    assert world.state["b"] == "v1"
    assert not run(engine(world).plan()).has_changes


def test_temporary_errors_are_retried_with_backoff() -> None:
    world = World({"a": ToyNode(temporary_failures=2)})
    report = run(engine(world, retries=3).apply())
    assert report.converged
    assert world.state == {"a": "v1"}


def test_temporary_errors_give_up_after_the_retry_limit() -> None:
    world = World({"a": ToyNode(temporary_failures=5)})
    report = run(engine(world, retries=2).apply())
    assert report.outcomes[0].status is Status.FAILED
    assert "busy" in (report.outcomes[0].error or "")


def test_delete_is_blocked_without_allow_destroy() -> None:
    world = World({"a": ToyNode(absent=True)}, state={"a": "v1"})
    plan = run(engine(world).plan())
    assert plan.changes[0].action is Action.DELETE
    assert plan.changes[0].blocked == "deleting needs --allow-destroy"
    report = run(engine(world).apply(plan))
    assert report.outcomes[0].status is Status.BLOCKED
    assert world.state == {"a": "v1"}
    report = run(engine(world, allow_destroy=True).apply())
    assert report.converged
    assert world.state == {}


def test_deletions_run_on_reversed_edges() -> None:
    world = World(
        {"base": ToyNode(absent=True), "top": ToyNode(deps=("base",), absent=True)},
        state={"base": "v1", "top": "v1"},
    )
    report = run(engine(world, allow_destroy=True).apply())
    assert report.converged
    assert world.applied == ["top", "base"]


def test_present_resource_on_an_absent_dependency_is_a_spec_error() -> None:
    world = World({"base": ToyNode(absent=True), "top": ToyNode(deps=("base",))})
    with pytest.raises(SpecError, match="needs toy:h1:base, which the spec says is absent"):
        build_graph(world, [Toy])


def test_cycles_and_missing_dependencies_are_spec_errors() -> None:
    world = World({"a": ToyNode(deps=("b",)), "b": ToyNode(deps=("a",))})
    with pytest.raises(SpecError, match="dependency cycle"):
        build_graph(world, [Toy])
    world = World({"a": ToyNode(deps=("ghost",))})
    with pytest.raises(SpecError, match="depends on toy:h1:ghost, which is not in the spec"):
        build_graph(world, [Toy])


def test_apply_that_does_not_converge_fails_the_node() -> None:
    world = World({"a": ToyNode(ineffective=True), "b": ToyNode(deps=("a",))})
    report = run(engine(world).apply())
    by_id = {o.id: o for o in report.outcomes}
    assert by_id[rid("a")].status is Status.FAILED
    assert "still not converged" in (by_id[rid("a")].error or "")
    assert by_id[rid("b")].status is Status.SKIPPED


def test_assume_empty_plans_everything_as_create_without_io() -> None:
    world = chain_world()
    world.state = {n: "v1" for n in "abcdx"}
    plan = run(engine(world).plan(assume_empty=True))
    assert [c.action for c in plan.changes] == [Action.CREATE] * 5
    assert [str(c.id) for c in plan.changes][:3] == ["toy:h1:a", "toy:h1:b", "toy:h1:c"]


def test_blocked_change_is_rechecked_after_its_dependency_changes_in_the_same_run() -> None:
    world = World({"pool": ToyNode(), "move": ToyNode(deps=("pool",), blocked_until="pool")})
    e = engine(world)
    plan = run(e.plan())
    assert plan.get(rid("move")).blocked == "pre-flight failed: pool missing"  # type: ignore[union-attr]
    assert plan.deferred == {rid("move")}
    report = run(e.apply(plan))
    assert report.converged, report.as_dict()
    assert world.applied == ["pool", "move"]


def test_blocked_change_without_pending_dependencies_stays_blocked() -> None:
    world = World(
        {"other": ToyNode(), "move": ToyNode(blocked_until="never")}, state={"other": "v1"}
    )
    e = engine(world)
    plan = run(e.plan())
    assert plan.deferred == frozenset()
    report = run(e.apply(plan))
    by_id = {o.id: o for o in report.outcomes}
    assert by_id[rid("move")].status is Status.BLOCKED
    assert by_id[rid("move")].error == "pre-flight failed: never missing"
    assert world.applied == []


def test_a_failed_node_is_not_retried_in_later_rounds() -> None:
    world = World(
        {
            "bad": ToyNode(fail_apply=True),
            "a": ToyNode(),
            "late": ToyNode(deps=("a",), blocked_until="a"),
        }
    )
    attempts: list[str] = []
    original = Toy.apply

    async def counting(
        self: Toy, change: Change, observed: str | None, ctx: RunContext
    ) -> str | None:
        attempts.append(self.name)
        return await original(self, change, observed, ctx)

    Toy.apply = counting  # type: ignore[method-assign]
    try:
        report = run(engine(world, max_rounds=3).apply())
    finally:
        Toy.apply = original  # type: ignore[method-assign]
    assert attempts.count("bad") == 1
    assert {o.id: o.status for o in report.outcomes}[rid("late")] is Status.CHANGED


def test_unobservable_node_is_observed_again_once_its_dependency_is_repaired() -> None:
    world = World(
        {"export": ToyNode(), "volume": ToyNode(deps=("export",), unobservable_until="export")},
        state={"volume": "v1"},
    )
    e = engine(world)
    plan = run(e.plan())
    assert "stale file handle" in plan.errors[rid("volume")]
    report = run(e.apply(plan))
    assert report.converged, report.as_dict()
    assert {o.id: o.status for o in report.outcomes}[rid("volume")] is Status.OK


def test_unobservable_node_with_nothing_repaired_fails() -> None:
    world = World({"volume": ToyNode(unobservable_until="export")})
    report = run(engine(world).apply())
    assert report.outcomes[0].status is Status.FAILED
    assert "stale file handle" in (report.outcomes[0].error or "")


def test_resource_ids_sort_the_way_they_print() -> None:
    ids = [
        ResourceId("pool", "a", "kvm-2"),
        ResourceId("pool", "b", "kvm-1"),
        ResourceId("domain", "web"),
    ]
    assert [str(i) for i in sorted(ids)] == sorted(str(i) for i in ids)
    assert all(ResourceId.parse(str(i)) == i for i in ids)
