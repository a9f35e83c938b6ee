"""The ``kvmstate`` command. Logging is configured here only.

Exit codes (stable, for scripts and cron):
  0  success; for plan/drift: no changes (the cluster matches the spec)
  1  error: invalid spec, unreachable host, failed apply, refused change
  2  plan/drift only: changes pending (drift)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any

from kvmstate import render
from kvmstate.errors import KvmstateError, SpecError

EXIT_OK, EXIT_ERROR, EXIT_CHANGES = 0, 1, 2

# examples are shown as written (RawDescriptionHelpFormatter): keep every line within 78
# columns, argparse's width on an 80-column terminal (tests/cli/test_width.py checks)
EPILOG = {
    "validate": "example:\n  kvmstate validate specs/seed.yaml",
    "plan": (
        "examples:\n  kvmstate plan specs/lab.yaml\n"
        "  kvmstate plan specs/seed.yaml --assume-empty   # review it, contact no host\n"
        "  kvmstate plan specs/lab.yaml --json\n\n"
        "exit status: 0 no changes, 2 changes pending, 1 error"
    ),
    "apply": (
        "examples:\n  kvmstate apply specs/lab.yaml\n"
        "  kvmstate apply specs/lab-migrated.yaml --auto-approve   # live-migrates\n\n"
        "exit status: 0 converged, 1 error or not converged"
    ),
    "drift": (
        "examples:\n  kvmstate drift specs/lab.yaml\n"
        "  kvmstate drift specs/lab.yaml --json\n\n"
        "  # in a crontab: every 10 minutes, with metrics for node_exporter\n"
        "  PROM=/var/lib/node_exporter/kvmstate.prom\n"
        "  */10 * * * * kvmstate drift /etc/kvmstate/cluster.yaml --textfile $PROM\n\n"
        "exit status: 0 no drift (prints nothing), 2 drift, 1 error (cannot tell)"
    ),
    "import": (
        "examples:\n"
        "  kvmstate import --spec hosts.yaml kvm-1 kvm-2 storage -o cluster.yaml\n"
        "  kvmstate import kvm-1=192.0.2.11 --identity ~/.ssh/id_ed25519 > kvm-1.yaml\n\n"
        "HOST is a host of --spec, NAME=ADDRESS, or an address. Read-only: nothing is\n"
        "changed on the hosts. What cannot be expressed exactly is left out and named\n"
        "in comments at the top of the output; `kvmstate plan` of the result shows no\n"
        "changes for what was imported."
    ),
    "evacuate": (
        "examples:\n  kvmstate evacuate kvm-1 specs/lab.yaml\n"
        "  kvmstate evacuate kvm-1 specs/lab.yaml --auto-approve --json\n\n"
        "exit status: 0 converged, 1 error or not converged"
    ),
    "show": (
        "examples:\n  kvmstate show specs/lab.yaml\n  kvmstate show specs/lab.yaml --json\n\n"
        "exit status: 0 every resource observed, 1 error (some could not be)"
    ),
    "completion": (
        "examples:\n"
        '  eval "$(kvmstate completion bash)"   # in ~/.bashrc\n'
        '  eval "$(kvmstate completion zsh)"    # in ~/.zshrc, after compinit'
    ),
    "graph": (
        "examples:\n  kvmstate graph specs/seed.yaml\n"
        "  kvmstate graph specs/seed.yaml --format dot | dot -Tsvg > g.svg"
    ),
    "schema": "example:\n  kvmstate schema > kvmstate.schema.json   # for editors and CI",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvmstate",
        description="Run a KVM cluster from one desired-state file.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"kvmstate {_version()}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    p.add_argument("--no-color", action="store_true", help="plain output (also: NO_COLOR=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=EPILOG.get(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        # also accepted after the command; SUPPRESS keeps the value given before it
        sp.add_argument(
            "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="log more"
        )
        sp.add_argument(
            "--no-color", action="store_true", default=argparse.SUPPRESS, help="plain output"
        )
        return sp

    v = cmd("validate", "check a spec file; contacts no host")
    v.add_argument("spec")
    v.add_argument("--json", action="store_true", help="machine-readable output")

    pl = cmd("plan", "show what apply would change")
    pl.add_argument("spec")
    pl.add_argument(
        "--assume-empty",
        action="store_true",
        help="plan as if nothing existed yet; contacts no host",
    )
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.add_argument(
        "--detailed-exitcode",
        action="store_true",
        help="accepted for Terraform users: plan always exits 0/2/1",
    )
    pl.add_argument("--allow-destroy", action="store_true", help="show deletions as allowed")

    ap = cmd("apply", "change the cluster to match the spec")
    ap.add_argument("spec")
    ap.add_argument("--auto-approve", action="store_true", help="do not ask for confirmation")
    ap.add_argument(
        "--allow-destroy",
        action="store_true",
        help="allow deleting what the spec marks state: absent",
    )
    ap.add_argument(
        "--adopt",
        action="store_true",
        help="take over existing domains that kvmstate did not create",
    )
    ap.add_argument("--json", action="store_true", help="events and the report as JSON lines")
    ap.add_argument("--max-rounds", type=int, default=3, help="convergence rounds (default 3)")
    ap.add_argument(
        "--lock-timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for another run's lock (default: fail at once)",
    )

    dr = cmd("drift", "detect drift, for cron: quiet and exit 0 when the cluster matches")
    dr.add_argument("spec")
    dr.add_argument("--json", action="store_true", help="one entry per drifted field")
    dr.add_argument("--textfile", metavar="PATH", help="write Prometheus textfile metrics")
    dr.add_argument("--lock-timeout", type=float, default=60.0, metavar="SECONDS")

    ev = cmd("evacuate", "move every domain off a host (apply with drain: true on it)")
    ev.add_argument("host")
    ev.add_argument("spec")
    ev.add_argument("--auto-approve", action="store_true", help="do not ask for confirmation")
    ev.add_argument("--json", action="store_true", help="events and the report as JSON lines")
    ev.set_defaults(allow_destroy=False, adopt=False, max_rounds=3, lock_timeout=0.0)

    sh = cmd("show", "print the observed state of every resource as a table")
    sh.add_argument("spec")
    sh.add_argument("--json", action="store_true", help="machine-readable output")

    comp = cmd("completion", "print a shell completion script (bash or zsh)")
    comp.add_argument("shell", choices=["bash", "zsh"])

    g = cmd("graph", "print the resource dependency graph")
    g.add_argument("spec")
    g.add_argument("--format", choices=["text", "dot", "mermaid"], default="text")

    im = cmd("import", "write a spec for what already exists on hosts (read-only)")
    im.add_argument("hosts", nargs="+", metavar="HOST", help="NAME, NAME=ADDRESS or ADDRESS")
    im.add_argument("--spec", metavar="FILE", help="take hosts and ssh settings from this spec")
    im.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    im.add_argument("--user", help="ssh user (default: the spec's, or root)")
    im.add_argument("--port", type=int, help="ssh port")
    im.add_argument("--identity", metavar="FILE", help="ssh private key")
    im.add_argument("--known-hosts", metavar="FILE", help="known_hosts file to verify keys")

    cmd("schema", "print the spec's JSON Schema")
    sub.add_parser("lab", help="a local multi-host KVM lab (kvmstate lab --help)", add_help=False)
    return p


def _version() -> str:
    from kvmstate import __version__

    return __version__


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler: logging.Handler
    if verbosity == 0:  # warnings only: a plain handler, no rich import on the hot path
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    else:
        from rich.logging import RichHandler

        handler = RichHandler(console=render.make_console(stderr=True), show_path=False)
    logging.basicConfig(level=level, handlers=[handler], format="%(message)s")
    if verbosity < 3:
        logging.getLogger("asyncssh").setLevel(max(level, logging.WARNING))


def _load(path: str) -> Any:
    from kvmstate.loader import load_spec

    return load_spec(path)


def _graph(loaded: Any) -> Any:
    from kvmstate.engine.graph import build_graph
    from kvmstate.resources import KINDS

    return build_graph(loaded.spec, KINDS, path=loaded.path, lines=loaded.lines)


def cmd_validate(args: argparse.Namespace, out: Any, err: Any) -> int:
    loaded = _load(args.spec)
    graph = _graph(loaded)
    if args.json:
        out.print_json(
            render.to_json(
                {
                    "valid": True,
                    "file": args.spec,
                    "resources": len(graph),
                    "warnings": [str(w) for w in loaded.warnings],
                }
            )
        )
        return EXIT_OK
    render.problems(err, loaded.warnings)
    spec = loaded.spec
    out.print(
        f"{args.spec}: valid ({len(spec.hosts)} hosts, {len(graph)} resources"
        f"{', ' + str(len(loaded.warnings)) + ' warnings' if loaded.warnings else ''})"
    )
    return EXIT_OK


def _cluster_lock(transports: Any, loaded: Any, args: argparse.Namespace, err: Any) -> Any:
    from kvmstate.clusterlock import cluster_lock

    def waiting(holder: str) -> None:
        err.print(
            f"waiting up to {args.lock_timeout:g}s for the run lock held by {holder}",
            markup=False,
        )

    return cluster_lock(
        transports,
        loaded.spec,
        command=f"kvmstate {args.command} {args.spec}",
        timeout=args.lock_timeout,
        on_wait=waiting,
    )


def _observe(loaded: Any, graph: Any, args: argparse.Namespace) -> Any:
    """Observe the whole cluster once (read-only) and return the plan."""

    async def run() -> Any:
        engine, transports = _engine(loaded, graph, args, None)
        try:
            return await engine.plan()
        finally:
            await transports.close()

    return asyncio.run(run())


def _observing(err: Any, hosts: int) -> Any:
    """A spinner while observing, only when a person watches (not from cron or a pipe)."""
    import contextlib

    if not err.is_terminal:
        return contextlib.nullcontext()
    return err.status(f"observing {hosts} hosts…", spinner="dots")


def _engine(loaded: Any, graph: Any, args: argparse.Namespace, events: Any) -> tuple[Any, Any]:
    """The engine and the transports it uses (no transport at all for --assume-empty)."""
    from kvmstate.engine import Engine, EngineConfig
    from kvmstate.resources.base import Options, RunContext

    options = Options(
        allow_destroy=getattr(args, "allow_destroy", False), adopt=getattr(args, "adopt", False)
    )
    if getattr(args, "assume_empty", False):
        transports: Any = _NoTransports()
    else:
        from kvmstate.transport.real import RealTransports

        transports = RealTransports(loaded.spec)
    ctx = RunContext(loaded.spec, transports, options, events)
    return Engine(graph, ctx, EngineConfig(max_rounds=getattr(args, "max_rounds", 3))), transports


class _NoTransports:
    """For --assume-empty: any attempt to reach a host is a bug."""

    def shell(self, host: str) -> Any:
        raise KvmstateError(f"--assume-empty must not contact {host}")

    def libvirt(self, host: str) -> Any:
        raise KvmstateError(f"--assume-empty must not contact {host}")

    async def close(self) -> None:
        return None


def cmd_plan(args: argparse.Namespace, out: Any, err: Any) -> int:
    loaded = _load(args.spec)
    graph = _graph(loaded)
    if not args.json:
        render.problems(err, loaded.warnings)

    async def run() -> Any:
        engine, transports = _engine(loaded, graph, args, None)
        if args.assume_empty:
            return await engine.plan(assume_empty=True)
        try:
            with _observing(err, len(loaded.spec.hosts)):
                return await engine.plan()
        finally:
            await transports.close()

    plan = asyncio.run(run())
    if args.json:
        out.print_json(render.to_json(plan.as_dict()))
    else:
        render.plan(
            out,
            plan,
            title=f"kvmstate plan {args.spec}"
            + (" (assuming nothing exists)" if args.assume_empty else ""),
            verbose=args.verbose > 0,
        )
    if plan.errors:
        return EXIT_ERROR
    return EXIT_CHANGES if plan.has_changes else EXIT_OK


def cmd_apply(args: argparse.Namespace, out: Any, err: Any, loaded: Any = None) -> int:
    loaded = loaded or _load(args.spec)
    graph = _graph(loaded)
    if not args.auto_approve and not sys.stdin.isatty():
        err.print(
            "refusing to ask for confirmation: stdin is not a terminal; pass --auto-approve",
            style="red",
        )
        return EXIT_ERROR
    if not args.json:
        render.problems(err, loaded.warnings)
    printer = render.EventPrinter(out, json_out=sys.stdout if args.json else None)

    async def run() -> int:
        engine, transports = _engine(loaded, graph, args, printer)
        # every SSH and libvirt connection the plan needs opens while the cluster lock is
        # taken on the storage host (the plan shares these attempts and reports their errors)
        warming = asyncio.ensure_future(engine.warm_up())
        try:
            async with _cluster_lock(transports, loaded, args, err):
                return await locked(engine)
        finally:
            warming.cancel()
            printer.close()
            await transports.close()

    async def locked(engine: Any) -> int:
        if args.json:
            plan = await engine.plan()
        else:
            with _observing(err, len(loaded.spec.hosts)):
                plan = await engine.plan()
        if plan.errors and not args.json:
            render.plan(out, plan, title=f"kvmstate apply {args.spec}")
        if not plan.has_changes and not plan.errors:
            if args.json:
                printer({"event": "report", "report": {"converged": True, "outcomes": []}})
            else:
                render.plan(out, plan)
            return EXIT_OK
        if not args.json:
            render.plan(out, plan, title=f"kvmstate apply {args.spec}")
        if not args.auto_approve:
            answer = out.input("\nApply these changes? Only 'yes' is accepted: ")
            if answer.strip() != "yes":
                out.print("Apply cancelled; nothing was changed.")
                return EXIT_ERROR
        report = await engine.apply(plan)
        from kvmstate import journal

        printer.close()
        journal.record(report, spec_path=args.spec)
        if args.json:
            printer({"event": "report", "report": report.as_dict()})
        else:
            render.report(out, report)
        return EXIT_OK if report.converged else EXIT_ERROR

    with _lock(loaded, args, err, exclusive=True):
        return asyncio.run(run())


def _lock(loaded: Any, args: argparse.Namespace, err: Any, *, exclusive: bool) -> Any:
    from kvmstate.runlock import cluster_key, local_lock

    key = cluster_key({n: h.address for n, h in loaded.spec.hosts.items()})
    command = f"kvmstate {args.command} {args.spec}"

    def waiting(holder: str) -> None:
        err.print(
            f"waiting up to {args.lock_timeout:g}s for the run lock held by {holder}",
            markup=False,
        )

    return local_lock(
        key, command=command, exclusive=exclusive, timeout=args.lock_timeout, on_wait=waiting
    )


def drift_entries(plan: Any) -> list[dict[str, Any]]:
    out = []
    for c in plan.pending:
        diffs = c.diffs or ()
        if not diffs:
            out.append(
                {
                    "id": str(c.id),
                    "kind": c.id.kind,
                    "host": c.id.host,
                    "action": c.action.value,
                    "class": "runtime",
                    "field": None,
                    "expected": None,
                    "observed": None,
                    "reason": c.reason,
                }
            )
        for d in diffs:
            out.append(
                {
                    "id": str(c.id),
                    "kind": c.id.kind,
                    "host": c.id.host,
                    "action": c.action.value,
                    "class": d.drift,
                    "field": d.field,
                    "expected": d.after,
                    "observed": d.before,
                    "reason": c.reason,
                }
            )
    return out


def cmd_drift(args: argparse.Namespace, out: Any, err: Any) -> int:
    from kvmstate import metrics

    loaded = _load(args.spec)
    graph = _graph(loaded)

    with _lock(loaded, args, err, exclusive=False):
        plan = _observe(loaded, graph, args)
    explained = explained_errors(graph, plan)
    unexplained = {k: v for k, v in plan.errors.items() if k not in explained}
    ok = not unexplained
    if args.textfile:
        metrics.write_textfile(
            args.textfile, metrics.render(plan, success=ok, observe_seconds=plan.observe_seconds)
        )
    entries = drift_entries(plan)
    if args.json:
        sys.stdout.write(
            render.to_json(
                {
                    "drift": entries,
                    "errors": {str(k): v for k, v in unexplained.items()},
                    "unobservable": {
                        str(k): {"error": plan.errors[k], "because_of": [str(c) for c in v]}
                        for k, v in explained.items()
                    },
                    "converged": not plan.errors and not entries,
                }
            )
            + "\n"
        )
    else:
        for e in entries:
            field = f" {e['field']}:" if e["field"] else ""
            detail = (
                f" {render.fmt_value(e['observed'])} -> {render.fmt_value(e['expected'])}"
                if e["field"]
                else f" {e['reason']}"
            )
            line = f"drift ({e['class']}): {e['id']} {e['action']}{field}{detail}"
            out.print(render.Hanging(line, hang=4))
        for rid, causes in explained.items():
            out.print(
                render.Hanging(
                    f"unobservable: {rid} (because of {', '.join(map(str, causes))}): "
                    f"{plan.errors[rid]}",
                    hang=4,
                )
            )
        for rid, msg in unexplained.items():
            err.print(render.Hanging(f"error: {rid}: {msg}", hang=4))
    if not ok:
        return EXIT_ERROR
    return EXIT_CHANGES if entries or explained else EXIT_OK


def explained_errors(graph: Any, plan: Any) -> dict[Any, list[Any]]:
    """Resources that could not be observed while something they stand on has drifted (a
    volume giving 'Stale file handle' under an export removed from the live table): that is
    drift with a known root cause, not a failure to tell."""
    from kvmstate.engine import nx_ancestors

    drifted = {c.id for c in plan.pending}
    out: dict[Any, list[Any]] = {}
    for rid in plan.errors:
        causes = sorted(a for a in nx_ancestors(graph, rid) if a in drifted)
        if causes:
            out[rid] = causes
    return out


def drained(loaded: Any, host: str) -> Any:
    """The spec with ``host`` marked ``drain: true`` (what `evacuate` applies)."""
    import dataclasses

    spec = loaded.spec
    if host not in spec.hosts:
        raise KvmstateError(f"{loaded.path}: no host {host!r} (hosts: {', '.join(spec.hosts)})")
    hosts = {**spec.hosts, host: spec.hosts[host].model_copy(update={"drain": True})}
    return dataclasses.replace(loaded, spec=spec.model_copy(update={"hosts": hosts}))


def cmd_evacuate(args: argparse.Namespace, out: Any, err: Any) -> int:
    loaded = drained(_load(args.spec), args.host)
    stuck = [
        name
        for name, d in loaded.spec.domains.items()
        if d.state != "absent"
        and d.host == args.host
        and not [h for h in d.allowed_hosts() if not loaded.spec.hosts[h].drain]
    ]
    for name in stuck:
        err.print(
            f"warning: domain {name} can only run on {args.host} (add placement.hosts to let "
            "it move); it stays",
            style="yellow",
            markup=False,
        )
    return cmd_apply(args, out, err, loaded)


def cmd_show(args: argparse.Namespace, out: Any, err: Any) -> int:
    loaded = _load(args.spec)
    graph = _graph(loaded)

    plan = _observe(loaded, graph, args)
    if args.json:
        rows = [c.as_dict() for c in plan.changes]
        sys.stdout.write(
            render.to_json(
                {"resources": rows, "errors": {str(k): v for k, v in plan.errors.items()}}
            )
            + "\n"
        )
    else:
        render.show(out, plan)
    return EXIT_ERROR if plan.errors else EXIT_OK


def _import_hosts(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The connection spec's data (base spec + hosts and ssh flags) and {host: address}."""
    import os

    from kvmstate.spec import is_valid_name

    base: dict[str, Any] = {"version": 1}
    if args.spec:
        _load(args.spec)  # a broken base spec is reported like any other
        base = _raw_yaml(args.spec)
    hosts = dict(base.get("hosts") or {})
    chosen: dict[str, str] = {}
    for item in args.hosts:
        name, sep, address = item.partition("=")
        if not sep:
            if name in hosts:
                address = hosts[name]["address"]
            else:
                address, name = name, name.replace(":", "-")
        if not is_valid_name(name):
            raise KvmstateError(f"import: {name!r} is not a valid host name (use NAME=ADDRESS)")
        if name in hosts and hosts[name]["address"] != address:
            raise KvmstateError(
                f"import: host {name} is {hosts[name]['address']} in {args.spec}, not {address}"
            )
        hosts.setdefault(name, {"address": address})
        chosen[name] = address
    ssh = dict(base.get("ssh") or {})
    for key, value in (("user", args.user), ("port", args.port)):
        if value is not None:
            ssh[key] = value
    for key, path in (("identity", args.identity), ("known_hosts", args.known_hosts)):
        if path is not None:
            ssh[key] = os.path.abspath(os.path.expanduser(path))
    data = {**base, "hosts": hosts}
    if ssh:
        data = {"version": base.get("version", 1), "ssh": ssh, **data}
    return data, chosen


