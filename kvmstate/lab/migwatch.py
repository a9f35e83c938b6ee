"""A live migration watched from the side, as libvirt and QEMU report it (issue 18): what the
lab tests and benchmark B6 read back, never kvmstate's own calls.

:class:`MigrationWatcher` polls the source host's libvirtd in a thread while the job runs
(``jobStats``: iteration, dirty rate, auto-converge throttle; ``migrateGetMaxDowntime``, which
libvirt reads from QEMU's migration parameters; and, through ``qemu-monitor-command``, QEMU's
``query-migrate-capabilities`` and ``query-migrate-parameters``) and records the lifecycle
events of both hosts (a switch to post-copy is ``SUSPENDED_POSTCOPY`` on the source and
``RESUMED_POSTCOPY`` on the target: libvirt emits them from QEMU's own migration events).
:func:`dirty_rate` asks QEMU to measure a guest's dirty rate (``calc-dirty-rate`` in
page-sampling mode: the dirty-bitmap mode crashes QEMU 7.2 under TCG).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from kvmstate.lab.virt import lookup_domain
from kvmstate.transport.libvirt import libvirt_module as _libvirt

_event_loop_lock = threading.Lock()
_event_loop_started = False


def _start_event_loop() -> None:
    """libvirt's default event loop, once per process, in a daemon thread (connections opened
    after this deliver events)."""
    global _event_loop_started
    libvirt = _libvirt()
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def qmp(dom: Any, command: str, **arguments: Any) -> Any:
    """One QMP command to the domain's QEMU through libvirt; its ``return`` value."""
    import libvirt_qemu

    msg: dict[str, Any] = {"execute": command}
    if arguments:
        msg["arguments"] = arguments
    return json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(msg), 0))["return"]


def dirty_rate(uri: str, domain: str, seconds: int = 1, sample_pages: int = 10000) -> float:
    """The guest's dirty rate in MiB/s as QEMU measures it (``calc-dirty-rate``, page-sampling
    ``sample_pages`` per GiB over ``seconds``)."""
    libvirt = _libvirt()
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByName(domain)
        qmp(
            dom,
            "calc-dirty-rate",
            **{"calc-time": seconds, "sample-pages": sample_pages, "mode": "page-sampling"},
        )
        deadline = time.monotonic() + seconds + 30  # a hang guard
        while True:
            got = qmp(dom, "query-dirty-rate")
            if got.get("status") == "measured":
                return float(got["dirty-rate"])
            if time.monotonic() > deadline:
                raise TimeoutError(f"calc-dirty-rate of {domain}: still {got.get('status')}")
            time.sleep(0.2)
    finally:
        conn.close()


def completed_job(uri: str, domain: str) -> dict[str, Any]:
    """The finished job's statistics on ``uri`` (kept for the next reader)."""
    libvirt = _libvirt()
    conn = libvirt.open(uri)
    try:
        dom = lookup_domain(conn, domain)
        if dom is None:
            return {}
        flags = libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
        stats: dict[str, Any] = dom.jobStats(flags)
        return stats
    finally:
        conn.close()


@dataclass(frozen=True)
class Sample:
    """One look at the running job on the source."""

    at: float  # seconds since the watcher started
    iteration: int | None
    data_processed: int | None
    dirty_rate_pages: int | None
    page_size: int | None
    throttle: int | None  # auto-converge's vCPU throttle, percent
    max_downtime_ms: int | None
    capabilities: frozenset[str] = frozenset()  # QEMU's enabled migration capabilities
    parameters: dict[str, Any] = field(default_factory=dict)  # QEMU's migration parameters


