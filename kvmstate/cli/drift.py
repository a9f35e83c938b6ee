"""`kvmstate drift`: for cron, quiet and exit 0 when the cluster matches the spec; one line
(or JSON entry) per drifted field otherwise, and Prometheus textfile metrics on request."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from rich.console import Console

from kvmstate.cli import wiring
from kvmstate.cli.exits import EXIT_CHANGES, EXIT_ERROR, EXIT_OK
from kvmstate.cli.parser import typed
from kvmstate.cli.views import fmt_value
from kvmstate.ops.drift import DriftReport, drift_report
from kvmstate.ui.console import to_json
from kvmstate.ui.layout import Hanging


@dataclass(frozen=True)
class DriftArgs:
    command: str
    spec: str
    json: bool
    textfile: str | None
    lock_timeout: float


def cmd_drift(ns: argparse.Namespace, out: Console, err: Console) -> int:
    from kvmstate.ops import metrics

    args = typed(DriftArgs, ns)
    loaded = wiring.load(args.spec)
    graph = wiring.graph_of(loaded)
    with wiring.local_lock(
        loaded,
        err,
        command=f"kvmstate {args.command} {args.spec}",
        timeout=args.lock_timeout,
        exclusive=False,
    ):
        plan = wiring.observe(loaded, graph)
    report = drift_report(graph, plan)
    if args.textfile:
        metrics.write_textfile(
            args.textfile,
            metrics.render(plan, success=report.ok, observe_seconds=plan.observe_seconds),
        )
    if args.json:
        sys.stdout.write(to_json(report.as_dict()) + "\n")
    else:
        _print(report, out, err)
    if not report.ok:
        return EXIT_ERROR
    return EXIT_CHANGES if report.drifted else EXIT_OK


def _print(report: DriftReport, out: Console, err: Console) -> None:
    for e in report.entries:
        field = f" {e['field']}:" if e["field"] else ""
        detail = (
            f" {fmt_value(e['observed'])} -> {fmt_value(e['expected'])}"
            if e["field"]
            else f" {e['reason']}"
        )
        line = f"drift ({e['class']}): {e['id']} {e['action']}{field}{detail}"
        out.print(Hanging(line, hang=4))
    for rid, causes in report.explained.items():
        out.print(
            Hanging(
                f"unobservable: {rid} (because of {', '.join(map(str, causes))}): "
                f"{report.errors[rid]}",
                hang=4,
            )
        )
    for rid, msg in report.unexplained.items():
        err.print(Hanging(f"error: {rid}: {msg}", hang=4))