def _raw_yaml(path: str) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return dict(data or {})


def cmd_import(args: argparse.Namespace, out: Any, err: Any) -> int:
    from kvmstate import importer
    from kvmstate.loader import parse_spec_text
    from kvmstate.localfs import write_atomic
    from kvmstate.spec import Spec
    from kvmstate.transport.real import RealTransports

    data, chosen = _import_hosts(args)
    try:
        conn_spec = Spec.model_validate(data)
    except ValueError as e:
        raise KvmstateError(f"import: bad host or ssh option: {e}") from None

    async def run() -> list[importer.Inventory]:
        transports = RealTransports(conn_spec)
        try:
            with _observing(err, len(chosen)):
                return await importer.gather(transports, chosen)
        finally:
            await transports.close()

    imported = importer.build(asyncio.run(run()), data)
    result = importer.merged(data, imported)
    header = f"kvmstate import of {', '.join(chosen)} ({len(imported.resources())} resources)"
    text = importer.render_yaml(result, imported.notes, header)
    parse_spec_text(text, args.output or "<import>")  # raises: never write a failing spec
    if args.output:
        write_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    kinds = (
        ", ".join(f"{len(v)} {k if len(v) > 1 else k[:-1]}" for k, v in imported.data.items() if v)
        or "nothing"
    )
    err.print(f"imported {kinds} from {len(chosen)} host(s)", markup=False)
    for note in imported.notes:
        err.print(f"  note: {note}", style="yellow", markup=False)
    return EXIT_OK