@dataclass
class Watch:
    samples: list[Sample] = field(default_factory=list)
    events: list[tuple[str, int, int]] = field(default_factory=list)  # (host, event, detail)
    errors: list[str] = field(default_factory=list)

    def copying(self) -> list[Sample]:
        """The samples taken while memory was being copied (QEMU set up, iteration >= 1)."""
        return [s for s in self.samples if s.iteration]

    def downtimes(self) -> list[int]:
        """The max downtime values seen while the job ran, in order, repeats dropped."""
        out: list[int] = []
        for s in self.samples:
            if s.max_downtime_ms is not None and (not out or out[-1] != s.max_downtime_ms):
                out.append(s.max_downtime_ms)
        return out

    def max_throttle(self) -> int:
        return max((s.throttle or 0 for s in self.samples), default=0)

    def max_iteration(self) -> int:
        return max((s.iteration or 0 for s in self.samples), default=0)

    def dirty_rates_mib(self) -> list[float]:
        return [
            s.dirty_rate_pages * (s.page_size or 4096) / 2**20
            for s in self.samples
            if s.dirty_rate_pages
        ]

    def postcopy(self, source: str, target: str) -> bool:
        """libvirt saw QEMU switch the job to post-copy on both ends."""
        lv = _libvirt()
        return (
            source,
            lv.VIR_DOMAIN_EVENT_SUSPENDED,
            lv.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY,
        ) in self.events and (
            target,
            lv.VIR_DOMAIN_EVENT_RESUMED,
            lv.VIR_DOMAIN_EVENT_RESUMED_POSTCOPY,
        ) in self.events


class MigrationWatcher:
    """``with MigrationWatcher(uris, "kvm-1", "guest") as w: ...`` then ``w.watch``.

    ``uris``: host -> libvirt URI for every host whose lifecycle events count; ``source``:
    the host whose running job is sampled every ``interval`` seconds; ``qmp``: also read
    QEMU's migration capabilities and parameters (a custom monitor command taints the
    domain, which libvirt only notes in its log)."""

    def __init__(
        self,
        uris: dict[str, str],
        source: str,
        domain: str,
        *,
        interval: float = 0.1,
        qmp: bool = True,
    ) -> None:
        self.uris = uris
        self.source = source
        self.domain = domain
        self.interval = interval
        self.qmp = qmp
        self.watch = Watch()
        self._stop = threading.Event()
        self._conns: dict[str, Any] = {}
        self._callbacks: list[tuple[Any, int]] = []
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()

    def __enter__(self) -> MigrationWatcher:
        libvirt = _libvirt()
        _start_event_loop()
        for host, uri in self.uris.items():
            conn = libvirt.open(uri)
            self._conns[host] = conn

            cb = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, host
            )
            self._callbacks.append((conn, cb))
        self._thread = threading.Thread(target=self._poll, name="migration-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        libvirt = _libvirt()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for conn, cb in self._callbacks:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(cb)
        for conn in self._conns.values():
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def _on_event(self, _conn: Any, dom: Any, event: int, detail: int, host: str) -> None:
        if dom.name() == self.domain:
            self.watch.events.append((host, event, detail))

    def _poll(self) -> None:
        libvirt = _libvirt()
        conn = self._conns[self.source]
        while not self._stop.wait(self.interval):
            try:
                dom = lookup_domain(conn, self.domain)
                if dom is None or not dom.isActive():
                    continue
                stats = dom.jobStats(0)
                if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
                    continue
                caps: frozenset[str] = frozenset()
                params: dict[str, Any] = {}
                if self.qmp:
                    caps = frozenset(
                        c["capability"]
                        for c in qmp(dom, "query-migrate-capabilities")
                        if c.get("state")
                    )
                    params = qmp(dom, "query-migrate-parameters")
                self.watch.samples.append(
                    Sample(
                        at=time.monotonic() - self._t0,
                        iteration=stats.get("memory_iteration"),
                        data_processed=stats.get("data_processed"),
                        dirty_rate_pages=stats.get("memory_dirty_rate"),
                        page_size=stats.get("memory_page_size"),
                        throttle=stats.get(libvirt.VIR_DOMAIN_JOB_AUTO_CONVERGE_THROTTLE),
                        max_downtime_ms=int(dom.migrateGetMaxDowntime(0)),
                        capabilities=caps,
                        parameters=params,
                    )
                )
            except libvirt.libvirtError as e:  # the job ended between two calls
                self.watch.errors.append(str(e))
