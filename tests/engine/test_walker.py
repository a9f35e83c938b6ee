"""The generic walker's rules, one test per rule, on toy nodes.

Nodes are strings; an outcome is a (status, cause) pair: visits return ("ok", None),
("changed", None), ("failed", None) or ("blocked", <node waited for>); the walker's skip
gives ("skipped", <root cause>). Order is proven by recorded sequences and concurrency by
counting the visits inside at once, never by time. ``run`` has a generous hang guard: a
walker that serialised what must run at once would deadlock, and fail instead of hanging.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any

import pytest

from kvmstate.engine.walker import CycleError, Dag, walk

Outcome = tuple[str, str | None]


def succeeded(o: Outcome) -> bool:
    return o[0] in ("ok", "changed")


def skip(node: str, cause: str) -> Outcome:
    return ("skipped", cause)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))  # a hang guard, not a timing assertion


class Toy:
    """Visits that record ``start X`` / ``end X``, return a preset status, yield to the loop
    in between (so others can interleave) and count how many are inside per key."""

    def __init__(
        self,
        status: Mapping[str, str] | None = None,
        keys: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        self.status = dict(status or {})
        self.keys = {n: list(ks) for n, ks in (keys or {}).items()}
        self.log: list[str] = []
        self.inside: dict[str, int] = {}
        self.most: dict[str, int] = {}
        self.gates: dict[str, asyncio.Event] = {}

    def gate(self, node: str) -> asyncio.Event:
        """The node's visit waits for this event before it ends."""
        return self.gates.setdefault(node, asyncio.Event())

    async def visit(self, node: str) -> Outcome:
        self.log.append(f"start {node}")
        for k in ["*", *self.keys.get(node, ())]:
            self.inside[k] = self.inside.get(k, 0) + 1
            self.most[k] = max(self.most.get(k, 0), self.inside[k])
        try:
            for _ in range(3):
                await asyncio.sleep(0)
            if node in self.gates:
                await self.gates[node].wait()
        except asyncio.CancelledError:
            self.log.append(f"cancelled {node}")
            raise
        finally:
            for k in ["*", *self.keys.get(node, ())]:
                self.inside[k] -= 1
        self.log.append(f"end {node}")
        return (self.status.get(node, "ok"), None)

    def before(self, a: str, b: str) -> bool:
        return self.log.index(a) < self.log.index(b)

    def started(self) -> list[str]:
        return [e.split(" ", 1)[1] for e in self.log if e.startswith("start ")]


def dag(nodes: str, edges: str = "") -> Dag[str]:
    """``dag("abc", "a>b b>c")``: nodes a, b, c; edges a -> b, b -> c."""
    pairs = [(e[0], e[2]) for e in edges.split()]
    return Dag(list(nodes), pairs)


def test_dependencies_finish_before_their_dependents_start() -> None:
    toy = Toy()
    out = run(walk(dag("abcdx", "a>b a>c b>d c>d"), toy.visit, succeeded=succeeded, skip=skip))
    assert out == {n: ("ok", None) for n in "abcdx"}
    assert toy.before("end a", "start b") and toy.before("end a", "start c")
    assert toy.before("end b", "start d") and toy.before("end c", "start d")


def test_independent_nodes_run_at_once() -> None:
    # a waits for b to be inside and b for a: a walker that ran them one after the other
    # would deadlock here
    inside = {"a": asyncio.Event(), "b": asyncio.Event()}

    async def visit(node: str) -> Outcome:
        inside[node].set()
        await inside["b" if node == "a" else "a"].wait()
        return ("ok", None)

    out = run(walk(dag("ab"), visit, succeeded=succeeded, skip=skip))
    assert out == {"a": ("ok", None), "b": ("ok", None)}


def test_a_failed_node_skips_its_descendants_and_independent_branches_go_on() -> None:
    toy = Toy({"a": "failed"})
    out = run(walk(dag("abcxy", "a>b b>c x>y"), toy.visit, succeeded=succeeded, skip=skip))
    assert out["a"] == ("failed", None)
    assert out["b"] == ("skipped", "a") and out["c"] == ("skipped", "a")
    assert out["x"] == ("ok", None) and out["y"] == ("ok", None)
    assert toy.started() == ["a", "x", "y"]  # skipped nodes are never visited


def test_a_skipped_node_names_the_root_cause_not_the_intermediate_node() -> None:
    toy = Toy({"b": "failed"})
    out = run(walk(dag("abcd", "a>b b>c c>d"), toy.visit, succeeded=succeeded, skip=skip))
    assert out == {
        "a": ("ok", None),
        "b": ("failed", None),
        "c": ("skipped", "b"),
        "d": ("skipped", "b"),  # b, the root cause, not c
    }


