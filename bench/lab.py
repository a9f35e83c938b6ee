"""Benchmarks on the real 3-host lab: B1 (vs Ansible), B1b (physical limit), B2 (round trips),
B4 (migration vs virsh), B5 (evacuation), B6 (migration policies under load, bench/b6.py).

They run only when the lab is up and converged (``kvmstate plan specs/lab.yaml`` exits 0), or
after ``--setup-lab`` (``kvmstate lab up`` + the first apply). B4, B5 and B6 MUTATE the lab (live
migrations, extra guests) and put it back: at the end ``specs/lab.yaml`` plans clean again.
Every run is a NEW process; runs of the compared tools alternate; medians are reported.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from bench import b6
from bench.common import KVMSTATE, PY, REPO, fmt, median, row, timed_run

LAB_DIR = Path("/var/lib/kvmstate-lab")
LAB_SPEC = REPO / "specs" / "lab.yaml"
LAB_MIGRATED = REPO / "specs" / "lab-migrated.yaml"
GUEST = "lab-guest"
SKIP_MSG = "skipped: lab not up/converged; run make demo-style setup"

B1B_TARGET = 1.5
B4_TARGET = 1.15
B5_TARGET = 1.15


# --- the gate ----------------------------------------------------------------------------------


def plan_rc(spec: Path = LAB_SPEC) -> tuple[int, str]:
    try:
        _, proc = timed_run([KVMSTATE, "plan", str(spec)], timeout=120)
    except subprocess.TimeoutExpired:
        return 1, "kvmstate plan timed out"
    return proc.returncode, proc.stdout[-1500:] + proc.stderr[-500:]


def lab_ready() -> tuple[bool, str]:
    """Up and converged: ``kvmstate plan specs/lab.yaml`` exits 0."""
    if not (LAB_DIR / "state.json").exists() or not (LAB_DIR / "pids.json").exists():
        return False, "the lab is not up (no /var/lib/kvmstate-lab/state.json)"
    rc, out = plan_rc()
    if rc != 0:
        return False, f"kvmstate plan specs/lab.yaml exited {rc}:\n{out.strip()}"
    return True, "converged"


def setup_lab() -> dict[str, Any]:
    """``kvmstate lab up`` (tears down a previous lab first), then the first apply, measured
    through the engine (B2 for an apply), then the CLI apply (a no-op by then)."""
    print("setup: kvmstate lab up")
    w, proc = timed_run([KVMSTATE, "lab", "up"], timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"kvmstate lab up failed: {proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    print(f"setup: lab up in {w:.1f}s; first apply of specs/lab.yaml")
    first = _worker(LAB_SPEC, "--apply", timeout=600)
    w2, proc = timed_run([KVMSTATE, "apply", str(LAB_SPEC), "--auto-approve"], timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"kvmstate apply failed: {proc.stdout[-2000:]}")
    print(f"setup: first apply {first.get('apply_wall', 0):.1f}s, CLI re-apply {w2:.1f}s")
    return {"lab_up_s": w, "first_apply": first}


# --- helpers -----------------------------------------------------------------------------------


def _worker(spec: Path, *extra: str, timeout: float = 300) -> dict[str, Any]:
    wall, proc = timed_run([PY, "-m", "bench.planworker", str(spec), *extra], timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"planworker failed: {proc.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall"] = wall
    return out


def _kvmstate_plan() -> float:
    w, proc = timed_run([KVMSTATE, "plan", str(LAB_SPEC)], timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"kvmstate plan exited {proc.returncode}: {proc.stdout[-1000:]}")
    return w


def _per_host(detail: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {h: dict(s) for h, s in detail.items()}


# --- B2 ----------------------------------------------------------------------------------------


def b2(first_apply: dict[str, Any] | None) -> dict[str, Any]:
    w = _worker(LAB_SPEC)
    plan_hosts = _per_host(w["detail"])
    ok = all(s["connections"] <= 1 and s["channels"] <= 2 for s in plan_hosts.values())
    res: dict[str, Any] = {"noop_plan": plan_hosts, "noop_plan_ok": ok}
    res["rows"] = [
        row(
            "B2 lab no-op plan, per host",
            f"max {max(s['connections'] for s in plan_hosts.values()):.0f} conn, "
            f"{max(s['channels'] for s in plan_hosts.values()):.0f} exec",
            "1 conn, <= 2 round trips",
            ok,
        )
    ]
    if first_apply:
        ap = _per_host(first_apply["detail"])
        res["first_apply"] = ap
        res["first_apply_converged"] = first_apply.get("apply_converged")
        res["rows"].append(
            row(
                "B2 lab first apply, per host",
                ", ".join(
                    f"{h}: {s['connections']:.0f}c/{s['channels']:.0f}x/{s['libvirt_calls']:.0f}lv"
                    for h, s in ap.items()
                ),
                "(reported)",
                None,
            )
        )
    else:
        res["rows"].append(row("B2 lab first apply", "not measured", "needs --setup-lab", None))
    for h, s in plan_hosts.items():
        print(
            f"  B2 {h}: {s['connections']:.0f} connection(s), {s['channels']:.0f} exec channel(s), "
            f"{s['forwards']:.0f} forward(s), {s['libvirt_calls']:.0f} libvirt calls, "
            f"connect {s['connect_seconds'] * 1000:.0f} ms"
        )
    return res


# --- B1b ---------------------------------------------------------------------------------------


def minimal_job(spec_path: Path = LAB_SPEC) -> dict[str, Any]:
    """What a no-op plan reads, per host, taken from kvmstate's own graph (no I/O)."""
    from kvmstate.engine.graph import build_graph
    from kvmstate.loader import load_spec
    from kvmstate.resources import KINDS

    loaded = load_spec(spec_path)
    spec = loaded.spec
    graph = build_graph(spec, KINDS, path=loaded.path, lines=loaded.lines)
    hosts: dict[str, dict[str, Any]] = {
        h: {"name": h, "address": spec.hosts[h].address, "argvs": [], "libvirt": {}}
        for h in spec.hosts
    }
    for rid in graph.order():
        r: Any = graph[rid]
        for h, fact in r.facts():
            if list(fact.argv) not in hosts[h]["argvs"]:
                hosts[h]["argvs"].append(list(fact.argv))
        lv = None
        if r.kind == "pool":
            lv = hosts[r.h]["libvirt"].setdefault("pools", [])
            lv.append(r.name)
        elif r.kind == "volume":
            hosts[r.h]["libvirt"].setdefault("volumes", []).append([r.v.pool, r.name])
        elif r.kind == "domain":
            for h in r.hosts():
                hosts[h]["libvirt"].setdefault("domains", []).append(r.name)
    first = next(iter(spec.hosts))
    s = spec.ssh_for(first)
    return {
        "identity": (s.identity or ("",))[0],
        "known_hosts": s.known_hosts,
        "hosts": list(hosts.values()),
    }


