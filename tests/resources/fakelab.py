"""Helpers for the resource tests: a lab-shaped spec on a fake cluster, and a tiny local
driver loop (observe -> diff -> apply -> re-diff) standing in for the engine."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Coroutine
from typing import Any

import networkx as nx

from kvmstate.engine import Blocked, Engine
from kvmstate.engine.graph import ResourceGraph
from kvmstate.errors import RefusedError
from kvmstate.model import Change
from kvmstate.resources import KINDS, REGISTRY
from kvmstate.resources.base import Options, Resource, RunContext
from kvmstate.spec import Spec
from kvmstate.testing.fake import FakeCluster, FakeMount

LAB_SPEC = """
version: 1
hosts:
  storage: {address: 10.77.0.10}
  kvm-1: {address: 10.77.0.21}
  kvm-2: {address: 10.77.0.22}
subvolumes:
  images:
    host: storage
    device: LABEL=labpool
    toplevel: /srv/btrfs
    mountpoint: /srv/images
    mount_options: [noatime]
exports:
  images:
    host: storage
    path: /srv/images
    clients:
      - network: 10.77.0.0/24
        options: [rw, sync, no_root_squash, no_subtree_check]
mounts:
  images:
    export: images
    hosts: [kvm-1, kvm-2]
    mountpoint: /var/lib/libvirt/images
    nfs_version: 3
    options: [nolock, _netdev]
pools:
  images:
    path: /var/lib/libvirt/images
    hosts: [kvm-1, kvm-2]
volumes:
  guest.qcow2:
    pool: images
    format: qcow2
    capacity: 64MiB
    owner: libvirt-qemu
    group: kvm
domains:
  guest:
    type: qemu
    memory: 128MiB
    vcpus: 1
    boot:
      kernel: /var/lib/kvmstate/vmlinuz
      initrd: /var/lib/kvmstate/initrd.img
      cmdline: console=ttyS0
    disks:
      - volume: guest.qcow2
    interfaces:
      - bridge: br0
    serial: {type: file, path: /var/log/libvirt/qemu/guest-serial.log}
    state: running
    host: kvm-1
    placement:
      hosts: [kvm-1, kvm-2]
"""


def make_spec(text: str = LAB_SPEC, **patch: Any) -> Spec:
    spec = REGISTRY.parse(text).spec
    if patch:
        data = spec.model_dump(mode="json", exclude_none=True)
        for dotted, value in patch.items():
            node = data
            *path, last = dotted.split(".")
            for p in path:
                node = node[p]
            node[last] = value
        spec = Spec.model_validate(data)
    return spec


def prepare(cluster: FakeCluster) -> None:
    """What the lab gives before kvmstate runs: a btrfs on a loop device with its top level
    mounted on the storage host; bridges, users and groups on the KVM hosts."""
    st = cluster["storage"]
    st.add_btrfs("/dev/loop0", label="labpool", uuid="9492ea86")
    st.dirs |= {"/srv/btrfs"}
    st.mounts.append(
        FakeMount(
            "/dev/loop0", "/srv/btrfs", "btrfs", ("rw", "relatime"), "/", ("subvolid=5", "subvol=/")
        )
    )
    for name in ("kvm-1", "kvm-2"):
        h = cluster[name]
        h.bridges.add("br0")
        h.users.add("libvirt-qemu")
        h.groups.add("kvm")


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def fresh(ctx: RunContext) -> None:
    for h in ctx.spec.hosts:
        ctx.invalidate(h)


async def plan(res: Resource[Any], ctx: RunContext) -> Change:
    """observe + diff, from a cold fact cache (as a new run would)."""
    fresh(ctx)
    return res.diff(await res.observe(ctx))


async def apply_change(res: Resource[Any], change: Change, ctx: RunContext) -> Any:
    """Apply ``change`` to one resource through the engine's own per-node path
    (``Engine.mutate``: re-check, apply from that observation, re-diff) and return a fresh
    observation. A change that is blocked at the re-check raises ``RefusedError`` with its
    reason. The --allow-destroy consent is given: what is under test here is each kind's
    apply (the gate itself is tested in tests/engine)."""
    g = nx.DiGraph()
    g.add_node(res.id)
    engine = Engine(ResourceGraph(g, {res.id: res}), ctx)
    consent = ctx.options
    ctx.options = dataclasses.replace(consent, allow_destroy=True)
    try:
        await engine.mutate(res, change)
    except Blocked as b:
        raise RefusedError(str(b)) from None
    finally:
        ctx.options = consent
    fresh(ctx)
    return await res.observe(ctx)


async def converge(res: Resource[Any], ctx: RunContext) -> Change:
    """Plan one resource from a cold cache and, if it has a change, apply it through the
    engine's per-node path (``apply_change``); returns the diff of the result."""
    change = await plan(res, ctx)
    if change.is_noop:
        return change
    return res.diff(await apply_change(res, change, ctx))


def resources(spec: Spec, kind: str) -> list[Resource[Any]]:
    for k in KINDS:
        if k.kind == kind:
            return list(k.expand(spec))
    raise KeyError(kind)


def find(spec: Spec, kind: str, host: str | None = None) -> Resource[Any]:
    found = [r for r in resources(spec, kind) if host is None or r.id.host == host]
    return found[0]


async def converge_upto(ctx: RunContext, last_kind: str) -> None:
    """Converge every resource of every kind up to and including ``last_kind``."""
    for k in KINDS:
        for res in k.expand(ctx.spec):
            change = await converge(res, ctx)
            assert change.is_noop, (res.id, change)
        if k.kind == last_kind:
            return


Driver = Callable[[Resource[Any], RunContext], Coroutine[Any, Any, Change]]


def converged_cluster(text: str) -> tuple[Spec, FakeCluster]:
    """A fake cluster on which the spec ``text`` was applied (and converged)."""
    from kvmstate.engine import Engine

    spec = make_spec(text)
    cluster = FakeCluster(spec)
    prepare(cluster)
    report = run(Engine(REGISTRY.graph(spec), RunContext(spec, cluster, Options())).apply())
    assert report.converged, report.as_dict()
    return spec, cluster


def import_round_trip(spec: Spec, cluster: FakeCluster) -> tuple[Spec, list[str]]:
    """``kvmstate import`` of every host of ``spec`` into a bare base spec, loaded back the
    way the CLI checks it; the imported spec and the import's notes."""
    from kvmstate import importer

    invs = run(importer.gather(cluster, {h: spec.hosts[h].address for h in spec.hosts}))
    base = {"version": 1, "hosts": {h: {"address": spec.hosts[h].address} for h in spec.hosts}}
    got = importer.build(invs, base)
    text = importer.render_yaml(importer.merged(base, got), got.notes, "test import")
    return REGISTRY.parse(text, "imported.yaml").spec, got.notes
