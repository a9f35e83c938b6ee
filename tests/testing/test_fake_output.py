"""The fake cluster itself: it prints what the real commands print, reads the files it
simulates with readers of its own, and kvmstate's parsers read its output back."""

from __future__ import annotations

import ast
from pathlib import Path

from kvmstate import hostfacts, nfsexports
from kvmstate.testing.fake import FakeCluster
from kvmstate.testing.fake_cmds import FakeMount, exportfs_options, read_exports, read_fstab

TESTING = Path(__file__).resolve().parents[2] / "kvmstate" / "testing"


def test_the_fake_uses_none_of_kvmstates_parsers_or_libvirt_helpers() -> None:
    allowed = {("kvmstate.nfsexports", "EXPORTS_D_SCRIPT")}  # the command it answers, no parser
    for path in TESTING.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in (
                "kvmstate.hostfacts",
                "kvmstate.nfsexports",
                "kvmstate.virtxml",
            ):
                assert {(node.module, a.name) for a in node.names} <= allowed, path.name
            if isinstance(node, ast.ImportFrom) and node.module == "kvmstate":
                names = {a.name for a in node.names}
                assert not names & {"hostfacts", "nfsexports", "virtxml"}, path.name


def test_exportfs_v_prints_like_nfs_utils_and_kvmstate_parses_it() -> None:
    cluster = FakeCluster({"s": "10.0.0.1"})
    s = cluster["s"]
    s.exports_live = {
        ("/srv/a b", "10.0.0.0/24"): frozenset({"rw", "no_root_squash"}),
        ("/srv/x", "*"): frozenset(),
    }
    out = s.execute(["exportfs", "-v"]).stdout
    assert out == (
        "/srv/a\\040b   \t10.0.0.0/24(sync,wdelay,hide,no_subtree_check,sec=sys,rw,secure,"
        "no_root_squash,no_all_squash)\n"
        "/srv/x        \t<world>(sync,wdelay,hide,no_subtree_check,sec=sys,ro,secure,"
        "root_squash,no_all_squash)\n"
    )
    table = nfsexports.parse_exportfs_v(out)
    assert set(table) == {("/srv/a b", "10.0.0.0/24"), ("/srv/x", "*")}
    assert {"rw", "no_root_squash", "sync"} <= table[("/srv/a b", "10.0.0.0/24")]


def test_exportfs_options_subtree_check_is_shown_by_its_absence() -> None:
    assert "subtree_check" not in exportfs_options(("subtree_check",)).split(",")
    assert "no_subtree_check" in exportfs_options(()).split(",")


def test_mountinfo_escapes_like_the_kernel_and_kvmstate_reads_it_back() -> None:
    cluster = FakeCluster({"k": "10.0.0.2"})
    k = cluster["k"]
    k.mounts.append(FakeMount("10.0.0.1:/srv/a b", "/mnt/a b", "nfs4", ("rw",)))
    text = k.execute(["cat", "--", "/proc/self/mountinfo"]).stdout
    assert "/mnt/a\\040b" in text and "10.0.0.1:/srv/a\\040b" in text
    m = hostfacts.mounted_at(hostfacts.parse_mountinfo(text), "/mnt/a b")
    assert m is not None and m.source == "10.0.0.1:/srv/a b"


def test_the_fakes_own_readers() -> None:
    assert (
        read_fstab("# c\nUUID=1 / ext4 defaults 0 1\n/dev/x /mnt/a\\040b btrfs\n")[1]
        == (read_fstab("/dev/x /mnt/a\\040b btrfs")[0])
    )
    assert read_fstab("/dev/x /mnt/a\\040b btrfs")[0].mountpoint == "/mnt/a b"
    text = '"/srv/q x" -rw h1(sync) \\\n  h2\n/srv/p\\040q *(ro) # comment\n/srv/bare\n'
    assert read_exports(text) == [
        ("/srv/q x", "h1", ("rw", "sync")),
        ("/srv/q x", "h2", ("rw",)),
        ("/srv/p q", "*", ("ro",)),
        ("/srv/bare", "*", ()),
    ]