@pytest.mark.parametrize(("edges", "named"), [("p>d q>d", "p"), ("q>d p>d", "q")])
def test_with_two_failed_dependencies_the_first_in_edge_order_is_named(
    edges: str, named: str
) -> None:
    # q fails first, p only after q has ended: the cause does not depend on who fails first
    toy = Toy({"p": "failed", "q": "failed"})
    toy.gate("p")

    async def visit(node: str) -> Outcome:
        result = await toy.visit(node)
        if node == "q":
            toy.gate("p").set()
        return result

    out = run(walk(dag("pqd", edges), visit, succeeded=succeeded, skip=skip))
    assert toy.before("end q", "end p")
    assert out["d"] == ("skipped", named)


def test_what_counts_as_success_is_the_callers_predicate() -> None:
    toy = Toy({"a": "blocked"})
    strict = run(walk(dag("ab", "a>b"), toy.visit, succeeded=succeeded, skip=skip))
    assert strict["b"] == ("skipped", "a")

    toy = Toy({"a": "blocked"})
    lenient = run(
        walk(dag("ab", "a>b"), toy.visit, succeeded=lambda o: o[0] != "failed", skip=skip)
    )
    assert lenient["b"] == ("ok", None)
    assert toy.started() == ["a", "b"]


def test_blame_names_the_node_a_failure_is_attributed_to() -> None:
    # a was blocked waiting for m: a's dependents name m as their root cause
    async def visit(node: str) -> Outcome:
        return ("blocked", "m") if node == "a" else ("failed", None)

    out = run(
        walk(
            dag("mabc", "a>b b>c"),
            visit,
            succeeded=succeeded,
            skip=skip,
            blame=lambda node, o: o[1] or node,
        )
    )
    assert out["b"] == ("skipped", "m") and out["c"] == ("skipped", "m")


def test_after_orders_without_depending() -> None:
    # b waits for a to finish, whatever a's outcome; a's failure does not skip b or c
    toy = Toy({"a": "failed"})
    out = run(
        walk(dag("zabc", "z>a b>c"), toy.visit, succeeded=succeeded, skip=skip, after=[("a", "b")])
    )
    assert toy.before("end a", "start b")
    assert out == {"z": ("ok", None), "a": ("failed", None), "b": ("ok", None), "c": ("ok", None)}


def test_after_a_skipped_predecessor_still_runs() -> None:
    toy = Toy({"z": "failed"})
    out = run(
        walk(dag("zab", "z>a"), toy.visit, succeeded=succeeded, skip=skip, after=[("a", "b")])
    )
    assert out["a"] == ("skipped", "z")
    assert out["b"] == ("ok", None)


def test_a_concurrency_key_limits_how_many_visits_run_at_once() -> None:
    nodes = [f"h1-{i}" for i in range(6)] + [f"h2-{i}" for i in range(5)] + ["free1", "free2"]
    keys = {n: [f"host:{n[:2]}"] for n in nodes if n.startswith("h")}
    toy = Toy(keys=keys)
    run(
        walk(
            Dag(nodes),
            toy.visit,
            succeeded=succeeded,
            skip=skip,
            keys=keys,
            limits={"host:h1": 2, "host:h2": 3},
        )
    )
    assert toy.most["host:h1"] == 2  # never more, and the limit is used
    assert toy.most["host:h2"] == 3
    assert toy.most["*"] == 2 + 3 + 2  # keys do not hold up nodes with other (or no) keys
    assert sorted(toy.started()) == sorted(nodes)


def test_keys_without_a_limit_of_their_own_take_the_default_limit() -> None:
    nodes = [f"n{i}" for i in range(4)]
    keys = {n: ["host:h3"] for n in nodes}
    toy = Toy(keys=keys)
    run(walk(Dag(nodes), toy.visit, succeeded=succeeded, skip=skip, keys=keys, default_limit=1))
    assert toy.most["host:h3"] == 1
    assert toy.started() == nodes


def test_nodes_taking_the_same_keys_in_opposite_orders_do_not_deadlock() -> None:
    # each node takes its keys in one global order, whatever order it lists them in: m1
    # holding A while m2 holds B, each waiting for the other, cannot happen
    keys = {"m1": ["A", "B"], "m2": ["B", "A"], "m3": ["A"], "m4": ["B"]}
    toy = Toy(keys=keys)
    nodes = ["m1", "m2", "m3", "m4"]
    run(walk(Dag(nodes), toy.visit, succeeded=succeeded, skip=skip, keys=keys, default_limit=1))
    assert toy.most["A"] == 1 and toy.most["B"] == 1
    assert toy.started() == nodes  # and the waiting ones are served in rank order


