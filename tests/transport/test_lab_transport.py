"""The real transports against the lab's real sshd and libvirtd (read-only).

Server side, each lab host must see exactly ONE established SSH connection from the controller
while kvmstate has read files with run_many AND talked to libvirt on it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from kvmstate.errors import HostUnreachable
from kvmstate.loader import load_spec
from kvmstate.spec import Spec
from kvmstate.transport.real import RealTransports
from kvmstate.transport.sshlib import asyncssh

if TYPE_CHECKING:
    from kvmstate.lab.lab import Lab

pytestmark = pytest.mark.lab

READS = [["cat", "/etc/fstab"], ["cat", "/proc/self/mountinfo"], ["hostname"]]


def _lab_spec(lab: Lab) -> Spec:
    return load_spec(lab.cfg.spec).spec


def _libvirt_hosts(spec: Spec) -> list[str]:
    hosts = {h for p in spec.pools.values() for h in p.hosts}
    hosts |= {h for d in spec.domains.values() for h in d.allowed_hosts()}
    return sorted(hosts)


def _ssh_peers(lab: Lab, host: str) -> set[str]:
    """Established connections to the host's sshd, as the host sees them ("addr:port")."""
    out = lab.run(host, ["ss", "-Htn", "state", "established", "( sport = :22 )"]).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def test_one_ssh_connection_per_host_libvirt_included(lab: Lab) -> None:
    spec = _lab_spec(lab)
    kvm = _libvirt_hosts(spec)
    assert kvm, "the lab spec puts pools or domains on some host"

    # someone else may hold connections to the lab (a shared lab): look only at new ones
    before = {h: _ssh_peers(lab, h) for h in spec.hosts}

    async def main() -> tuple[dict[str, Any], dict[str, set[str]], dict[str, str]]:
        async with RealTransports(spec) as t:

            async def observe(host: str) -> None:
                results = await t.shell(host).run_many(READS)
                assert [r.exit_status for r in results] == [0, 0, 0]
                if host in kvm:
                    lv = t.libvirt(host)
                    conn = await lv.connect()
                    await asyncio.gather(
                        lv.run(conn.listAllDomains, 0), lv.run(conn.listAllStoragePools, 0)
                    )

            await asyncio.gather(*(observe(h) for h in spec.hosts))
            peers = {h: await asyncio.to_thread(_ssh_peers, lab, h) for h in spec.hosts}
            ours = {}
            for h in spec.hosts:
                local = (await t.ssh_host(h).connection()).get_extra_info("sockname")
                ours[h] = f"{local[0]}:{local[1]}"
            return t.stats(), peers, ours

    stats, peers, ours = asyncio.run(main())
    for host in spec.hosts:
        assert stats[host] == {"connections": 1, "channels": 1}, host
        new = peers[host] - before[host]
        assert new == {ours[host]}, (host, new, ours[host])  # counted by the host itself


def test_wrong_host_key_and_unknown_key_refused_by_real_sshd(lab: Lab, tmp_path: Path) -> None:
    spec = _lab_spec(lab)
    names = sorted(spec.hosts)
    a, b = names[0], names[1]
    addr = {h: spec.hosts[h].address for h in names}
    lines = Path(spec.ssh_for(a).known_hosts or "").read_text().splitlines()
    # give host a the key of host b: a key that does not match
    b_keys = [
        ln.split(None, 1)[1]
        for ln in lines
        if ln.strip() and addr[b] in ln.split(None, 1)[0].split(",")
    ]
    assert b_keys
    swapped = tmp_path / "known_hosts"
    swapped.write_text("".join(f"{addr[a]} {k}\n" for k in b_keys))
    data = spec.model_dump(exclude_none=True)
    data["ssh"]["known_hosts"] = str(swapped)
    bad_spec = Spec.model_validate(data)
    key = tmp_path / "stranger"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(key))
    data2 = spec.model_dump(exclude_none=True)
    data2["ssh"]["identity"] = [str(key)]
    stranger_spec = Spec.model_validate(data2)

    async def main() -> tuple[str, str]:
        async with RealTransports(bad_spec) as t:
            with pytest.raises(HostUnreachable) as e1:
                await t.shell(a).run(["true"])
        async with RealTransports(stranger_spec) as t:
            with pytest.raises(HostUnreachable) as e2:
                await t.shell(a).run(["true"])
        return str(e1.value), str(e2.value)

    key_msg, auth_msg = asyncio.run(main())
    assert f"host key for {addr[a]} does not match known_hosts ({swapped})" in key_msg
    assert "permission denied (publickey)" in auth_msg