def b1b(tmp: Path, runs: int) -> dict[str, Any]:
    job = tmp / "minimal-job.json"
    job.write_text(json.dumps(minimal_job()))
    mins, plans = [], []
    for _ in range(runs):
        w, proc = timed_run([PY, "-m", "bench.minimal", str(job)], timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"minimal script failed: {proc.stderr[-1500:]}")
        mins.append(w)
        plans.append(_kvmstate_plan())
    m, p = median(mins), median(plans)
    ratio = p / m
    print(f"  B1b minimal script runs: {', '.join(f'{x:.3f}' for x in mins)}")
    print(f"  B1b kvmstate plan runs:  {', '.join(f'{x:.3f}' for x in plans)}")
    return {
        "minimal_runs": mins,
        "kvmstate_plan_runs": plans,
        "minimal_median": m,
        "kvmstate_plan_median": p,
        "ratio": ratio,
        "ok": ratio <= B1B_TARGET,
        "rows": [
            row("B1b minimal script (new process)", f"{m:.3f} s", "(the physical limit)", None),
            row(
                "B1b kvmstate plan / minimal",
                f"{p:.3f} s = {ratio:.2f}x",
                f"<= {B1B_TARGET:g}x",
                ratio <= B1B_TARGET,
            ),
        ],
    }


