"""Pure parsers against captured output (see tests/fixtures/README.md for each file's source)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmstate import hostfacts, nfsexports, virtxml
from kvmstate.errors import ParseError
from kvmstate.transport.base import CommandResult

FIX = Path(__file__).resolve().parent.parent / "fixtures"


def text(name: str) -> str:
    return (FIX / name).read_text()


def test_mountinfo_btrfs_subvolume_and_top_level() -> None:
    mounts = hostfacts.parse_mountinfo(text("mountinfo.btrfs.txt"))
    top = hostfacts.mounted_at(mounts, "/tmp/kvst-top")
    img = hostfacts.mounted_at(mounts, "/tmp/kvst-img")
    assert top is not None and img is not None
    assert (top.fstype, top.source, top.root) == ("btrfs", "/dev/loop0", "/")
    assert top.super_option("subvolid") == "5"
    assert (img.root, img.super_option("subvol"), img.super_option("subvolid")) == (
        "/images",
        "/images",
        "256",
    )
    assert "noatime" in img.options and "noatime" not in top.options


def test_mountinfo_host_root_and_every_line_parsed() -> None:
    raw = text("mountinfo.host.txt")
    mounts = hostfacts.parse_mountinfo(raw)
    assert len(mounts) == len([ln for ln in raw.splitlines() if ln.strip()])
    assert hostfacts.mounted_at(mounts, "/") is not None
    assert hostfacts.mounted_at(mounts, "/no/such/mountpoint") is None


def test_mountinfo_octal_escapes_and_garbage() -> None:
    line = "36 25 0:32 / /mnt/with\\040space rw,relatime - nfs 10.0.0.1:/srv/a\\040b rw,vers=3\n"
    (m,) = hostfacts.parse_mountinfo(line)
    assert m.mountpoint == "/mnt/with space" and m.source == "10.0.0.1:/srv/a b"
    assert m.super_option("vers") == "3"
    with pytest.raises(ParseError):
        hostfacts.parse_mountinfo("this is not mountinfo\n")


def test_btrfs_subvolume_list_real_output() -> None:
    assert hostfacts.parse_btrfs_list(text("btrfs-subvolume-list.txt")) == {
        "images": 256,
        "other": 257,
        "images/nested": 258,
    }
    with pytest.raises(ParseError):
        hostfacts.parse_btrfs_list("ERROR: not a btrfs filesystem\n")


def test_fstab_parse_and_edit_keeps_other_lines_byte_for_byte() -> None:
    original = text("fstab.host.txt") + "# a comment\n/dev/sdb1\t/data  ext4 defaults 0 2\n"
    line = "LABEL=x /srv/images btrfs subvol=images,noatime 0 0"
    added = hostfacts.fstab_with(original, "/srv/images", line)
    assert added == original + line + "\n"
    changed = hostfacts.fstab_with(added, "/srv/images", line.replace("noatime", "relatime"))
    assert changed == original + line.replace("noatime", "relatime") + "\n"
    assert hostfacts.fstab_with(changed, "/srv/images", None) == original
    entry = hostfacts.fstab_entry_for(added, "/srv/images")
    assert entry is not None and entry.options == ("subvol=images", "noatime")
    assert hostfacts.fstab_entry_for(added, "/data") is not None


def test_fstab_append_to_file_without_final_newline() -> None:
    assert hostfacts.fstab_with("a /b ext4 defaults 0 0", "/c", "x /c nfs vers=3 0 0") == (
        "a /b ext4 defaults 0 0\nx /c nfs vers=3 0 0\n"
    )


def test_exports_file_forms() -> None:
    lines = nfsexports.parse_exports(text("exports.sample.txt"))
    by_path = {ln.path: ln.clients for ln in lines}
    assert by_path["/srv/images"] == (
        ("10.77.0.0/24", ("rw", "sync", "no_root_squash", "no_subtree_check")),
    )
    assert by_path["/srv/backup"] == (
        ("backup.example", ("ro", "sync", "rw")),
        ("10.0.0.0/8", ("ro", "sync")),
    )
    assert by_path["/srv/with space"] == (("*", ("ro",)),)
    assert "/srv/octal name" in by_path


def test_exports_edit_keeps_other_lines() -> None:
    original = text("exports.sample.txt")
    new = nfsexports.exports_with(original, "/srv/images", "/srv/images 10.0.0.0/8(ro)")
    assert new == original.replace(
        "/srv/images 10.77.0.0/24(rw,sync,no_root_squash,no_subtree_check)",
        "/srv/images 10.0.0.0/8(ro)",
    )
    assert nfsexports.exports_with(new, "/srv/new", "/srv/new *(ro)").endswith("/srv/new *(ro)\n")


def test_exportfs_v_wrapped_paths_world_and_implied_defaults() -> None:
    table = nfsexports.parse_exportfs_v(text("exportfs-v.nfs-utils.txt"))
    assert set(table) == {
        ("/srv/images", "10.77.0.0/24"),
        ("/srv/a-much-longer-export/path", "192.168.122.0/24"),
        ("/srv/a-much-longer-export/path", "*"),
        ("/srv/old", "client.example"),
    }
    assert {"rw", "sync", "no_root_squash", "no_subtree_check"} <= table[
        ("/srv/images", "10.77.0.0/24")
    ]
    assert "async" in table[("/srv/a-much-longer-export/path", "192.168.122.0/24")]
    assert "sync" not in table[("/srv/a-much-longer-export/path", "192.168.122.0/24")]
    # an older exportfs omits sync/secure: they are implied by the absence of async/insecure
    assert {"sync", "secure", "rw"} <= table[("/srv/old", "client.example")]
    with pytest.raises(ParseError):
        nfsexports.parse_exportfs_v("\t\tclient(rw)\n")


def test_exports_d_script_output() -> None:
    out = "==> /etc/exports.d/a.exports <==\n/srv/x *(ro)\n==> /etc/exports.d/b.exports <==\n"
    lines = nfsexports.parse_exports_d(out)
    assert [(ln.path, ln.source) for ln in lines] == [("/srv/x", "/etc/exports.d/a.exports")]


def test_device_fact_parsers() -> None:
    fact = hostfacts.device_fact("LABEL=kvstest")
    assert fact.argv == ("blkid", "-o", "device", "-t", "LABEL=kvstest")
    ok = CommandResult("h", fact.argv, 0, "/dev/loop0\n", "")
    assert fact.parse(ok) == "/dev/loop0"
    assert fact.parse(CommandResult("h", fact.argv, 2, "", "")) is None
    with pytest.raises(ParseError):
        fact.parse(CommandResult("h", fact.argv, 4, "", "blkid: error"))
    assert hostfacts.device_fact("/dev/sda3").argv == ("readlink", "-e", "--", "/dev/sda3")
    blkid = dict(ln.split("=", 1) for ln in text("blkid-export.txt").split())
    assert blkid["TYPE"] == "btrfs" and blkid["LABEL"] == "kvstest"


def test_file_fact_missing_vs_failing() -> None:
    fact = hostfacts.file_fact("/etc/exports")
    missing = CommandResult("h", fact.argv, 1, "", "cat: /etc/exports: No such file or directory")
    assert fact.parse(missing) is None
    with pytest.raises(ParseError):
        fact.parse(CommandResult("h", fact.argv, 1, "", "cat: /etc/exports: Permission denied"))


def test_bridges_and_meminfo() -> None:
    out = (
        "3: br0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP mode DEFAULT "
        "group default qlen 1000\\    link/ether 52:54:00:12:34:56 brd ff:ff:ff:ff:ff:ff\n"
        "7: virbr0: <NO-CARRIER,BROADCAST,MULTICAST,UP> mtu 1500\\    link/ether aa\n"
    )
    assert hostfacts.parse_bridges(out) == {"br0", "virbr0"}
    assert hostfacts.parse_meminfo_available("MemTotal: 1 kB\nMemAvailable:  2048 kB\n") == 2 << 20


def test_libvirt_domain_xml_roundtrip() -> None:
    inactive = virtxml.parse_domain_xml(text("libvirt-test-domain-inactive.xml"))
    assert inactive.managed and inactive.type == "qemu"
    assert (inactive.memory_kib, inactive.current_kib, inactive.vcpus) == (131072, 131072, 1)
    assert inactive.kernel == "/var/lib/kvmstate/vmlinuz" and inactive.cmdline == "console=ttyS0"
    (disk,) = inactive.disks
    assert (disk.path, disk.format, disk.bus, disk.cache, disk.target) == (
        "/var/lib/libvirt/images/guest.qcow2",
        "qcow2",
        "virtio",
        "none",
        "vda",
    )
    (nic,) = inactive.nics
    assert (nic.kind, nic.source, nic.model) == ("bridge", "br0", "virtio") and nic.mac
    assert inactive.serial == ("file", "/var/log/libvirt/qemu/guest-serial.log")
    live = virtxml.parse_domain_xml(text("libvirt-test-domain-live.xml"))
    assert (live.memory_kib, live.current_kib) == (131072, 65536)


def test_unmanaged_domain_has_no_marker() -> None:
    stock = virtxml.parse_domain_xml(text("libvirt-test-default-domain.xml"))
    assert not stock.managed and stock.firmware == "bios"


def test_pool_and_volume_xml() -> None:
    assert virtxml.parse_pool_path(text("libvirt-test-pool.xml")) == "/var/lib/libvirt/images"
    vol = virtxml.parse_volume_xml(text("libvirt-test-volume.xml"))
    assert (vol.path, vol.format, vol.capacity) == (
        "/var/lib/libvirt/images/guest.qcow2",
        "qcow2",
        64 * 2**20,
    )
