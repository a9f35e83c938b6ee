"""Is a host up, unreachable, or down? Fencing, and the ledger of fenced hosts.

A host is **down** only when it is unreachable AND known to be powered off: its fence agent
(``hosts.NAME.fence``, run on the control machine) powered it off and reports it off, or a
person confirmed it (``kvmstate fence HOST SPEC --confirm-off``). Unreachable alone is never
enough: a network partition leaves a host unreachable with its guests running, and starting
them elsewhere would make two copies writing one disk. Only a down host's HA domains are
started elsewhere; a down host's other resources are reported down, not failed, so that
what depends on them (an HA domain's restart) goes on.

The **ledger** (a JSON file on the control machine, one per cluster) remembers the hosts
kvmstate treated as down and the domains it restarted elsewhere: when such a host answers
again, its stale definitions of those domains are removed before anything starts there.

``kvmstate plan --host-down HOST`` asks "what if": HOST is treated as down without being
contacted, fenced when it has a fence agent (the agent would power it off), not otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from kvmstate.errors import HostUnreachable, KvmstateError
from kvmstate.spec import Fence, Spec
from kvmstate.transport.base import Transports

log = logging.getLogger(__name__)

_OFF_RE = re.compile(r"\boff\b", re.IGNORECASE)
_ON_RE = re.compile(r"\bon\b", re.IGNORECASE)
# between two reachability probes while a grace period runs
PROBE_INTERVAL = 1.0


@dataclass(frozen=True)
class FenceRecord:
    """One host kvmstate treated as down: how that was known, and what it restarted elsewhere."""

    host: str
    address: str
    how: str  # "agent" | "person"
    at: str
    detail: str = ""
    restarted: dict[str, str] = field(default_factory=dict)  # domain -> host it runs on now

    def describe(self) -> str:
        who = "powered off by its fence agent" if self.how == "agent" else "confirmed off by"
        return f"{who} {self.detail} at {self.at}".replace("  ", " ").strip()


class FenceLedger:
    """The fenced hosts of one cluster, in a JSON file on the control machine (``path``
    None: in memory, for tests and what-if plans). Written atomically, readable only by its
    owner (the records name hosts, never credentials)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._memory: dict[str, FenceRecord] = {}

    def load(self) -> dict[str, FenceRecord]:
        if self.path is None:
            return dict(self._memory)
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise KvmstateError(f"{self.path}: unreadable fence ledger: {e}") from None
        return {h: FenceRecord(**r) for h, r in raw.items()}

    def get(self, host: str, address: str | None = None) -> FenceRecord | None:
        rec = self.load().get(host)
        if rec is None or (address is not None and rec.address != address):
            return None
        return rec

    def _save(self, records: Mapping[str, FenceRecord]) -> None:
        if self.path is None:
            self._memory = dict(records)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({h: asdict(r) for h, r in records.items()}, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def put(self, record: FenceRecord) -> None:
        records = self.load()
        old = records.get(record.host)
        if old is not None and old.address == record.address:
            record = replace(record, restarted={**old.restarted, **record.restarted})
        records[record.host] = record
        self._save(records)

    def note_restart(self, host: str, domain: str, target: str) -> None:
        records = self.load()
        rec = records.get(host)
        if rec is not None:
            records[host] = replace(rec, restarted={**rec.restarted, domain: target})
            self._save(records)

    def forget(self, host: str) -> None:
        records = self.load()
        if records.pop(host, None) is not None:
            self._save(records)


@dataclass(frozen=True)
class HostState:
    host: str
    reachable: bool
    reason: str = ""  # why it is unreachable
    fenced: str | None = None  # how it is known to be off (None: not known)
    record: FenceRecord | None = None  # the ledger's, also when the host answers again
    what_if: bool = False

    @property
    def down(self) -> bool:
        return not self.reachable and self.fenced is not None

    def describe(self) -> str:
        if self.reachable:
            return f"{self.host} answers"
        if self.fenced:
            return f"{self.host} is down ({self.fenced})"
        return f"{self.host} is unreachable ({self.reason})"


def stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class Liveness:
    """Host states for one run: probed on first need, cached, and changed by fencing."""

    def __init__(
        self,
        spec: Spec,
        transports: Transports,
        ledger: FenceLedger | None = None,
        assume_down: Iterable[str] = (),
    ) -> None:
        self.spec = spec
        self.transports = transports
        self.ledger = ledger or FenceLedger()
        self.assume_down = frozenset(assume_down)
        self._states: dict[str, asyncio.Future[HostState]] = {}
        self._known: dict[str, HostState] = {}
        for h in self.assume_down:
            fence = spec.hosts[h].fence
            self._known[h] = HostState(
                h,
                False,
                "what-if: assumed down",
                f"what-if: its fence agent {fence.program} would power it off"
                if fence is not None
                else None,
                what_if=True,
            )

    def known(self, host: str) -> HostState | None:
        """The state of a host this run already knows is not reachable (a what-if host, or
        one fenced during this apply): its resources are not contacted. Never probes."""
        return self._known.get(host)

    def offline(self, host: str) -> str | None:
        """Why ``host``'s resources are not observed in this run (what-if or fenced now)."""
        st = self._known.get(host)
        if st is None:
            return None
        return st.fenced or st.reason

    async def state(self, host: str) -> HostState:
        known = self._known.get(host)
        if known is not None:
            return known
        fut = self._states.get(host)
        if fut is None:
            fut = self._states[host] = asyncio.ensure_future(self._classify(host))
        st = await asyncio.shield(fut)
        if st.down:  # known off: its resources are not contacted for the rest of the run
            self._known.setdefault(host, st)
        return st

    async def learn(self) -> None:
        """Classify the hosts the ledger names (fenced earlier), in parallel, so that a host
        still down is known before anything tries to contact it."""
        names = [h for h in self.ledger.load() if h in self.spec.hosts and h not in self._known]
        await asyncio.gather(*(self.state(h) for h in names))

    def forget(self, host: str) -> None:
        """Probe again on the next ``state`` (after fencing, or a host's return)."""
        self._states.pop(host, None)
        if host not in self.assume_down:
            self._known.pop(host, None)

    def mark_down(self, host: str, how: str) -> None:
        self._known[host] = HostState(host, False, "fenced", how, self.ledger.get(host))

    async def probe(self, host: str) -> str | None:
        """None if ``host`` answers over SSH, else why not."""
        try:
            await self.transports.shell(host).run(["true"], check=False)
        except HostUnreachable as e:
            return e.reason if hasattr(e, "reason") else str(e)
        return None

    async def _classify(self, host: str) -> HostState:
        address = str(self.spec.hosts[host].address)
        record = self.ledger.get(host, address)
        why = await self.probe(host)
        if why is None:
            return HostState(host, True, record=record)
        if record is not None:
            return HostState(host, False, why, record.describe(), record)
        # Not fenced yet, even if its agent would say "off" now: fencing is apply's power-off
        # confirmed by the agent (journaled, after the grace period), never a plan's reading.
        return HostState(host, False, why)

    async def confirm_unreachable(self, host: str, grace: float) -> str | None:
        """Probe ``host`` until ``grace`` seconds have passed: None if it answered at some
        point (not dead), else the last reason it did not."""
        deadline = time.monotonic() + grace
        why = await self.probe(host)
        while why is not None and time.monotonic() < deadline:
            await asyncio.sleep(min(PROBE_INTERVAL, max(0.0, deadline - time.monotonic())))
            why = await self.probe(host)
        return why

    async def fence(self, host: str) -> FenceRecord:
        """Power ``host`` off with its fence agent and wait until the agent reports it off;
        record it in the ledger. Raises if the agent fails or never confirms."""
        fence = self.spec.hosts[host].fence
        if fence is None:
            raise KvmstateError(
                f"{host} has no fence agent (hosts.{host}.fence); once it is off, confirm "
                f"it: kvmstate fence {host} SPEC --confirm-off"
            )
        deadline = time.monotonic() + fence.timeout
        rc, _ = await run_agent(fence.power_off, fence.timeout)
        if rc != 0:
            log.warning("%s: fence agent %s (off) exited %s", host, fence.program, rc)
        while True:
            power, detail = await agent_power(fence, max(1.0, deadline - time.monotonic()))
            if power == "off":
                break
            if time.monotonic() >= deadline:
                raise KvmstateError(
                    f"{host}: the fence agent {fence.program} did not confirm it off within "
                    f"{fence.timeout:g}s (off exited {rc}; status: {detail}); nothing is "
                    "started elsewhere"
                )
            await asyncio.sleep(PROBE_INTERVAL)
        record = FenceRecord(
            host, str(self.spec.hosts[host].address), "agent", stamp(), fence.program
        )
        self.ledger.put(record)
        self.mark_down(host, record.describe())
        return record


async def run_agent(argv: list[str], timeout: float) -> tuple[int | None, str]:
    """Run a fence agent command on this machine: (exit status or None on timeout, output).
    The output is for deciding on/off only: it is never logged (an agent may echo its
    options)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as e:
        return 127, f"cannot run {Path(argv[0]).name}: {e.strerror}"
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return None, "timed out"
    return proc.returncode, out.decode(errors="replace")


async def agent_power(fence: Fence, timeout: float | None = None) -> tuple[str, str]:
    """("on" | "off" | "unknown", a short detail without the agent's output) from the
    agent's status command: exit 2 (fence-agents' convention) or the word "off" = off."""
    rc, out = await run_agent(fence.status, timeout or fence.timeout)
    if rc == 2 or (rc == 0 and _OFF_RE.search(out) and not _ON_RE.search(out)):
        return "off", f"{fence.program} reports off"
    if rc == 0 and _ON_RE.search(out):
        return "on", f"{fence.program} reports on"
    if rc is None:
        return "unknown", f"{fence.program} status timed out"
    return "unknown", f"{fence.program} status exited {rc}"
