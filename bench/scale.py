"""B3 (scale) and B2 on simulated hosts.

For each N: a simulated-hosts process (``bench.simhost``: N asyncssh servers on 127.0.x.y,
20 ms injected per exec round trip) and a generated spec whose observed state is converged;
then no-op plans, each from a NEW process (``bench.planworker``): ``Engine.plan()`` wall time
(connects included), peak RSS, Python heap peak (a separate tracemalloc run), connections and
exec channels per host; and one full ``kvmstate plan`` CLI run.

Two modes:
* ``full`` (default when a private libvirtd can run): KVM hosts also have a dir pool, a volume
  and a shut-off domain; their libvirt RPC goes through the forwarded Unix socket of each
  host's SSH connection to ONE real libvirtd the bench starts in a private namespace. (A real
  cluster has one libvirtd per host; here one daemon serves them all, so this is pessimistic.)
* ``shell``: only the shell-observed kinds (subvolume, export, mount).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import libvirtd as lvd
from bench.common import KVMSTATE, PY, child, fmt, median, proc_cpu, row, timed_run
from bench.simhost import layout, spec_dict

NS = (10, 50, 200)
TARGET_200 = 2.0  # seconds
FLAT_RATIO = 2.0  # wall(200) / wall(10) ≤ this counts as "nearly flat" (20x the hosts)
RUNS = 3


def _keys(tmp: Path) -> tuple[str, str]:
    import asyncssh

    key = asyncssh.generate_private_key("ssh-ed25519")
    ident = tmp / "id_ed25519"
    key.write_private_key(str(ident))
    ident.chmod(0o600)
    pub = tmp / "id_ed25519.pub"
    key.write_public_key(str(pub))
    return str(ident), str(pub)


def _worker(spec: Path, *extra: str) -> dict[str, Any]:
    wall, proc = timed_run([PY, "-m", "bench.planworker", str(spec), *extra], timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"planworker failed: {proc.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall"] = wall
    return out


def _per_host(stats: dict[str, dict[str, float]]) -> dict[str, float]:
    conns = [s["connections"] for s in stats.values()]
    chans = [s["channels"] for s in stats.values()]
    libv = [s.get("libvirt_calls", 0) for s in stats.values()]
    return {
        "hosts_contacted": len(stats),
        "connections_max": max(conns, default=0),
        "connections_mean": sum(conns) / max(len(conns), 1),
        "channels_max": max(chans, default=0),
        "channels_mean": sum(chans) / max(len(chans), 1),
        "libvirt_calls_mean": sum(libv) / max(len(libv), 1),
    }


@dataclass
class _Setup:
    tmp: Path
    runs: int
    ident: str
    pub: str
    ssh_config: Path
    pool_dir: str | None = None
    sock: str | None = None
    lv_pid: int | None = None
    profile_dir: Path | None = None
    what_if_n: int | None = None


# Suggested kvmstate changes, simulated by bench.planworker --what-if (see the report).
WHAT_IFS = ("known-hosts-cache", "aes-gcm", "known-hosts-cache,aes-gcm")


def run(
    *,
    mode: str = "auto",
    ns: tuple[int, ...] = NS,
    runs: int = RUNS,
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    why_not = lvd.available()
    if mode == "auto":
        mode = "full" if why_not is None else "shell"
    if mode == "full" and why_not:
        raise RuntimeError(f"B3 full mode: {why_not}")
    print(f"B3 scale: simulated hosts on loopback, 20 ms per exec round trip, mode={mode}")
    if mode == "shell":
        print(f"  (shell-only kinds: subvolume, export, mount; libvirt unavailable: {why_not})")
    result: dict[str, Any] = {"mode": mode, "delay_s": 0.02, "runs_per_n": runs, "by_n": {}}
    with tempfile.TemporaryDirectory(prefix="kvmstate-bench-b3-") as td:
        tmp = Path(td)
        ident, pub = _keys(tmp)
        ssh_config = tmp / "ssh_config"
        ssh_config.write_text("")
        setup = _Setup(
            tmp, runs, ident, pub, ssh_config, profile_dir=profile_dir, what_if_n=max(ns)
        )
        if mode == "full":
            setup.pool_dir = str(tmp / "pools")
            with lvd.private_libvirtd(tmp / "libvirtd") as (setup.sock, setup.lv_pid):
                for n in ns:
                    result["by_n"][str(n)] = _one_n(setup, n)
        else:
            for n in ns:
                result["by_n"][str(n)] = _one_n(setup, n)
    _verdicts(result)
    return result


def _one_n(st: _Setup, n: int) -> dict[str, Any]:
    tmp, runs, pool_dir, sock, lv_pid, profile_dir = (
        st.tmp,
        st.runs,
        st.pool_dir,
        st.sock,
        st.lv_pid,
        st.profile_dir,
    )
    ports_file = tmp / f"ports-{n}.json"
    argv = [PY, "-m", "bench.simhost", "--n", str(n), "--out", str(ports_file)]
    argv += ["--authorized", st.pub]
    if pool_dir and sock:
        argv += ["--pool-dir", pool_dir, "--libvirt-socket", sock]
    log = tmp / f"simhost-{n}.log"
    with child(argv, log=log) as sim:
        deadline = time.monotonic() + 60
        while not ports_file.exists():
            if sim.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"simhost did not start: {log.read_text()[-1500:]}")
            time.sleep(0.05)
        info = json.loads(ports_file.read_text())
        known = tmp / f"known_hosts-{n}"
        known.write_text(info["known_hosts"])
        hosts = layout(n, pool_dir)
        for h in hosts:
            h.port = info["ports"][h.name]
        data = spec_dict(
            hosts,
            identity=st.ident,
            known_hosts=str(known),
            ssh_config=str(st.ssh_config),
            libvirt=pool_dir is not None,
        )
        spec_path = tmp / f"spec-{n}.yaml"
        spec_path.write_text(yaml.safe_dump(data, sort_keys=False))
        if sock:
            from kvmstate.loader import load_spec

            t0 = time.perf_counter()
            counts = lvd.preload(sock, load_spec(spec_path).spec)
            print(f"  N={n}: libvirtd preloaded {counts} in {time.perf_counter() - t0:.1f}s")
        timing = []
        for _ in range(runs):
            sim0, lv0 = proc_cpu(sim.pid), proc_cpu(lv_pid)
            t = _worker(spec_path)
            t["sim_cpu"] = proc_cpu(sim.pid) - sim0
            t["libvirtd_cpu"] = proc_cpu(lv_pid) - lv0
            timing.append(t)
        warm = _worker(spec_path, "--warm")
        heap = _worker(spec_path, "--tracemalloc")
        if profile_dir is not None:
            _worker(spec_path, "--profile", str(profile_dir / f"plan-{n}.prof"))
            cli = ["-m", "kvmstate.cli", "plan", str(spec_path)]
            prof = str(profile_dir / f"cli-{n}.prof")
            timed_run([PY, "-m", "cProfile", "-o", prof, *cli], timeout=120)
            _, it = timed_run([PY, "-X", "importtime", *cli], timeout=120)
            (profile_dir / f"cli-{n}.importtime.txt").write_text(it.stderr)
        what_ifs: dict[str, dict[str, float]] = {}
        if n == st.what_if_n:
            # interleaved with baseline runs, so drifting machine load hits all alike
            samples: dict[str, list[dict[str, Any]]] = {v: [] for v in ("baseline", *WHAT_IFS)}
            for _ in range(runs):
                for variant in samples:
                    extra = () if variant == "baseline" else ("--what-if", variant)
                    samples[variant].append(_worker(spec_path, *extra))
            for variant, got in samples.items():
                what_ifs[variant] = {
                    "plan_wall_median": median([g["plan_wall"] for g in got]),
                    "plan_cpu_median": median([g["plan_cpu"] for g in got]),
                }
        phases: dict[str, dict[str, float]] = {}
        if n == st.what_if_n and sock:
            _, proc = timed_run([PY, "-m", "bench.phases", str(spec_path)], timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"bench.phases failed: {proc.stderr[-2000:]}")
            phases = json.loads(proc.stdout.strip().splitlines()[-1])
        cli_walls = []
        cli_rc = None
        for _ in range(max(1, runs - 1)):
            w, proc = timed_run([KVMSTATE, "plan", str(spec_path)], timeout=120)
            cli_walls.append(w)
            cli_rc = proc.returncode
            if proc.returncode != 0:
                print(f"  N={n}: kvmstate plan exit {proc.returncode}: {proc.stdout[-800:]}")
        sim.send_signal(subprocess.signal.SIGTERM)  # type: ignore[attr-defined]
        sim.wait(timeout=10)
    server = {}
    with contextlib.suppress(ValueError, IndexError):
        server = json.loads(log.read_text().strip().splitlines()[-1])
    first = timing[0]
    walls = [t["plan_wall"] for t in timing]
    res: dict[str, Any] = {
        "hosts": n,
        "resources": first["resources"],
        "noop": first["noop"],
        "n_changes": first["n_changes"],
        "n_errors": first["n_errors"],
        "errors_sample": first["errors"],
        "changes_sample": first["changes"],
        "plan_wall_runs": walls,
        "plan_wall_median": median(walls),
        "plan_wall_min": min(walls),
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "warm_wall": warm["warm_wall"],
        "plan_cpu_median": median([t["plan_cpu"] for t in timing]),
        "sim_server_cpu_median": median([t["sim_cpu"] for t in timing]),
        "libvirtd_cpu_median": median([t["libvirtd_cpu"] for t in timing]),
        "process_wall_median": median([t["process_wall"] for t in timing]),
        "cli_plan_wall_median": median(cli_walls),
        "cli_plan_exit": cli_rc,
        "import_s": median([t["import"] for t in timing]),
        "load_graph_s": median([t["load"] for t in timing]),
        "rss_before_plan": first["rss_before"],
        "rss_peak": max(t["rss_after"] for t in timing),
        "rss_growth": median([t["rss_after"] - t["rss_before"] for t in timing]),
        "heap_peak": heap.get("heap_peak"),
        "per_host": _per_host(first["detail"]),
        "server_counters_all_runs": server,
        "what_if": what_ifs,
        "phases": phases,
    }
    ph = res["per_host"]
    print(
        f"  N={n:<4} plan {res['plan_wall_median']:.3f}s (runs "
        f"{', '.join(f'{w:.2f}' for w in walls)}), warm pass {res['warm_wall']:.3f}s, "
        f"CPU: client {res['plan_cpu_median']:.2f}s, sim servers "
        f"{res['sim_server_cpu_median']:.2f}s, libvirtd {res['libvirtd_cpu_median']:.2f}s; "
        f"process {res['process_wall_median']:.2f}s, CLI {res['cli_plan_wall_median']:.2f}s "
        f"(exit {cli_rc}); {res['noop']}/{res['resources']} no-op, {res['n_errors']} errors; "
        f"RSS +{res['rss_growth'] / 2**20:.1f} MiB (peak {res['rss_peak'] / 2**20:.0f} MiB), "
        f"heap peak {(res['heap_peak'] or 0) / 2**20:.1f} MiB; per host: "
        f"{ph['connections_max']:.0f} conn, {ph['channels_max']:.0f} exec, "
        f"{ph['libvirt_calls_mean']:.1f} libvirt calls"
    )
    for variant, w in what_ifs.items():
        print(
            f"    what if [{variant}]: plan {w['plan_wall_median']:.3f}s, "
            f"client CPU {w['plan_cpu_median']:.2f}s"
        )
    for name, ph_ in phases.items():
        print(
            f"    phase {name:<28} client CPU {ph_['cpu_ms_per_host']:.2f} ms/host "
            f"({ph_['cpu_s']:.2f} s over {ph_['hosts']:.0f} hosts), wall {ph_['wall_s']:.2f} s"
        )
    if res["n_errors"] or res["n_changes"]:
        print(f"    not converged! errors {res['errors_sample']} changes {res['changes_sample']}")
    return res


def _verdicts(result: dict[str, Any]) -> None:
    by = result["by_n"]
    lines = []
    checks: dict[str, Any] = {}
    converged = all(r["n_errors"] == 0 and r["n_changes"] == 0 for r in by.values())
    checks["converged_noop"] = converged
    if "200" in by:
        w = by["200"]["plan_wall_median"]
        checks["plan_200_s"] = w
        checks["plan_200_ok"] = converged and w < TARGET_200
        lines.append(
            row(
                "B3 plan wall, 200 hosts",
                f"{w:.3f} s",
                f"< {TARGET_200:g} s",
                checks["plan_200_ok"],
            )
        )
        cli = by["200"]["cli_plan_wall_median"]
        checks["cli_200_s"] = cli
        lines.append(
            row(
                "B3 `kvmstate plan` whole process, 200 hosts",
                f"{cli:.3f} s",
                f"< {TARGET_200:g} s (info: cron's view)",
                converged and cli < TARGET_200,
            )
        )
    ns = sorted(int(k) for k in by)
    if len(ns) > 1:
        lo, hi = by[str(ns[0])], by[str(ns[-1])]
        ratio = hi["plan_wall_median"] / lo["plan_wall_median"]
        checks["flat_ratio"] = ratio
        checks["flat_ok"] = ratio <= FLAT_RATIO
        lines.append(
            row(
                f"B3 wall {ns[-1]} vs {ns[0]} hosts ({ns[-1] // ns[0]}x hosts)",
                f"{ratio:.2f}x",
                f"<= {FLAT_RATIO:g}x (nearly flat)",
                checks["flat_ok"],
            )
        )
        # Serial would cost at least the injected 20 ms per host (plus a connect) for every
        # extra host; what each extra host really adds is CPU (SSH handshake, crypto, parse).
        marginal = (hi["plan_wall_median"] - lo["plan_wall_median"]) / (ns[-1] - ns[0])
        checks["marginal_ms_per_host"] = marginal * 1000
        checks["parallel_ok"] = marginal < result["delay_s"]
        lines.append(
            row(
                "B3 wall added per extra host (parallel?)",
                f"{marginal * 1000:.1f} ms/host",
                f"< {result['delay_s'] * 1000:.0f} ms (serial >= delay)",
                checks["parallel_ok"],
            )
        )
        cpu = hi["plan_cpu_median"] / hi["hosts"]
        checks["client_cpu_ms_per_host"] = cpu * 1000
        lines.append(
            row(
                f"B3 client CPU per host @ {ns[-1]}",
                f"{cpu * 1000:.1f} ms/host ({hi['plan_cpu_median']:.2f} s)",
                "(what bounds the wall)",
                None,
            )
        )
        # Two floors under the wall, whatever kvmstate overlaps: its own CPU (one event loop,
        # one core), and all the CPU used (kvmstate, the simulated servers and libvirtd share
        # this machine's cores) over the cores.
        cores = os.cpu_count() or 1
        client = hi["plan_cpu_median"]
        used = client + hi["sim_server_cpu_median"] + hi["libvirtd_cpu_median"]
        checks["cpu_floor_s"] = max(client, used / cores)
        lines.append(
            row(
                f"B3 wall @ {ns[-1]} vs its CPU floors",
                f"{hi['plan_wall_median']:.2f} s vs {client:.2f} s client CPU (one core), "
                f"{used / cores:.2f} s all CPU / {cores} cores ({hi['sim_server_cpu_median']:.2f} "
                f"servers, {hi['libvirtd_cpu_median']:.2f} libvirtd)",
                "(why not flat)",
                None,
            )
        )
        phases = hi.get("phases") or {}
        if phases:
            short = {
                "ssh connect": "ssh",
                "exec (1 batch)": "exec",
                "libvirt open": "libvirt open",
                "observe pool+volume+domain": "observe",
                "1 libvirt call": "(1 call",
                "close": "close",
            }
            parts = [
                f"{short.get(k, k)} {v['cpu_ms_per_host']:.2f}"
                + (")" if k == "1 libvirt call" else "")
                for k, v in phases.items()
            ]
            lines.append(
                row(
                    f"B3 client CPU by phase @ {ns[-1]}, ms/host",
                    ", ".join(parts),
                    "(what dominates)",
                    None,
                )
            )
        wi = hi.get("what_if") or {}
        base = wi.get("baseline")
        for variant, w in wi.items():
            if variant == "baseline" or base is None:
                continue
            lines.append(
                row(
                    f"B3 @ {ns[-1]} what-if [{variant}]",
                    f"{w['plan_wall_median']:.2f} s, CPU {w['plan_cpu_median']:.2f} s "
                    f"(vs {base['plan_wall_median']:.2f} s, {base['plan_cpu_median']:.2f} s)",
                    "(suggestion, simulated)",
                    None,
                )
            )
        growth = [(by[str(n)]["heap_peak"] or 0) for n in ns]
        per_host = (growth[-1] - growth[0]) / (ns[-1] - ns[0])
        checks["heap_per_host_bytes"] = per_host
        checks["heap_ok"] = per_host < 1024 * 1024 and growth[-1] < 256 * 2**20
        lines.append(
            row(
                "B3 heap peak per extra host",
                f"{per_host / 1024:.0f} KiB/host ({growth[-1] / 2**20:.0f} MiB @ {ns[-1]})",
                "linear, < 1 MiB/host",
                checks["heap_ok"],
            )
        )
    for n in ns:
        ph = by[str(n)]["per_host"]
        ok = ph["connections_max"] <= 1 and ph["channels_max"] <= 2
        checks[f"b2_sim_{n}_ok"] = ok
        lines.append(
            row(
                f"B2 (simulated, N={n}) per host conn/exec",
                f"{ph['connections_max']:.0f} conn, {ph['channels_max']:.0f} exec (max)",
                "1 conn, <= 2 round trips",
                ok,
            )
        )
    result["checks"] = checks
    result["rows"] = lines
    for ln in lines:
        print(fmt(ln))
