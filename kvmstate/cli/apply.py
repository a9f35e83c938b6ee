"""`kvmstate apply` and `kvmstate evacuate`: plan under the run locks, ask, apply, report."""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.console import Console

from kvmstate.cli import views, wiring
from kvmstate.cli.exits import EXIT_ERROR, EXIT_OK
from kvmstate.cli.parser import typed
from kvmstate.cli.progress import EventPrinter
from kvmstate.model import RunReport

if TYPE_CHECKING:
    from kvmstate.engine import Engine
    from kvmstate.loader import LoadedSpec


@dataclass(frozen=True)
class ApplyArgs:
    command: str
    spec: str
    auto_approve: bool
    allow_destroy: bool
    adopt: bool
    restart_pending: bool
    json: bool
    max_rounds: int
    lock_timeout: float


@dataclass(frozen=True)
class EvacuateArgs(ApplyArgs):
    host: str


def cmd_apply(ns: argparse.Namespace, out: Console, err: Console) -> int:
    args = typed(ApplyArgs, ns)
    return apply(args, wiring.load(args.spec), out, err)


def cmd_evacuate(ns: argparse.Namespace, out: Console, err: Console) -> int:
    from kvmstate.ops.evacuate import drained, pinned_domains

    args = typed(EvacuateArgs, ns)
    loaded = drained(wiring.load(args.spec), args.host)
    for name in pinned_domains(loaded.spec, args.host):
        err.print(
            f"warning: domain {name} can only run on {args.host} (add placement.hosts to let "
            "it move); it stays",
            style="yellow",
            markup=False,
        )
    return apply(args, loaded, out, err)


def apply(args: ApplyArgs, loaded: LoadedSpec, out: Console, err: Console) -> int:
    graph = wiring.graph_of(loaded)
    if not args.auto_approve and not sys.stdin.isatty():
        err.print(
            "refusing to ask for confirmation: stdin is not a terminal; pass --auto-approve",
            style="red",
        )
        return EXIT_ERROR
    if not args.json:
        views.problems(err, loaded.warnings)
    printer = EventPrinter(out, json_out=sys.stdout if args.json else None)
    command = f"kvmstate {args.command} {args.spec}"

    async def run() -> int:
        engine, transports = wiring.engine_for(
            loaded,
            graph,
            events=printer,
            allow_destroy=args.allow_destroy,
            adopt=args.adopt,
            restart_pending=args.restart_pending,
            max_rounds=args.max_rounds,
        )
        # every SSH and libvirt connection the plan needs opens while the cluster lock is
        # taken on the storage host (the plan shares these attempts and reports their errors)
        warming = asyncio.ensure_future(engine.warm_up())
        try:
            async with wiring.cluster_lock(
                transports, loaded, err, command=command, timeout=args.lock_timeout
            ):
                return await locked(engine)
        finally:
            warming.cancel()
            printer.close()
            await transports.close()

    async def locked(engine: Engine) -> int:
        if args.json:
            plan = await engine.plan()
        else:
            with wiring.observing(err, len(loaded.spec.hosts)):
                plan = await engine.plan()
        if plan.errors and not args.json:
            views.plan(out, plan, title=f"kvmstate apply {args.spec}")
        if not plan.has_changes and not plan.errors and not plan.down:
            if args.json:
                printer(RunReport({"converged": True, "outcomes": []}))
            else:
                views.plan(out, plan)
            return EXIT_OK
        if not args.json:
            views.plan(out, plan, title=f"kvmstate apply {args.spec}")
        if not args.auto_approve:
            answer = out.input("\nApply these changes? Only 'yes' is accepted: ")
            if answer.strip() != "yes":
                out.print("Apply cancelled; nothing was changed.")
                return EXIT_ERROR
        report = await engine.apply(plan)
        from kvmstate.ops import journal

        printer.close()
        journal.record(report, spec_path=args.spec)
        if args.json:
            printer(RunReport(report.as_dict()))
        else:
            views.report(out, report)
        return EXIT_OK if report.converged else EXIT_ERROR

    with wiring.local_lock(loaded, err, command=command, timeout=args.lock_timeout, exclusive=True):
        return asyncio.run(run())