# --- B1 ----------------------------------------------------------------------------------------

PLAYBOOK = """\
# The same checks as a no-op `kvmstate plan specs/lab.yaml`, run with --check.
- name: storage
  hosts: storagehosts
  gather_facts: {facts}
  tasks:
    - name: btrfs subvolume images exists
      community.general.btrfs_subvolume:
        name: /images
        filesystem_label: kvmstate-lab
        state: present
    - name: subvolume mounted on /srv/images and in fstab
      ansible.posix.mount:
        path: /srv/images
        src: LABEL=kvmstate-lab
        fstype: btrfs
        opts: subvol=images,defaults,noatime
        state: mounted
    - name: export line in /etc/exports
      ansible.builtin.lineinfile:
        path: /etc/exports
        line: /srv/images 10.77.0.0/24(rw,sync,no_root_squash,no_subtree_check)
    - name: live export table
      ansible.builtin.command: exportfs -v
      check_mode: false
      changed_when: false
      register: exportfs
    - name: exported to 10.77.0.0/24
      ansible.builtin.assert:
        that: "'10.77.0.0/24' in exportfs.stdout"
        quiet: true

- name: kvm hosts
  hosts: kvm
  gather_facts: {facts}
  tasks:
    - name: NFS mount of the images export
      ansible.posix.mount:
        path: /var/lib/libvirt/images
        src: 10.77.0.10:/srv/images
        fstype: nfs
        opts: vers=3,nolock,_netdev
        state: mounted
    - name: pool images defined
      community.libvirt.virt_pool:
        name: images
        command: define
        xml: >-
          <pool type='dir'><name>images</name>
          <target><path>/var/lib/libvirt/images</path></target></pool>
    - name: pool images active
      community.libvirt.virt_pool:
        name: images
        state: active
    - name: pool images autostart
      community.libvirt.virt_pool:
        name: images
        autostart: true
    - name: volume lab-guest.qcow2
      ansible.builtin.command: virsh -q vol-info --pool images lab-guest.qcow2
      check_mode: false
      changed_when: false
      when: inventory_hostname == 'kvm-1'
    - name: domain lab-guest running on kvm-1
      community.libvirt.virt:
        name: lab-guest
        state: running
      when: inventory_hostname == 'kvm-1'
    - name: domain lab-guest not defined elsewhere
      community.libvirt.virt:
        command: list_vms
      register: vms
      when: inventory_hostname != 'kvm-1'
    - name: (kvmstate refuses a domain defined on two hosts)
      ansible.builtin.assert:
        that: "'lab-guest' not in vms.list_vms"
        quiet: true
      when: inventory_hostname != 'kvm-1'
"""

ANSIBLE_CFG = """\
[defaults]
inventory = {inventory}
host_key_checking = True
forks = 10
interpreter_python = {python}
local_tmp = {tmp}/local
retry_files_enabled = False
stdout_callback = default
{extra_defaults}
[ssh_connection]
ssh_args = -F {ssh_config} {control}
control_path_dir = {cp_dir}
pipelining = {pipelining}
"""


