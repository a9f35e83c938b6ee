"""One no-op ``Engine.plan()`` in a fresh process; prints one JSON line.

``python -m bench.planworker SPEC [--tracemalloc] [--warm]``

Measures: import time, spec load + graph, the plan's wall time (connects included, like a
cron run), the process's peak RSS before and after the plan, optionally the Python heap peak
(tracemalloc; slows the run, so it is a separate run), and ``RealTransports.stats()`` /
``detailed_stats()`` per host. ``--warm`` also times a second plan over the connections that
are already open (facts invalidated: every read is done again).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def what_if(changes: set[str]) -> None:
    """Measure a suggested change without editing kvmstate: wrap ``asyncssh.connect``."""
    import asyncssh

    unknown = changes - {"known-hosts-cache", "aes-gcm"}
    if unknown:
        raise SystemExit(f"unknown --what-if {sorted(unknown)}")
    orig = asyncssh.connect
    parsed: dict[str, object] = {}

    def connect(*a: object, known_hosts: object = None, **kw: object) -> object:
        if "known-hosts-cache" in changes and isinstance(known_hosts, str):
            if known_hosts not in parsed:
                parsed[known_hosts] = asyncssh.read_known_hosts(known_hosts)
            known_hosts = parsed[known_hosts]
        if "aes-gcm" in changes:
            kw["encryption_algs"] = [
                "aes128-gcm@openssh.com",
                "aes256-gcm@openssh.com",
                "chacha20-poly1305@openssh.com",
                "aes128-ctr",
            ]
        return orig(*a, known_hosts=known_hosts, **kw)

    asyncssh.connect = connect  # type: ignore[assignment]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("spec")
    p.add_argument("--tracemalloc", action="store_true")
    p.add_argument("--warm", action="store_true")
    p.add_argument(
        "--apply", action="store_true", help="then apply (no lock, no journal): B2 for an apply"
    )
    p.add_argument("--profile", metavar="FILE", help="cProfile the first plan into FILE")
    p.add_argument(
        "--what-if",
        default="",
        help="comma list of suggested kvmstate changes to simulate by patching asyncssh.connect: "
        "known-hosts-cache (parse each known_hosts file once per run), aes-gcm (prefer "
        "aes128-gcm@openssh.com over chacha20-poly1305)",
    )
    args = p.parse_args()
    if args.what_if:
        what_if(set(args.what_if.split(",")))

    t0 = time.perf_counter()
    from kvmstate.engine import Engine
    from kvmstate.engine.graph import build_graph
    from kvmstate.loader import load_spec
    from kvmstate.resources import KINDS
    from kvmstate.resources.base import RunContext
    from kvmstate.transport.real import RealTransports

    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    loaded = load_spec(args.spec)
    graph = build_graph(loaded.spec, KINDS, path=loaded.path, lines=loaded.lines)
    t_load = time.perf_counter() - t1
    rss_before = rss()

    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start()

    async def run() -> dict[str, object]:
        transports = RealTransports(loaded.spec)
        ctx = RunContext(loaded.spec, transports)
        engine = Engine(graph, ctx)
        prof = None
        if args.profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        cpu0 = cpu()
        start = time.perf_counter()
        plan = await engine.plan()
        wall = time.perf_counter() - start
        out: dict[str, object] = {"plan_wall": wall, "plan_cpu": cpu() - cpu0}
        if prof is not None:
            prof.disable()
            prof.dump_stats(args.profile)
        stats = transports.stats()
        detail = transports.detailed_stats()
        if args.apply:
            start = time.perf_counter()
            report = await engine.apply(plan)
            out["apply_wall"] = time.perf_counter() - start
            out["apply_converged"] = report.converged
            out["apply_changed"] = sum(1 for o in report.outcomes if o.status.value == "changed")
            stats = transports.stats()
            detail = transports.detailed_stats()
        if args.warm:
            ctx2 = RunContext(loaded.spec, transports)
            cpu0 = cpu()
            start = time.perf_counter()
            plan2 = await Engine(graph, ctx2).plan()
            out["warm_wall"] = time.perf_counter() - start
            out["warm_cpu"] = cpu() - cpu0
            out["warm_changes"] = sum(1 for c in plan2.changes if not c.is_noop)
        t2 = time.perf_counter()
        await transports.close()
        out["close_wall"] = time.perf_counter() - t2
        out.update(
            {
                "resources": len(plan.order),
                "noop": sum(1 for c in plan.changes if c.is_noop),
                "changes": [str(c.id) for c in plan.changes if not c.is_noop][:5],
                "n_changes": sum(1 for c in plan.changes if not c.is_noop),
                "errors": dict(list({str(k): v for k, v in plan.errors.items()}.items())[:5]),
                "n_errors": len(plan.errors),
                "stats": stats,
                "detail": detail,
            }
        )
        return out

    out = asyncio.run(run())
    if args.tracemalloc:
        import tracemalloc

        _, peak = tracemalloc.get_traced_memory()
        out["heap_peak"] = peak
    out.update(
        {
            "import": t_import,
            "load": t_load,
            "hosts": len(loaded.spec.hosts),
            "rss_before": rss_before,
            "rss_after": rss(),
        }
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
