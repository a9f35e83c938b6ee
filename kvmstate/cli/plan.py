"""`kvmstate plan` and `kvmstate show`: observe the cluster (or assume it empty) and show
what apply would change, or what is there."""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass

from rich.console import Console

from kvmstate.cli import views, wiring
from kvmstate.cli.exits import EXIT_CHANGES, EXIT_ERROR, EXIT_OK
from kvmstate.cli.parser import typed
from kvmstate.errors import KvmstateError
from kvmstate.model import Plan
from kvmstate.ui.console import to_json


@dataclass(frozen=True)
class PlanArgs:
    spec: str
    assume_empty: bool
    json: bool
    allow_destroy: bool
    verbose: int
    host_down: list[str] | None


@dataclass(frozen=True)
class ShowArgs:
    spec: str
    json: bool


def cmd_plan(ns: argparse.Namespace, out: Console, err: Console) -> int:
    args = typed(PlanArgs, ns)
    loaded = wiring.load(args.spec)
    graph = wiring.graph_of(loaded)
    down = frozenset(args.host_down or ())
    unknown = sorted(down - set(loaded.spec.hosts))
    if unknown:
        raise KvmstateError(
            f"--host-down {', '.join(unknown)}: not a host of {args.spec} "
            f"({', '.join(loaded.spec.hosts)})"
        )
    if not args.json:
        views.problems(err, loaded.warnings)

    async def run() -> Plan:
        engine, transports = wiring.engine_for(
            loaded,
            graph,
            allow_destroy=args.allow_destroy,
            assume_empty=args.assume_empty,
            assume_down=down,
        )
        if args.assume_empty:
            return await engine.plan(assume_empty=True)
        try:
            with wiring.observing(err, len(loaded.spec.hosts)):
                return await engine.plan()
        finally:
            await transports.close()

    plan = asyncio.run(run())
    if args.json:
        data = plan.as_dict()
        if down:  # a what-if: say so in the data too
            data = {"what_if": {"hosts_down": sorted(down)}, **data}
        out.print_json(to_json(data))
    else:
        views.plan(
            out,
            plan,
            title=f"kvmstate plan {args.spec}"
            + (" (assuming nothing exists)" if args.assume_empty else "")
            + (
                f" (what if {', '.join(sorted(down))} died now: nothing is changed)" if down else ""
            ),
            verbose=args.verbose > 0,
        )
    if down and not plan.errors:  # a what-if: its changes are an answer, not pending work
        return EXIT_OK
    if plan.errors or plan.down:  # a host down is a host that cannot be checked
        return EXIT_ERROR
    return EXIT_CHANGES if plan.has_changes else EXIT_OK


def cmd_show(ns: argparse.Namespace, out: Console, err: Console) -> int:
    args = typed(ShowArgs, ns)
    loaded = wiring.load(args.spec)
    plan = wiring.observe(loaded, wiring.graph_of(loaded))
    if args.json:
        rows = [c.as_dict() for c in plan.changes]
        sys.stdout.write(
            to_json({"resources": rows, "errors": {str(k): v for k, v in plan.errors.items()}})
            + "\n"
        )
    else:
        views.show(out, plan)
    return EXIT_ERROR if plan.errors else EXIT_OK