def _ansible_env(tmp: Path, variant: str) -> tuple[dict[str, str], Path]:
    """``default``: facts, no pipelining, ControlPersist (ansible's default 60 s) starting cold.
    ``tuned``: no facts, pipelining, ControlPersist warm (a fixed control dir, warmed first)."""
    d = tmp / f"ansible-{variant}"
    d.mkdir(exist_ok=True)
    (d / "local").mkdir(exist_ok=True)
    inv = d / "inventory.ini"
    inv.write_text(
        "[storagehosts]\nstorage ansible_host=10.77.0.10\n"
        "[kvm]\nkvm-1 ansible_host=10.77.0.11\nkvm-2 ansible_host=10.77.0.12\n"
        "[all:vars]\nansible_user=root\n"
        f"ansible_ssh_private_key_file={LAB_DIR / 'id_ed25519'}\n"
    )
    tuned = variant == "tuned"
    cp_dir = d / "cp"
    cp_dir.mkdir(exist_ok=True)
    control = (
        "-o ControlMaster=auto -o ControlPersist=300s"
        if tuned
        else "-C -o ControlMaster=auto -o ControlPersist=60s"
    )
    cfg = d / "ansible.cfg"
    cfg.write_text(
        ANSIBLE_CFG.format(
            inventory=inv,
            python=REPO / ".venv" / "bin" / "python",  # has libvirt-python + lxml (bench extra)
            tmp=d,
            extra_defaults="gathering = explicit\n" if tuned else "",
            ssh_config=LAB_DIR / "ssh_config",
            control=control,
            cp_dir=cp_dir,
            pipelining="True" if tuned else "False",
        )
    )
    pb = d / "playbook.yml"
    pb.write_text(PLAYBOOK.replace("{facts}", "false" if tuned else "true"))
    env = dict(os.environ, ANSIBLE_CONFIG=str(cfg), ANSIBLE_NOCOLOR="1")
    return env, pb


def _close_control_sockets(cp_dir: Path) -> None:
    """Stop the ControlPersist masters our ansible runs left (by their control socket)."""
    for sock in cp_dir.glob("*"):
        subprocess.run(
            [
                "ssh",
                "-F",
                str(LAB_DIR / "ssh_config"),
                "-o",
                f"ControlPath={sock}",
                "-O",
                "exit",
                "x",
            ],
            capture_output=True,
            timeout=10,
            check=False,
        )


def _recap(out: str) -> dict[str, Any]:
    tot: dict[str, Any] = {"ok": 0, "changed": 0, "unreachable": 0, "failed": 0, "skipped": 0}
    for ln in out.splitlines():
        if ": ok=" in ln:
            for part in ln.split(":", 1)[1].split():
                k, _, v = part.partition("=")
                if k in tot and v.isdigit():
                    tot[k] += int(v)
    return tot


def _ansible_run(env: dict[str, str], pb: Path, cp_dir: Path, cold: bool) -> tuple[float, Any]:
    if cold:
        _close_control_sockets(cp_dir)
    playbook = shutil.which("ansible-playbook", path=str(Path(PY).parent))
    assert playbook
    w, proc = timed_run([playbook, "--check", str(pb)], env=env, timeout=300)
    return w, proc


def b1(tmp: Path, runs: int) -> dict[str, Any]:
    if not shutil.which("ansible-playbook", path=str(Path(PY).parent)):
        return {
            "skipped": "ansible not installed in the venv (pip install ansible lxml)",
            "rows": [row("B1 vs Ansible", "skipped", "ansible not installed", None)],
        }
    variants = {}
    for v in ("default", "tuned"):
        env, pb = _ansible_env(tmp, v)
        variants[v] = (env, pb, tmp / f"ansible-{v}" / "cp")
    try:
        # warm the tuned run's ControlPersist sockets (not measured)
        env, pb, cp = variants["tuned"]
        _ansible_run(env, pb, cp, cold=False)
        times: dict[str, list[float]] = {"kvmstate": [], "default": [], "tuned": []}
        recaps: dict[str, dict[str, Any]] = {}
        for _ in range(runs):
            times["kvmstate"].append(_kvmstate_plan())
            for v, (env, pb, cp) in variants.items():
                w, proc = _ansible_run(env, pb, cp, cold=v == "default")
                times[v].append(w)
                recaps[v] = _recap(proc.stdout)
                if proc.returncode != 0:
                    recaps[v]["rc"] = proc.returncode
                    recaps[v]["tail"] = proc.stdout[-1500:]
    finally:
        for _, _, cp in variants.values():
            _close_control_sockets(cp)
    med = {k: median(v) for k, v in times.items()}
    r_def = med["default"] / med["kvmstate"]
    r_tun = med["tuned"] / med["kvmstate"]
    for k, ts in times.items():
        print(f"  B1 {k:<9} runs: {', '.join(f'{x:.2f}' for x in ts)}")
    for v, rc in recaps.items():
        print(f"  B1 ansible {v} recap (last run): {rc}")
    return {
        "runs": times,
        "median": med,
        "ratio_default": r_def,
        "ratio_tuned": r_tun,
        "recaps": recaps,
        "rows": [
            row(
                "B1 ansible --check default / kvmstate plan",
                f"{med['default']:.2f} s / {med['kvmstate']:.3f} s = {r_def:.1f}x",
                ">= 13x faster",
                r_def >= 13,
            ),
            row(
                "B1 ansible --check tuned / kvmstate plan",
                f"{med['tuned']:.2f} s / {med['kvmstate']:.3f} s = {r_tun:.1f}x",
                "(reported)",
                None,
            ),
        ],
    }