def cmd_completion(args: argparse.Namespace, out: Any, err: Any) -> int:
    from kvmstate.completion import script

    sys.stdout.write(script(args.shell, _parser()))
    return EXIT_OK


def cmd_graph(args: argparse.Namespace, out: Any, err: Any) -> int:
    graph = _graph(_load(args.spec))
    text = {"dot": graph.to_dot, "mermaid": graph.to_mermaid, "text": graph.to_text}[args.format]()
    if args.format == "text":  # for a person: wrapped to the width; dot and mermaid as they are
        render.wrapped(out, text, hang=4)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_schema(args: argparse.Namespace, out: Any, err: Any) -> int:
    from kvmstate.docgen import json_schema

    sys.stdout.write(json_schema())
    return EXIT_OK


COMMANDS = {
    "validate": cmd_validate,
    "plan": cmd_plan,
    "apply": cmd_apply,
    "drift": cmd_drift,
    "evacuate": cmd_evacuate,
    "show": cmd_show,
    "completion": cmd_completion,
    "graph": cmd_graph,
    "import": cmd_import,
    "schema": cmd_schema,
}


def _gc_for_a_short_process() -> None:
    """Garbage-collector settings for the kvmstate command, a process that lives seconds to
    minutes (bench B1b: ~0.3 s for a no-op plan, of which the collector took ~30 ms):

    * collect the youngest generation after 10,000 new container objects instead of 700:
      loading the modules a plan needs makes ~55,000 that live to the end, and scanning them
      again and again on the way cost ~15-20 ms;
    * at exit, after the atexit handlers and the thread joins, and after stdout and stderr are
      flushed, the interpreter would walk and free every object one by one (~40 ms) that the
      OS reclaims at once anyway: moving them all to the permanent generation first skips it.
      Every file kvmstate writes is closed by then; only memory is left for the OS to free.
    """
    import atexit
    import gc

    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(10_000, gen1, gen2)
    atexit.register(gc.freeze)


def main(argv: Sequence[str] | None = None) -> int:
    as_program = argv is None  # the kvmstate command, not a caller in a long-lived process
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "lab":
        from kvmstate.lab.cli import main as lab_main

        return lab_main(argv[1:])
    if as_program:
        _gc_for_a_short_process()
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_ERROR
    _setup_logging(args.verbose)
    out = render.make_console(no_color=args.no_color)
    err = render.make_console(stderr=True, no_color=args.no_color)
    try:
        return COMMANDS[args.command](args, out, err)
    except SpecError as e:
        render.problems(err, e.problems)
        n = len(e.problems)
        err.print(
            f"{n} error{'s' if n != 1 else ''} in the spec; nothing was contacted.", style="red"
        )
        return EXIT_ERROR
    except KvmstateError as e:
        err.print(f"error: {e}", style="red")
        return EXIT_ERROR
    except KeyboardInterrupt:
        err.print("interrupted", style="red")
        return 130
    except BrokenPipeError:  # the reader of our output went away (`kvmstate plan x | head`)
        render.silence_stdout()
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
