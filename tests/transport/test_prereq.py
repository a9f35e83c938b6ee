"""Host prerequisites over the real in-process SSH server (commands really run here)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sshd_server import LocalSSHD

from kvmstate.resources import KIND_NEEDS, needs_for_host
from kvmstate.resources.packages import install_packages, missing_packages
from kvmstate.resources.prereq import (
    REQUIREMENTS,
    Requirement,
    check_prerequisites,
    packages_for,
)
from kvmstate.spec import Spec
from kvmstate.transport.real import RealTransports

TEST_REQS = {
    **REQUIREMENTS,
    "sh": Requirement("sh", "command", "dash", "sh", "testing"),
    "nope": Requirement("nope", "command", "kvmstate-fake", "kvmstate-no-such-cmd", "testing"),
    "evil": Requirement("evil", "command", "x", "$(touch PWNED)", "testing"),
    "null": Requirement("null", "device", None, "/dev/null", "testing"),
    "nodev": Requirement("nodev", "device", None, "/dev/kvmstate-nope", "testing"),
}


def test_commands_and_devices_checked_in_one_round_trip(sshd: LocalSSHD) -> None:
    async def main() -> Any:
        async with sshd, RealTransports(sshd.spec()) as t:
            found = await check_prerequisites(
                t, "h1", {"sh", "nope", "null", "nodev", "evil"}, requirements=TEST_REQS
            )
            assert t.stats()["h1"]["channels"] == 1
            return found

    found = asyncio.run(main())
    assert sorted(m.need for m in found) == ["evil", "nodev", "nope"]
    nope = next(m for m in found if m.need == "nope")
    assert str(nope) == (
        "h1: command `kvmstate-no-such-cmd` not found (needed for testing) "
        "(install the Debian package kvmstate-fake)"
    )
    assert packages_for(found) == ["kvmstate-fake", "x"]
    assert not (sshd.work / "PWNED").exists()


def _check_libvirtd(sshd: LocalSSHD, tmp_path: Path, binary: Requirement) -> Any:
    """Check libvirtd and its binary on h1 (no daemon listens on the socket given)."""
    reqs = {**TEST_REQS, "libvirtd-binary": binary}

    async def main() -> Any:
        async with sshd:
            t = RealTransports(sshd.spec(), libvirt_socket=str(tmp_path / "none.sock"))
            try:
                return await check_prerequisites(
                    t, "h1", {"libvirtd", "libvirtd-binary"}, requirements=reqs
                )
            finally:
                await t.close()

    return asyncio.run(main())


def test_libvirtd_not_answering_is_reported(sshd: LocalSSHD, tmp_path: Path) -> None:
    [m] = _check_libvirtd(sshd, tmp_path, TEST_REQS["sh"])  # the binary: pretend installed
    assert m.need == "libvirtd" and m.kind == "daemon"
    assert "libvirtd on 127.0.0.1" in str(m) and "not answering" in str(m)


def test_libvirtd_binary_missing_hides_not_answering(sshd: LocalSSHD, tmp_path: Path) -> None:
    [m] = _check_libvirtd(sshd, tmp_path, TEST_REQS["nope"])
    assert m.need == "libvirtd-binary"


def test_unknown_need_is_an_error(sshd: LocalSSHD) -> None:
    sshd.port = 2222

    async def main() -> None:
        async with RealTransports(sshd.spec()) as t:
            with pytest.raises(ValueError, match="unknown prerequisite"):
                await check_prerequisites(t, "h1", {"frobnicator"})

    asyncio.run(main())


def test_needs_for_host_from_the_spec() -> None:
    spec = Spec.model_validate(
        {
            "version": 1,
            "hosts": {
                "storage": {"address": "10.77.0.10"},
                "kvm1": {"address": "10.77.0.11"},
                "kvm2": {"address": "10.77.0.12"},
            },
            "subvolumes": {
                "images": {"host": "storage", "device": "/dev/vdb", "mountpoint": "/srv/images"}
            },
            "exports": {
                "images": {
                    "host": "storage",
                    "path": "/srv/images",
                    "clients": [{"network": "10.77.0.0/24"}],
                }
            },
            "mounts": {
                "images": {"export": "images", "hosts": ["kvm1", "kvm2"], "mountpoint": "/mnt/i"}
            },
            "pools": {"images": {"path": "/mnt/i", "hosts": ["kvm1", "kvm2"]}},
            "volumes": {"web1-disk": {"pool": "images", "capacity": "1GiB"}},
            "domains": {
                "web1": {
                    "type": "qemu",
                    "memory": "128MiB",
                    "host": "kvm1",
                    "disks": [{"volume": "web1-disk"}],
                }
            },
        }
    )
    assert needs_for_host(spec, "storage") == KIND_NEEDS["subvolume"] | KIND_NEEDS["export"]
    kvm = KIND_NEEDS["mount"] | KIND_NEEDS["pool"] | KIND_NEEDS["volume"]
    assert needs_for_host(spec, "kvm1") == kvm | KIND_NEEDS["domain"]
    assert needs_for_host(spec, "kvm2") == kvm
    assert all(n in REQUIREMENTS for n in needs_for_host(spec, "kvm1"))


DPKG_QUERY = """#!/bin/sh
echo "dpkg-query $*" >> "$KVMSTATE_TEST_SUDO_LOG.apt"
while [ "$1" != "--" ]; do shift; done; shift
rc=0
for p in "$@"; do
  case " $(cat "$KVMSTATE_TEST_SUDO_LOG.installed" 2>/dev/null) mount " in
    *" $p "*) printf '%s\\tii \\n' "$p" ;;
    *) echo "dpkg-query: no packages found matching $p" >&2; rc=1 ;;
  esac