# --- B4 ----------------------------------------------------------------------------------------


def _lab_config() -> Any:
    from kvmstate.lab.config import LabConfig

    return LabConfig.load()


def _where_is_guest(name: str = GUEST) -> str | None:
    import libvirt

    lab = _lab_config()
    for h in lab.kvm:
        conn = libvirt.open(lab.libvirt_uri(h))
        try:
            with contextlib.suppress(libvirt.libvirtError):
                d = conn.lookupByName(name)
                if d.isActive():
                    return str(h.name)
        finally:
            conn.close()
    return None


def _completed_downtime(host: str, name: str = GUEST) -> float | None:
    import libvirt

    lab = _lab_config()
    conn = libvirt.open(lab.libvirt_uri(lab.host(host)))
    try:
        stats = conn.lookupByName(name).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        dt = stats.get("downtime")
        return float(dt) if dt is not None else None
    finally:
        conn.close()


def _kvmstate_apply(spec: Path, *extra: str) -> tuple[float, list[dict[str, Any]]]:
    w, proc = timed_run(
        [KVMSTATE, "apply", str(spec), "--auto-approve", "--json", *extra], timeout=600
    )
    events = []
    for ln in proc.stdout.splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(ln))
    if proc.returncode != 0:
        raise RuntimeError(
            f"kvmstate apply {spec.name} exited {proc.returncode}: {proc.stdout[-2000:]}"
        )
    return w, events


def _virsh_migrate(src: str, dst: str) -> float:
    lab = _lab_config()
    w, proc = timed_run(
        [
            "virsh",
            "-c",
            lab.ssh_uri(lab.host(src)),
            "migrate",
            "--live",
            "--persistent",
            "--undefinesource",
            GUEST,
            lab.ssh_uri(lab.host(dst)),
        ],
        timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"virsh migrate failed: {proc.stderr[-1500:]}")
    return w


