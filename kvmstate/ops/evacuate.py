"""What `kvmstate evacuate HOST` applies: the spec with HOST drained, and the domains that
cannot leave it."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from kvmstate.errors import KvmstateError

if TYPE_CHECKING:
    from kvmstate.loader import LoadedSpec
    from kvmstate.spec import Spec


def drained(loaded: LoadedSpec, host: str) -> LoadedSpec:
    """The spec with ``host`` marked ``drain: true``."""
    spec = loaded.spec
    if host not in spec.hosts:
        raise KvmstateError(f"{loaded.path}: no host {host!r} (hosts: {', '.join(spec.hosts)})")
    hosts = {**spec.hosts, host: spec.hosts[host].model_copy(update={"drain": True})}
    return dataclasses.replace(loaded, spec=spec.model_copy(update={"hosts": hosts}))


def pinned_domains(spec: Spec, host: str) -> list[str]:
    """The domains on ``host`` that may run on no host but a drained one: they stay."""
    return [
        name
        for name, d in spec.domains.items()
        if d.state != "absent"
        and d.host == host
        and not [h for h in d.allowed_hosts() if not spec.hosts[h].drain]
    ]
