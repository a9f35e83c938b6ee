"""Does the shared storage enforce locks between hosts? Asked once per pool per plan, for the
pools of HA domains.

QEMU locks its disk images (OFD byte-range locks), so a second QEMU on another host is
refused the same image, but only when the shared filesystem carries locks between clients:
NFSv4 does, NFSv3 with NLM does, ``nolock`` does not (locks stay on each client), and a FUSE
client may not. The probe: host A takes ``flock`` on ``POOL/.kvmstate-lockprobe`` and holds
it; host B tries the same file without waiting. Refused = enforced. (Linux NFS clients carry
``flock`` as a whole-file byte-range lock: the kind QEMU's image locks are.) Nothing from the
spec is spliced into the scripts: the path is ``$1``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from kvmstate.errors import KvmstateError
from kvmstate.resources.base import RunContext

PROBE_FILE = ".kvmstate-lockprobe"
HOLD_SCRIPT = 'exec 9>>"$1" || exit 3; flock -n 9 || exit 75; echo HELD; exec cat >/dev/null'
TRY_SCRIPT = 'exec 9>>"$1" || exit 3; flock -n -E 75 9; echo "rc=$?"'


@dataclass(frozen=True)
class LockProbe:
    enforced: bool | None  # None: could not tell
    detail: str


async def probe(ctx: RunContext, path: str, a: str, b: str) -> LockProbe:
    """Take the lock on ``a``, try it from ``b``."""
    target = f"{path.rstrip('/')}/{PROBE_FILE}"
    holder = await ctx.shell(a).start(["sh", "-c", HOLD_SCRIPT, "kvmstate-lockprobe", target])
    try:
        first = (await holder.readline()).strip()
        if first != "HELD":
            done = await holder.finish()
            return LockProbe(
                None, f"{a} could not lock {target} (exit {done.exit_status}): not probed"
            )
        res = await ctx.shell(b).run(
            ["sh", "-c", TRY_SCRIPT, "kvmstate-lockprobe", target], check=False
        )
    finally:
        await holder.close()
    out = res.stdout.strip()
    if out == "rc=75":
        return LockProbe(True, f"{b} was refused the lock {a} held on {target}")
    if out == "rc=0":
        return LockProbe(
            False,
            f"{b} took the lock {a} held on {target}: locks are not enforced between hosts "
            "(nolock, NFSv3 without lockd, or a client that keeps locks local); a second "
            "QEMU on another host would not be refused",
        )
    return LockProbe(None, f"{b} could not try the lock on {target}: {res.stderr.strip() or out}")


async def pool_locks(ctx: RunContext, pool: str) -> LockProbe:
    """The probe of ``pool`` (its path on its first two hosts that answer), once per run."""
    cache: dict[str, asyncio.Future[LockProbe]] = ctx.scratch("lockprobe", dict)
    fut = cache.get(pool)
    if fut is None:
        fut = cache[pool] = asyncio.ensure_future(_pool_locks(ctx, pool))
    return await asyncio.shield(fut)


async def _pool_locks(ctx: RunContext, pool: str) -> LockProbe:
    p = ctx.spec.pools[pool]
    hosts = []
    for h in p.hosts:
        if ctx.host_offline(h):
            continue
        st = await ctx.liveness.state(h)
        if st.reachable:
            hosts.append(h)
    if len(hosts) < 2:
        return LockProbe(None, f"pool {pool}: fewer than two hosts answer; not probed")
    try:
        return await probe(ctx, p.path, hosts[0], hosts[1])
    except KvmstateError as e:
        return LockProbe(None, f"pool {pool}: lock probe failed: {e}")
