"""B6: migration policies under load (issue 18). One guest that dirties memory faster than a
capped link carries it, moved back and forth between kvm-1 and kvm-2: plain ``virsh migrate
--live --persistent --undefinesource --bandwidth`` (libvirt's default downtime, 300 ms), then
``kvmstate apply`` with each policy (downtime steps, auto-converge, post-copy), the same cap,
the same timeout.

Per variant: finished within the timeout or not, wall time (the whole ``virsh`` / ``kvmstate
apply`` process), downtime, iterations and data sent (libvirt's job statistics: the completed
job on the destination, or the last sample of the running job on the source), and the guest's
dirty rate as QEMU measured it just before (``calc-dirty-rate``, page-sampling) and during the
job (``jobStats`` memory_dirty_rate: pages dirtied per sync period, which a capped link makes
read about the link's rate once the guest's working set is dirty again within one period).

The guest (``b6-guest``, its own volume) is created on kvm-1 beside ``lab-guest`` and removed
at the end: ``specs/lab.yaml`` plans clean again.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import KVMSTATE, row

GUEST = "b6-guest"
DIRTY_MIB = 12  # MiB of distinct pages per second (the lab guest's kvmstate.dirty=)
LINK_MIB = 8  # the migration bandwidth cap, MiB/s
TIMEOUT_S = 120  # every variant's limit: virsh is stopped and its job aborted after it
INITRD = "/var/lib/kvmstate-lab/guest/disk-initrd.img"

POLICIES: dict[str, dict[str, Any]] = {
    "kvmstate: downtime steps": {
        "max_downtime": "300ms",
        "downtime_steps": [
            {"after": "15s", "max_downtime": "1s"},
            {"after": "30s", "max_downtime": "4s"},
        ],
    },
    "kvmstate: auto-converge": {"auto_converge": True},
    "kvmstate: post-copy": {"postcopy": "15s"},
}


def _spec(
    base: Path, tmp: Path, name: str, host: str, policy: dict[str, Any], absent: bool
) -> Path:
    s = yaml.safe_load(base.read_text())
    vol = {**s["volumes"]["lab-guest.qcow2"]}
    dom = json.loads(json.dumps(s["domains"]["lab-guest"]))
    dom["boot"] = {
        **dom["boot"],
        "initrd": INITRD,
        "cmdline": f"console=ttyS0 kvmstate.dirty={DIRTY_MIB}",
    }
    dom["disks"] = [{**dom["disks"][0], "volume": f"{GUEST}.qcow2"}]
    dom["serial"] = {"type": "file", "path": f"/var/log/libvirt/qemu/{GUEST}.serial.log"}
    dom["host"] = host
    dom["migration"] = {"bandwidth": f"{LINK_MIB}MiB", "timeout": f"{TIMEOUT_S}s", **policy}
    if absent:
        vol.update(state="absent", force_destroy=True)
        dom = {**dom, "state": "absent", "force_destroy": True}
    s["volumes"][f"{GUEST}.qcow2"] = vol
    s["domains"][GUEST] = dom
    path = tmp / f"b6-{name}.yaml"
    path.write_text(yaml.safe_dump(s, sort_keys=False))
    return path


def _lab() -> Any:
    from kvmstate.lab.lab import Lab

    return Lab()


def _running_on(lab: Any) -> str | None:
    from kvmstate.lab.virt import connect, lookup_domain

    for h in lab.cfg.kvm:
        with connect(lab.cfg.libvirt_uri(h)) as conn:
            dom = lookup_domain(conn, GUEST)
            if dom is not None and dom.isActive():
                return str(h.name)
    return None


def _counter(lab: Any, above: int = 0, timeout: float = 60) -> tuple[int, str | None]:
    """The guest's counter once it passes ``above`` (a hang guard, not a measurement)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            r = lab.guest_reading(GUEST)
            if r.value > above:
                return r.value, r.boot
        if time.monotonic() > deadline:
            raise RuntimeError(f"{GUEST}'s counter did not pass {above}")
        time.sleep(0.5)