done
exit $rc
"""

APT_GET = """#!/bin/sh
echo "apt-get $* DEBIAN_FRONTEND=$DEBIAN_FRONTEND" >> "$KVMSTATE_TEST_SUDO_LOG.apt"
if [ "$1" = update ]; then touch "$KVMSTATE_TEST_SUDO_LOG.updated"; exit 0; fi
if [ ! -e "$KVMSTATE_TEST_SUDO_LOG.updated" ]; then
  echo "E: Unable to locate package $6" >&2; exit 100
fi
shift 4
for p in "$@"; do printf ' %s' "$p" >> "$KVMSTATE_TEST_SUDO_LOG.installed"; done
"""


def test_install_packages_only_missing_with_update_retry(sshd: LocalSSHD) -> None:
    for name, text in (("dpkg-query", DPKG_QUERY), ("apt-get", APT_GET)):
        p = sshd.root / "bin" / name
        p.write_text(text)
        p.chmod(0o755)

    async def main() -> tuple[list[str], list[str], list[str]]:
        async with sshd, RealTransports(sshd.spec()) as t:
            sh = t.shell("h1")
            assert await missing_packages(sh, ["mount", "btrfs-progs"]) == ["btrfs-progs"]
            first = await install_packages(sh, ["mount", "btrfs-progs", "nfs-common"])
            again = await install_packages(sh, ["btrfs-progs", "nfs-common"])
            with pytest.raises(ValueError, match="invalid Debian package"):
                await install_packages(sh, ["ok", "bad;rm -rf /"])
            return first, again, await missing_packages(sh, ["btrfs-progs"])

    first, again, still = asyncio.run(main())
    assert first == ["btrfs-progs", "nfs-common"]
    assert again == [] and still == []
    log = (sshd.root / "sudo.log.apt").read_text().splitlines()
    apt = [line for line in log if line.startswith("apt-get")]
    install = (
        "apt-get install -y --no-install-recommends -- btrfs-progs nfs-common "
        "DEBIAN_FRONTEND=noninteractive"
    )
    assert apt == [install, "apt-get update DEBIAN_FRONTEND=noninteractive", install]


def test_ssh_failure_propagates_not_reported_as_missing(sshd: LocalSSHD) -> None:
    from kvmstate.errors import HostUnreachable

    async def main() -> None:
        async with sshd:
            wrong = sshd.write_wrong_known_hosts()
            async with RealTransports(sshd.spec(known_hosts=str(wrong))) as t:
                with pytest.raises(HostUnreachable, match="does not match"):
                    await check_prerequisites(t, "h1", {"libvirtd"})
                with pytest.raises(HostUnreachable, match="does not match"):
                    await check_prerequisites(t, "h1", {"btrfs", "libvirtd"})

    asyncio.run(main())
