"""``python -m bench`` (``make bench``): B3 on simulated hosts, T1/T2 (the transport on this
machine), then B2/B1b/B1/B4/B5/B6 on the lab when it is up and converged (or ``--setup-lab``);
prints each figure with its target and PASS/MISS; writes ``bench/results/latest.json`` and
``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any

from bench import lab, report, scale, startup, transport
from bench.common import REPO, fmt, machine_info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--setup-lab",
        action="store_true",
        help="kvmstate lab up + the first apply of specs/lab.yaml before the lab benchmarks",
    )
    p.add_argument(
        "--only",
        default="B1,B1b,B2,B3,B4,B5,B6,T",
        help="comma list of benchmarks (B3 = simulated, T = transport; the others need the lab)",
    )
    p.add_argument("--runs", type=int, default=7, help="runs per side for B1b (B1: runs-2, >=3)")
    p.add_argument("--b3-runs", type=int, default=scale.RUNS)
    p.add_argument("--b3-mode", choices=["auto", "full", "shell"], default="auto")
    p.add_argument("--b3-ns", default=",".join(str(n) for n in scale.NS))
    p.add_argument("--no-mutate", action="store_true", help="skip B4, B5 and B6 (they migrate)")
    p.add_argument("--no-lab", action="store_true", help="do not even check the lab")
    p.add_argument("--profile", metavar="DIR", help="also write cProfile/importtime data here")
    p.add_argument("--no-write", action="store_true", help="do not write the json / md")
    args = p.parse_args(argv)
    only = {x.strip() for x in args.only.split(",") if x.strip()}

    started = time.perf_counter()
    machine = machine_info()
    print(
        f"kvmstate benchmarks on {machine['cpu']} ({machine['cores']} cores), "
        f"kernel {machine['kernel']}"
    )
    results: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    if "B3" in only:
        prof = Path(args.profile) if args.profile else None
        if prof:
            prof.mkdir(parents=True, exist_ok=True)
        ns = tuple(int(x) for x in args.b3_ns.split(","))
        results["B3"] = scale.run(mode=args.b3_mode, ns=ns, runs=args.b3_runs, profile_dir=prof)
        rows += results["B3"]["rows"]
    if "T" in only:
        results["transport"] = transport.run()
        rows += results["transport"]["rows"]
    if "B1b" in only:
        results["startup"] = startup.run()
        rows += results["startup"]["rows"]
    if only & {"B1", "B1b", "B2", "B4", "B5", "B6"} and not args.no_lab:
        mutate = not args.no_mutate and bool(only & {"B4", "B5", "B6"})
        res = lab.run(setup=args.setup_lab, runs=args.runs, mutate=mutate, only=only)
        results["lab"] = res
        if "skipped" in res:
            rows.append(
                {
                    "name": "B1, B1b, B2 (lab), B4, B5, B6",
                    "figure": "-",
                    "target": "-",
                    "ok": None,
                    "verdict": lab.SKIP_MSG,
                }
            )
        for name in ("B2", "B1b", "B1", "B4", "B5", "B6"):
            rows += res.get(name, {}).get("rows", [])
    if args.no_lab and only & {"B1", "B1b", "B2", "B4", "B5", "B6"}:
        results["lab"] = {"skipped": "not run (--no-lab)"}
        rows.append(
            {
                "name": "B1, B1b, B2 (lab), B4, B5, B6",
                "figure": "-",
                "target": "-",
                "ok": None,
                "verdict": "not run (--no-lab)",
            }
        )
    print("\nSummary")
    for r in rows:
        print(fmt(r))
    data = {
        "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": ["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])],
        "duration_s": round(time.perf_counter() - started, 1),
        "machine": machine,
        "rows": rows,
        "results": results,
    }
    if not args.no_write:
        report.write_json(data)
        report.write_page(data)
        print(
            f"\nwrote {report.RESULTS.relative_to(REPO)} and "
            f"{report.PAGE.relative_to(REPO)} ({data['duration_s']} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
