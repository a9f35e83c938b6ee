"""W1: the generic walker (``kvmstate.engine.walker``) against the engine's own walk
(``Engine._walk``) on a ~2000-node graph shaped like a cluster, in memory (no host, no transport).

Each host has a chain packages -> subvolume -> export -> mount -> pool and volumes and domains
on the pool; every host's mount also stands on the previous host's export. Three figures, the
best of ``runs`` (interleaved; the medians are kept too):

* engine:  ``Engine._walk`` on a plan where every node is a no-op (what a converged apply
           walks: the walking, plus the engine's per-node no-op policy);
* walker:  ``walk`` with a visit that does the same per-node no-op work as the engine (the
           outcome and the "did anything upstream change" scan), every node holding its
           host's concurrency key (limit 4);
* bare:    ``walk`` with a visit that returns at once (the walking alone).

Target: walker <= engine. ``python -m bench.walk`` runs it alone.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from collections.abc import Iterable
from typing import Any

from bench.common import median, row
from kvmstate.engine import Engine, nx_ancestors
from kvmstate.engine.graph import ResourceGraph, build_graph
from kvmstate.engine.walker import Dag, walk
from kvmstate.ids import ResourceId
from kvmstate.model import Change, Outcome, Plan, Status
from kvmstate.resources.base import Resource, RunContext

HOSTS = 100
PER_HOST = 20  # 5 in the chain, 15 volumes and domains: 2000 nodes in all
RUNS = 15
LIMIT = 4
CHAIN = ("packages", "subvolume", "export", "mount", "pool")


class _World:
    def __init__(self, hosts: int, per_host: int) -> None:
        self.deps: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for h in range(hosts):
            host = f"h{h:03d}"
            names = [*CHAIN, *(f"vol{i}" for i in range(per_host - len(CHAIN)))]
            for i, name in enumerate(names):
                deps = [(CHAIN[i - 1] if i < len(CHAIN) else "pool", host)] if i else []
                if name == "mount" and h:
                    deps.append(("export", f"h{h - 1:03d}"))
                self.deps[(name, host)] = deps


class _Node(Resource[str]):
    kind = "node"

    def __init__(self, spec: _World, name: str, host: str) -> None:
        self.world = spec
        super().__init__(spec, name, host)  # type: ignore[arg-type]

    @classmethod
    def expand(cls, spec: Any) -> Iterable[Resource[Any]]:
        return [cls(spec, name, host) for name, host in spec.deps]

    def depends_on(self) -> frozenset[ResourceId]:
        return frozenset(
            ResourceId("node", n, h) for n, h in self.world.deps[(self.name, self.host)]
        )  # type: ignore[index]

    async def observe(self, ctx: RunContext) -> str | None:
        return "v"

    def diff(self, observed: str | None) -> Change:
        return self.noop("value is v")

    async def apply(self, change: Change, ctx: RunContext) -> str | None:
        return "v"


def _setup(hosts: int, per_host: int) -> tuple[ResourceGraph, Engine, Plan]:
    world = _World(hosts, per_host)
    graph = build_graph(world, [_Node])
    ctx = RunContext(world, None)  # type: ignore[arg-type]
    engine = Engine(graph, ctx)
    order = graph.order()
    plan = Plan(tuple(graph[rid].diff("v") for rid in order), {}, tuple(order))
    return graph, engine, plan


def _time_engine(engine: Engine, plan: Plan) -> float:
    async def go() -> float:
        t = time.perf_counter()
        await engine._walk(plan, {}, {}, first_round=True)
        return time.perf_counter() - t

    return asyncio.run(go())


def _time_walker(graph: ResourceGraph, plan: Plan, *, work: bool) -> float:
    changes = {c.id: c for c in plan.changes}

    async def go() -> float:
        t = time.perf_counter()
        dag = Dag(graph.resources, graph.edges())
        outcomes: dict[ResourceId, Outcome] = {}

        async def visit(rid: ResourceId) -> Outcome:
            if work:  # the engine's per-node no-op work
                any(outcomes[a].status is Status.CHANGED for a in nx_ancestors(graph, rid))
            return Outcome(rid, Status.OK, changes.get(rid))

        await walk(
            dag,
            visit,
            succeeded=lambda o: o.status in (Status.OK, Status.CHANGED),
            skip=lambda rid, cause: Outcome(rid, Status.SKIPPED, cause=cause),
            keys={rid: graph[rid].hosts() for rid in graph.resources} if work else None,
            default_limit=LIMIT,
            into=outcomes,
        )
        return time.perf_counter() - t

    return asyncio.run(go())


def run(runs: int = RUNS, hosts: int = HOSTS, per_host: int = PER_HOST) -> dict[str, Any]:
    graph, engine, plan = _setup(hosts, per_host)
    times: dict[str, list[float]] = {"engine": [], "walker": [], "bare": []}
    for _ in range(runs):  # interleaved, so that a busy machine slows all three alike
        gc.collect()
        times["engine"].append(_time_engine(engine, plan))
        gc.collect()
        times["walker"].append(_time_walker(graph, plan, work=True))
        gc.collect()
        times["bare"].append(_time_walker(graph, plan, work=False))
    # the best of the runs: what the code costs, with as little of the machine's other load
    # as the runs could avoid (the medians are kept in the results too)
    eng, wlk, bare = (min(times[k]) for k in ("engine", "walker", "bare"))
    n = len(graph)
    print(
        f"W1 walk of {n} nodes: engine {eng * 1000:.1f} ms, walker {wlk * 1000:.1f} ms "
        f"(the same per-node work, per-host limits), bare walker {bare * 1000:.1f} ms"
    )
    return {
        "nodes": n,
        "engine_s": eng,
        "walker_s": wlk,
        "bare_walker_s": bare,
        "medians_s": {k: median(v) for k, v in times.items()},
        "rows": [
            row(
                f"W1 walker vs engine walk ({n} nodes)",
                f"{wlk * 1000:.1f} ms vs {eng * 1000:.1f} ms (bare {bare * 1000:.1f} ms)",
                "walker <= engine",
                wlk <= eng,
            )
        ],
    }


if __name__ == "__main__":
    res = run()
    sys.exit(0 if res["rows"][0]["ok"] else 1)
