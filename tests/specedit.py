"""Edits of a spec's data (the dict YAML or ``Spec.model_dump`` gives) shared by the fake and
the lab tests."""

from __future__ import annotations

import copy
from typing import Any


def add_second_guest(
    data: dict[str, Any], first: str, second: str, a_on: str, b_on: str, caps: dict[str, str]
) -> dict[str, Any]:
    """A copy of domain ``first`` as ``second``, on a volume of its own (a copy of the first's
    first disk's volume); ``first`` placed on ``a_on``, ``second`` on ``b_on``; and each host
    in ``caps`` given that ``max_guest_memory``. Edits ``data`` in place and returns it."""
    g1 = data["domains"][first]
    volume = f"{second}.qcow2"
    data["volumes"][volume] = dict(data["volumes"][g1["disks"][0]["volume"]])
    g2 = copy.deepcopy(g1)
    g2["disks"][0]["volume"] = volume
    g2["serial"]["path"] = f"/var/log/libvirt/qemu/{second}.serial.log"
    data["domains"][second] = g2
    g1["host"], g2["host"] = a_on, b_on
    for host, cap in caps.items():
        data["hosts"][host]["max_guest_memory"] = cap
    return data