def test_ready_nodes_start_in_rank_order() -> None:
    toy = Toy()
    run(walk(dag("cab"), toy.visit, succeeded=succeeded, skip=skip))
    assert toy.started() == ["c", "a", "b"]  # the order given

    toy = Toy()
    ranked = Dag(["c", "a", "b", "r"], [("r", "c"), ("r", "a"), ("r", "b")], rank=str)
    run(walk(ranked, toy.visit, succeeded=succeeded, skip=skip))
    assert toy.started() == ["r", "a", "b", "c"]  # by rank, also when released together


def test_order_is_a_stable_topological_order() -> None:
    d = dag("dcba", "a>b c>b")
    assert d.order() == ["d", "c", "a", "b"]
    assert d.order(after=[("b", "d")]) == ["c", "a", "b", "d"]


def test_a_cycle_is_named_and_nothing_is_visited() -> None:
    toy = Toy()
    with pytest.raises(CycleError) as err:
        run(walk(dag("xabc", "x>a a>b b>c c>a"), toy.visit, succeeded=succeeded, skip=skip))
    assert err.value.cycle == ("a", "b", "c")
    assert "a -> b -> c -> a" in str(err.value)
    assert toy.log == []


def test_a_cycle_through_after_edges_is_named_too() -> None:
    toy = Toy()
    with pytest.raises(CycleError) as err:
        run(walk(dag("ab", "a>b"), toy.visit, succeeded=succeeded, skip=skip, after=[("b", "a")]))
    assert err.value.cycle == ("a", "b")
    assert toy.log == []
    with pytest.raises(CycleError, match="a -> a"):
        dag("a", "a>a")


def test_an_edge_to_an_unknown_node_is_an_error() -> None:
    with pytest.raises(ValueError, match="q is not a node"):
        dag("ab", "a>q")
    with pytest.raises(ValueError, match="q is not a node"):
        run(walk(dag("ab"), Toy().visit, succeeded=succeeded, skip=skip, after=[("q", "a")]))


def test_cancelling_the_walk_cancels_the_running_visits() -> None:
    toy = Toy()
    toy.gate("a")
    toy.gate("b")

    async def main() -> None:
        task = asyncio.ensure_future(
            walk(dag("abc", "a>c"), toy.visit, succeeded=succeeded, skip=skip)
        )
        while toy.started() != ["a", "b"]:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert sorted(e for e in toy.log if e.startswith("cancelled")) == ["cancelled a", "cancelled b"]
    assert "start c" not in toy.log


def test_keyboard_interrupt_in_a_visit_cancels_the_others_and_propagates() -> None:
    toy = Toy()
    toy.gate("b")

    async def visit(node: str) -> Outcome:
        if node == "a":
            while "start b" not in toy.log:
                await asyncio.sleep(0)
            raise KeyboardInterrupt
        return await toy.visit(node)

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(walk(dag("abc", "a>c"), visit, succeeded=succeeded, skip=skip))
    assert "cancelled b" in toy.log
    assert "start c" not in toy.log


def test_an_exception_escaping_a_visit_cancels_the_others_and_propagates() -> None:
    toy = Toy()
    toy.gate("b")

    async def visit(node: str) -> Outcome:
        if node == "a":
            while "start b" not in toy.log:
                await asyncio.sleep(0)
            raise RuntimeError("a bug in the visit")
        return await toy.visit(node)

    with pytest.raises(RuntimeError, match="a bug in the visit"):
        run(walk(dag("abc", "a>c"), visit, succeeded=succeeded, skip=skip))
    assert "cancelled b" in toy.log
    assert "start c" not in toy.log


def test_a_visit_reads_the_outcomes_of_what_it_waited_for() -> None:
    outcomes: dict[str, Outcome] = {}
    seen: dict[str, Outcome] = {}

    async def visit(node: str) -> Outcome:
        if node in "bc":
            seen[node] = outcomes["a"]
        return ("changed", None) if node == "a" else ("ok", None)

    out = run(
        walk(
            dag("abc", "a>b"),
            visit,
            succeeded=succeeded,
            skip=skip,
            after=[("a", "c")],
            into=outcomes,
        )
    )
    assert seen == {"b": ("changed", None), "c": ("changed", None)}
    assert out == outcomes


def test_a_long_chain_is_skipped_without_recursion() -> None:
    nodes = [f"n{i}" for i in range(5000)]
    chain = Dag(nodes, itertools.pairwise(nodes))
    toy = Toy({"n0": "failed"})
    out = run(walk(chain, toy.visit, succeeded=succeeded, skip=skip))
    assert out["n4999"] == ("skipped", "n0")
    assert toy.started() == ["n0"]


def test_an_empty_graph_is_walked() -> None:
    assert run(walk(Dag([]), Toy().visit, succeeded=succeeded, skip=skip)) == {}