def _abort_and_wait(lab: Any, host: str) -> None:
    """Abort the job virsh left behind (killing virsh is not enough) and wait for it to end."""
    from kvmstate.lab.virt import connect, lookup_domain

    libvirt = __import__("libvirt")
    with connect(lab.cfg.libvirt_uri(lab.cfg.host(host))) as conn:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            dom = lookup_domain(conn, GUEST)
            if dom is None:
                return
            if dom.jobStats(0).get("type", 0) == libvirt.VIR_DOMAIN_JOB_NONE:
                return
            with contextlib.suppress(libvirt.libvirtError):
                dom.abortJob()
            time.sleep(0.5)
    raise RuntimeError(f"the migration job of {GUEST} on {host} did not end")


def _virsh(lab: Any, src: str, dst: str) -> tuple[float, bool, str]:
    argv = [
        "virsh",
        "-c",
        lab.cfg.ssh_uri(lab.cfg.host(src)),
        "migrate",
        "--live",
        "--persistent",
        "--undefinesource",
        "--bandwidth",
        str(LINK_MIB),
        GUEST,
        lab.cfg.ssh_uri(lab.cfg.host(dst)),
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=TIMEOUT_S)
        return time.perf_counter() - t0, proc.returncode == 0, err[-500:]
    except subprocess.TimeoutExpired:
        wall = time.perf_counter() - t0
        proc.kill()
        proc.communicate()
        _abort_and_wait(lab, src)
        return wall, False, f"not finished after {TIMEOUT_S} s: stopped, job aborted"