def b4(rounds: int) -> dict[str, Any]:
    start = _where_is_guest()
    if start != "kvm-1":
        raise RuntimeError(f"{GUEST} is running on {start}, expected kvm-1")
    ks_w, ks_dt, vs_w, vs_dt = [], [], [], []
    try:
        for _ in range(rounds):
            for spec, dst in ((LAB_MIGRATED, "kvm-2"), (LAB_SPEC, "kvm-1")):
                w, events = _kvmstate_apply(spec)
                done = [e for e in events if e.get("event") == "migration-done"]
                if not done:
                    raise RuntimeError(f"no migration-done event applying {spec.name}")
                ks_w.append(w)
                ks_dt.append(float(done[-1].get("downtime") or float("nan")))
                if _where_is_guest() != dst:
                    raise RuntimeError(f"after kvmstate apply {spec.name}: guest not on {dst}")
            for src, dst in (("kvm-1", "kvm-2"), ("kvm-2", "kvm-1")):
                vs_w.append(_virsh_migrate(src, dst))
                vs_dt.append(_completed_downtime(dst) or float("nan"))
    finally:
        if _where_is_guest() == "kvm-2":  # a failure mid-way: put the guest back with virsh
            with contextlib.suppress(Exception):
                _virsh_migrate("kvm-2", "kvm-1")
    mk, mv = median(ks_w), median(vs_w)
    ratio = mk / mv
    print(f"  B4 kvmstate apply runs: {', '.join(f'{x:.2f}' for x in ks_w)}; downtime ms {ks_dt}")
    print(f"  B4 virsh migrate runs:  {', '.join(f'{x:.2f}' for x in vs_w)}; downtime ms {vs_dt}")
    return {
        "kvmstate_runs": ks_w,
        "kvmstate_downtime_ms": ks_dt,
        "virsh_runs": vs_w,
        "virsh_downtime_ms": vs_dt,
        "kvmstate_median": mk,
        "virsh_median": mv,
        "kvmstate_downtime_median_ms": median(ks_dt),
        "virsh_downtime_median_ms": median(vs_dt),
        "ratio": ratio,
        "ok": ratio <= B4_TARGET,
        "rows": [
            row(
                "B4 migration: kvmstate apply / virsh",
                f"{mk:.2f} s / {mv:.2f} s = {ratio:.2f}x",
                f"<= {B4_TARGET:g}x",
                ratio <= B4_TARGET,
            ),
            row(
                "B4 downtime: kvmstate / virsh (median)",
                f"{median(ks_dt):.0f} ms / {median(vs_dt):.0f} ms",
                "(reported)",
                None,
            ),
        ],
    }


# --- B5 ----------------------------------------------------------------------------------------


def _b5_specs(tmp: Path, extra: int) -> tuple[Path, Path, Path]:
    base = yaml.safe_load(LAB_SPEC.read_text())
    guest = base["domains"][GUEST]
    names = [f"bench-g{i}" for i in range(1, extra + 1)]

    def spec(drain: bool, absent: bool) -> dict[str, Any]:
        s = json.loads(json.dumps(base))
        for n in names:
            vol = {**base["volumes"][f"{GUEST}.qcow2"]}
            dom = json.loads(json.dumps(guest))
            dom["disks"] = [{**dom["disks"][0], "volume": f"{n}.qcow2"}]
            dom["serial"] = {"type": "file", "path": f"/var/log/libvirt/qemu/{n}.serial.log"}
            if absent:
                vol.update(state="absent", force_destroy=True)
                dom = {**dom, "state": "absent", "force_destroy": True}
            s["volumes"][f"{n}.qcow2"] = vol
            s["domains"][n] = dom
        if drain:
            s["hosts"]["kvm-1"]["drain"] = True
            for d in s["domains"].values():
                d["placement"] = {"hosts": ["kvm-1", "kvm-2"], "policy": "preferred"}
        return s

    paths = []
    for name, (drain, absent) in {
        "b5-guests": (False, False),
        "b5-drain": (True, False),
        "b5-cleanup": (False, True),
    }.items():
        p = tmp / f"{name}.yaml"
        p.write_text(yaml.safe_dump(spec(drain, absent), sort_keys=False))
        paths.append(p)
    return paths[0], paths[1], paths[2]


