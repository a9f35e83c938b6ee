"""The guest CPU a domain gets, read from its hosts' own capabilities.

A ``cpu: {mode: baseline}`` domain gets the CPU every host it may run on (``host`` and
``placement.hosts``) can run: each host's host-model CPU for the domain's virt type, from its
``getDomainCapabilities`` (one call per host, shared by the run's resources through
``ctx.memo``), fed to libvirt's ``baselineHypervisorCPU`` on the domain's own host. The
domain's plan shows the result; the migration pre-flight compares the same CPU on the target
with ``compareHypervisorCPU``.
"""

from __future__ import annotations

import asyncio

from kvmstate import virt
from kvmstate.errors import KvmstateError
from kvmstate.resources.base import RunContext
from kvmstate.spec import Domain
from kvmstate.virtxml import CpuConfig, cpu_config


async def host_cpu_caps(ctx: RunContext, host: str, virttype: str) -> virt.CpuCaps:
    """The host's guest-CPU capabilities for ``virttype``, read once per plan."""
    lv = ctx.libvirt(host)

    async def read() -> virt.CpuCaps:
        return await lv.run(virt.cpu_caps, await lv.connect(), virttype)

    return await ctx.memo(host, ("cpu-caps", virttype), read)


async def resolve_cpu(ctx: RunContext, d: Domain) -> CpuConfig | None:
    """The CPU the domain's definition gets: the spec's, with a baseline computed on the
    hosts (its own features on top)."""
    want = cpu_config(d.cpu)
    if want is None or want.mode != "baseline" or d.cpu is None:
        return want
    hosts = sorted(d.allowed_hosts())  # the same baseline whichever host is `host`
    caps = await asyncio.gather(*(host_cpu_caps(ctx, h, d.type) for h in hosts))
    lacking = [h for h, c in zip(hosts, caps, strict=True) if c.host_model_xml is None]
    if lacking:
        raise KvmstateError(
            f"cpu: baseline: {', '.join(lacking)} report no host-model CPU for type "
            f"{d.type} (libvirt's domain capabilities)"
        )
    lv = ctx.libvirt(d.host)

    async def compute() -> CpuConfig:
        cpus = [c.host_model_xml or "" for c in caps]
        return await lv.run(virt.baseline_cpu, await lv.connect(), caps[0], cpus)

    base = await ctx.memo(d.host, ("cpu-baseline", d.type, tuple(hosts)), compute)
    return base.with_features(dict(d.cpu.features))


async def check_cpu(ctx: RunContext, d: Domain, host: str) -> tuple[bool | None, str]:
    """Can ``host`` run the CPU the spec gives the domain? (None: nothing to compare.)"""
    cpu = await resolve_cpu(ctx, d)
    if cpu is None:
        return None, "no CPU model set (the hypervisor's default CPU)"
    caps = await host_cpu_caps(ctx, host, d.type)
    lv = ctx.libvirt(host)
    return await lv.run(virt.compare_cpu, await lv.connect(), caps, cpu)