def _kvmstate(spec: Path) -> tuple[float, bool, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [KVMSTATE, "apply", str(spec), "--auto-approve"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S + 180,  # a hang guard: kvmstate aborts at the policy's timeout
    )
    out = (proc.stdout + proc.stderr).strip().splitlines()
    return time.perf_counter() - t0, proc.returncode == 0, " | ".join(out[-3:])[-500:]


def _variant(lab: Any, name: str, run: Any, src: str, dst: str) -> dict[str, Any]:
    from kvmstate.lab.migwatch import MigrationWatcher, completed_job, dirty_rate

    uris = {h.name: lab.cfg.libvirt_uri(h) for h in lab.cfg.kvm}
    before, boot = _counter(lab)
    qemu_rate = dirty_rate(uris[src], GUEST)
    with MigrationWatcher(uris, src, GUEST, interval=0.5, qmp=False) as w:
        wall, ok, detail = run()
    now = _running_on(lab)
    finished = ok and now == dst
    after, boot_after = _counter(lab, above=before)
    done = completed_job(uris[dst], GUEST) if finished else {}
    watch = w.watch
    last = watch.copying()[-1] if watch.copying() else None
    rates = watch.dirty_rates_mib()
    res = {
        "variant": name,
        "source": src,
        "target": dst,
        "finished": finished,
        "wall_s": round(wall, 2),
        "detail": detail,
        "downtime_ms": done.get("downtime"),
        "iterations": done.get("memory_iteration") or watch.max_iteration() or None,
        "data_mib": round(
            (done.get("data_processed") or (last.data_processed if last else 0) or 0) / 2**20, 1
        ),
        "dirty_rate_qemu_mib_s": qemu_rate,
        "dirty_rate_job_mib_s": round(sorted(rates)[len(rates) // 2], 1) if rates else None,
        "max_throttle": watch.max_throttle(),
        "postcopy": watch.postcopy(src, dst),
        "counter": [before, after],
        "same_boot": boot == boot_after,
        "now_on": now,
    }
    print(f"  B6 {name}: {json.dumps(res)}")
    return res


def _figure(r: dict[str, Any]) -> str:
    parts = [f"{'finished' if r['finished'] else 'NOT finished'} in {r['wall_s']:.1f} s"]
    if r["downtime_ms"] is not None:
        parts.append(f"downtime {r['downtime_ms']} ms")
    elif r["postcopy"]:
        parts.append("downtime n/a (post-copy)")
    parts.append(f"{r['iterations']} iterations, {r['data_mib']:.0f} MiB sent")
    if r["max_throttle"]:
        parts.append(f"throttle up to {r['max_throttle']}%")
    parts.append(f"dirty {r['dirty_rate_qemu_mib_s']:.0f} MiB/s")
    if not r["same_boot"]:
        parts.append("GUEST REBOOTED")
    return ", ".join(parts)


def markdown(results: list[dict[str, Any]]) -> list[str]:
    out = [
        "| variant | finished | wall | downtime | iterations | data sent | "
        "dirty rate (calc-dirty-rate / job) | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        dt = (
            f"{r['downtime_ms']} ms"
            if r["downtime_ms"] is not None
            else ("n/a (post-copy)" if r["postcopy"] else "-")
        )
        notes = []
        if r["max_throttle"]:
            notes.append(f"vCPU throttle up to {r['max_throttle']}%")
        if r["postcopy"]:
            notes.append("switched to post-copy")
        notes.append("counter kept, same boot" if r["same_boot"] else "guest rebooted")
        job = f"{r['dirty_rate_job_mib_s']:.0f}" if r["dirty_rate_job_mib_s"] else "-"
        out.append(
            f"| {r['variant']} | {'yes' if r['finished'] else 'no'} | {r['wall_s']:.1f} s | {dt} "
            f"| {r['iterations']} | {r['data_mib']:.0f} MiB "
            f"| {r['dirty_rate_qemu_mib_s']:.0f} / {job} MiB/s | {'; '.join(notes)} |"
        )
    return out


def run(base: Path, tmp: Path) -> dict[str, Any]:
    lab = _lab()
    start = _spec(base, tmp, "start", "kvm-1", {}, absent=False)
    res: dict[str, Any] = {
        "dirty_mib": DIRTY_MIB,
        "link_mib_s": LINK_MIB,
        "timeout_s": TIMEOUT_S,
        "variants": [],
    }
    try:
        proc = subprocess.run(
            [KVMSTATE, "apply", str(start), "--auto-approve"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"creating {GUEST} failed: {proc.stdout[-1500:]}")
        _counter(lab, above=3)  # booted and dirtying
        src = "kvm-1"
        variants: list[tuple[str, Any]] = [
            ("virsh migrate (default downtime)", None),
            *POLICIES.items(),
        ]
        for name, policy in variants:
            dst = "kvm-2" if src == "kvm-1" else "kvm-1"
            if policy is None:
                r = _variant(lab, name, lambda s=src, d=dst: _virsh(lab, s, d), src, dst)
            else:
                spec = _spec(base, tmp, name.split(": ")[-1].replace(" ", "-"), dst, policy, False)
                r = _variant(lab, name, lambda p=spec: _kvmstate(p), src, dst)
            res["variants"].append(r)
            src = r["now_on"] or src
    finally:
        where = _running_on(lab) or "kvm-1"
        cleanup = _spec(base, tmp, "cleanup", where, {}, absent=True)
        subprocess.run(
            [KVMSTATE, "apply", str(cleanup), "--auto-approve", "--allow-destroy"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    vs = res["variants"]
    virsh = vs[0] if vs else None
    rows = []
    for r in vs:
        if r is virsh:
            rows.append(row(f"B6 {r['variant']}", _figure(r), "(baseline: does not finish)", None))
        else:
            ok = r["finished"] and r["same_boot"] and not (virsh or {}).get("finished", True)
            rows.append(row(f"B6 {r['variant']}", _figure(r), "finishes where virsh does not", ok))
    res["rows"] = rows
    print("\n".join(markdown(vs)))
    return res