def b5(tmp: Path, single: float | None, extra: int = 2) -> dict[str, Any]:
    guests_spec, drain_spec, cleanup_spec = _b5_specs(tmp, extra)
    n = extra + 1
    res: dict[str, Any] = {"guests": n}
    try:
        w, _ = _kvmstate_apply(guests_spec)
        res["create_guests_s"] = w
        time.sleep(10)  # let the guests finish booting (a booting guest dirties memory fast)
        if single is None:  # one guest there and back, twice, with all the guests running
            singles = []
            for _ in range(2):
                singles.append(_kvmstate_apply(LAB_MIGRATED)[0])
                singles.append(_kvmstate_apply(LAB_SPEC)[0])
            single = median(singles)
            res["single_runs_s"] = singles
        loaded = yaml.safe_load(drain_spec.read_text())
        limits = loaded["hosts"]["kvm-1"].get("migrations", {})
        limit = min(int(limits.get("outgoing", 1)), 2)  # kvm-2 incoming default 2
        walls = []
        for i in range(3):
            w, events = _kvmstate_apply(drain_spec)
            walls.append(w)
            done = [e for e in events if e.get("event") == "migration-done"]
            if i < 2:
                _kvmstate_apply(guests_spec)  # everything back on kvm-1, untimed
        res["evacuation_runs_s"] = walls
        wall = median(walls)
        expected = single * math.ceil(n / limit)
        ratio = wall / expected
        res.update(
            {
                "evacuation_s": wall,
                "migrations": len(done),
                "downtime_ms": [e.get("downtime") for e in done],
                "single_migration_s": single,
                "limit": limit,
                "expected_s": expected,
                "ratio": ratio,
                "ok": ratio <= B5_TARGET and len(done) == n,
            }
        )
        print(
            f"  B5 evacuated {len(done)}/{n} guests from kvm-1 in {wall:.2f}s; one migration "
            f"{single:.2f}s x ceil({n}/{limit}) = {expected:.2f}s"
        )
    finally:
        cw, _ = _kvmstate_apply(cleanup_spec, "--allow-destroy")
        res["cleanup_s"] = cw
        rc, out = plan_rc()
        res["lab_converged_after"] = rc == 0
        if rc != 0:
            print(f"  B5 WARNING: lab not converged after cleanup: {out}")
    nan = float("nan")
    evac, exp_s = res.get("evacuation_s", nan), res.get("expected_s", nan)
    res["rows"] = [
        row(
            f"B5 evacuate {n} guests / (1 migration x ceil(N/limit))",
            f"{evac:.2f} s / {exp_s:.2f} s = {res.get('ratio', nan):.2f}x",
            f"<= {B5_TARGET:g}x",
            res.get("ok"),
        )
    ]
    return res


# --- all ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _tmpdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kvmstate-bench-lab-") as td:
        yield Path(td)


def run(
    *, setup: bool, runs: int = 5, mutate: bool = True, only: set[str] | None = None
) -> dict[str, Any]:
    only = only if only is not None else {"B1", "B1b", "B2", "B4", "B5", "B6"}
    out: dict[str, Any] = {}
    first_apply = None
    if setup:
        s = setup_lab()
        out["setup"] = {"lab_up_s": s["lab_up_s"]}
        first_apply = s["first_apply"]
    ok, why = lab_ready()
    if not ok:
        print(f"B1/B1b/B2/B4/B5 {SKIP_MSG}")
        for ln in why.strip().splitlines()[:4]:
            print(f"  | {ln}")
        return {"skipped": SKIP_MSG, "why": why}
    with _tmpdir() as tmp:
        steps: list[tuple[str, Any]] = [
            ("B2", lambda: b2(first_apply)),
            ("B1b", lambda: b1b(tmp, runs)),
            ("B1", lambda: b1(tmp, max(3, runs - 2))),
            ("B4", lambda: b4(rounds=5)),
            # one migration measured with the same guests running as the evacuation (on 2
            # cores, three TCG guests slow every migration down): like for like
            ("B5", lambda: b5(tmp, None)),
            ("B6", lambda: b6.run(LAB_SPEC, tmp)),
        ]
        for name, fn in steps:
            if name not in only or (name in ("B4", "B5", "B6") and not mutate):
                continue
            print(f"{name} on the lab")
            try:
                out[name] = fn()
            except Exception as e:  # noqa: BLE001 - one benchmark failing does not stop the rest
                print(f"  {name} FAILED: {e}")
                out[name] = {"error": str(e), "rows": [row(name, "failed", str(e)[:60], False)]}
            for ln in out[name].get("rows", []):
                print(fmt(ln))
    return out
