"""What the commands share to reach a cluster: load the spec and its graph, build the engine
on the transports it needs, hold the run locks, and show a spinner while observing.

Everything heavy is imported inside the function that needs it (tests/cli/
test_startup_imports.py): `plan --assume-empty` opens no transport, `validate` no engine."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from rich.console import Console

from kvmstate.errors import KvmstateError

if TYPE_CHECKING:
    from collections.abc import Callable

    from kvmstate.engine import Engine
    from kvmstate.engine.graph import ResourceGraph
    from kvmstate.loader import LoadedSpec
    from kvmstate.model import Event, Plan
    from kvmstate.resources.liveness import FenceLedger
    from kvmstate.transport.base import Libvirt, Shell, Transports


def load(path: str) -> LoadedSpec:
    """The spec at ``path``, validated by the registered kinds (their sections and checks)."""
    from kvmstate.resources import REGISTRY

    return REGISTRY.load(path)


def graph_of(loaded: LoadedSpec) -> ResourceGraph:
    from kvmstate.resources import REGISTRY

    return REGISTRY.graph(loaded.spec, path=loaded.path, lines=loaded.lines)


class NoTransports:
    """For --assume-empty: any attempt to reach a host is a bug."""

    def shell(self, host: str) -> Shell:
        raise KvmstateError(f"--assume-empty must not contact {host}")

    def libvirt(self, host: str) -> Libvirt:
        raise KvmstateError(f"--assume-empty must not contact {host}")

    async def connect_all(self) -> None:
        return None

    async def close(self) -> None:
        return None


def engine_for(
    loaded: LoadedSpec,
    graph: ResourceGraph,
    *,
    events: Callable[[Event], None] | None = None,
    allow_destroy: bool = False,
    adopt: bool = False,
    restart_pending: bool = False,
    assume_empty: bool = False,
    assume_down: frozenset[str] = frozenset(),
    max_rounds: int = 3,
) -> tuple[Engine, Transports]:
    """The engine and the transports it uses (no transport at all for --assume-empty)."""
    from kvmstate.engine import Engine, EngineConfig
    from kvmstate.resources.base import Options, RunContext

    transports: Transports
    if assume_empty:
        transports = NoTransports()
    else:
        from kvmstate.transport.real import RealTransports

        transports = RealTransports(loaded.spec)
    options = Options(
        allow_destroy=allow_destroy,
        adopt=adopt,
        restart_pending=restart_pending,
        assume_down=assume_down,
        # only a spec with HA domains fences (and reads the ledger)
        fence_ledger=fence_ledger(loaded)
        if not assume_empty and any(d.ha is not None for d in loaded.spec.domains.values())
        else None,
    )
    ctx = RunContext(loaded.spec, transports, options, events)
    return Engine(graph, ctx, EngineConfig(max_rounds=max_rounds)), transports


def fence_ledger(loaded: LoadedSpec) -> FenceLedger:
    """The cluster's ledger of fenced hosts on this machine: one file per cluster, named
    like its run lock (``cluster_key``: its host names and addresses)."""
    from kvmstate.ops.runlock import cluster_key, state_dir
    from kvmstate.resources.liveness import FenceLedger

    key = cluster_key({n: h.address for n, h in loaded.spec.hosts.items()})
    return FenceLedger(state_dir() / "fenced" / f"{key}.json")


def observe(loaded: LoadedSpec, graph: ResourceGraph) -> Plan:
    """Observe the whole cluster once (read-only) and return the plan."""

    async def run() -> Plan:
        engine, transports = engine_for(loaded, graph)
        try:
            return await engine.plan()
        finally:
            await transports.close()

    return asyncio.run(run())


def observing(err: Console, hosts: int) -> contextlib.AbstractContextManager[object]:
    """A spinner while observing, only when a person watches (not from cron or a pipe)."""
    if not err.is_terminal:
        return contextlib.nullcontext()
    return err.status(f"observing {hosts} hosts…", spinner="dots")


def _waiting(err: Console, timeout: float) -> Callable[[str], None]:
    def waiting(holder: str) -> None:
        err.print(f"waiting up to {timeout:g}s for the run lock held by {holder}", markup=False)

    return waiting


def local_lock(
    loaded: LoadedSpec, err: Console, *, command: str, timeout: float, exclusive: bool
) -> contextlib.AbstractContextManager[None]:
    """This machine's run lock for the cluster (shared for read-only commands)."""
    from kvmstate.ops.runlock import cluster_key, local_lock

    key = cluster_key({n: h.address for n, h in loaded.spec.hosts.items()})
    return local_lock(
        key,
        command=command,
        exclusive=exclusive,
        timeout=timeout,
        on_wait=_waiting(err, timeout),
    )


def cluster_lock(
    transports: Transports, loaded: LoadedSpec, err: Console, *, command: str, timeout: float
) -> contextlib.AbstractAsyncContextManager[str]:
    """The cluster-wide run lock, held on the storage host."""
    from kvmstate.ops.clusterlock import cluster_lock

    return cluster_lock(
        transports, loaded.spec, command=command, timeout=timeout, on_wait=_waiting(err, timeout)
    )
