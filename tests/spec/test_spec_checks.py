"""Hazard lints are warnings, not errors (kvmstate/checks.py), and the relation helpers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from kvmstate.checks import (
    check_spec,
    covering_mount,
    covering_subvolume,
    is_under,
    mounts_of_host,
    pool_is_shared,
    subvolumes_of_host,
)
from kvmstate.errors import Problem, SpecError
from kvmstate.loader import load_spec, parse_spec_text

SEED = Path(__file__).resolve().parents[2] / "specs" / "seed.yaml"
MakeSpec = Callable[..., str]

NFS3 = ('    nfs_version: "4.2"\n', '    nfs_version: "3"\n')
NO_PLACEMENT = ("    placement:\n      hosts: [kvm-1, kvm-2]\n", "")


def line_no(text: str, marker: str) -> int:
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if line == marker]
    assert len(hits) == 1, (marker, hits)
    return hits[0]


def warnings_of(text: str) -> list[Problem]:
    loaded = parse_spec_text(text, "w.yaml")  # warnings never raise
    assert all(w.severity == "warning" for w in loaded.warnings)
    return list(loaded.warnings)


# --- the baseline ------------------------------------------------------------------------------


def test_base_and_seed_have_no_findings(base_text: str) -> None:
    assert parse_spec_text(base_text, "base.yaml").warnings == ()
    assert load_spec(SEED).warnings == ()
    assert check_spec(load_spec(SEED).spec) == []


# --- NFSv3 + qcow2 locking ---------------------------------------------------------------------


def test_nfs3_without_nolock_under_a_qcow2_pool_warns(make_spec: MakeSpec) -> None:
    text = make_spec(NFS3)
    warnings = warnings_of(text)
    assert len(warnings) == 1
    (w,) = warnings
    assert w.loc == ("mounts", "images", "nfs_version")
    assert w.line == line_no(text, '    nfs_version: "3"')
    assert "Failed to lock byte 100" in w.message
    assert "web.qcow2" in w.message
    assert 'nfs_version: "4"' in w.message  # the fix is in the message
    assert str(w).startswith(f"w.yaml:{w.line}: mounts.images.nfs_version: warning: ")


def test_nfs3_as_yaml_number_warns_too(make_spec: MakeSpec) -> None:
    text = make_spec(('    nfs_version: "4.2"\n', "    nfs_version: 3\n"))
    assert [w.loc for w in warnings_of(text)] == [("mounts", "images", "nfs_version")]


def test_default_nfs_version_is_4_and_does_not_warn(make_spec: MakeSpec) -> None:
    text = make_spec(('    nfs_version: "4.2"\n', ""))
    assert warnings_of(text) == []


def test_nfs3_with_nolock_does_not_warn(make_spec: MakeSpec) -> None:
    text = make_spec(NFS3, ("    options: [_netdev]\n", "    options: [_netdev, nolock]\n"))
    assert warnings_of(text) == []


def test_nfs3_with_only_raw_volumes_does_not_warn(make_spec: MakeSpec) -> None:
    text = make_spec(NFS3, ("    format: qcow2\n", "    format: raw\n"))
    assert warnings_of(text) == []


def test_nfs3_mount_not_under_any_pool_does_not_warn(make_spec: MakeSpec) -> None:
    text = make_spec(
        NFS3,
        ("    mountpoint: /var/lib/libvirt/images\n", "    mountpoint: /mnt/elsewhere\n"),
        NO_PLACEMENT,
        # the pool is now a plain local directory on each host: a different warning
        ("    hosts: [kvm-1, kvm-2]\nvolumes:", "    hosts: [kvm-1]\nvolumes:"),
    )
    assert warnings_of(text) == []


def test_nfs3_mount_above_the_pool_warns(make_spec: MakeSpec) -> None:
    # The pool path is below the mountpoint: still on NFSv3.
    text = make_spec(
        NFS3, ("    mountpoint: /var/lib/libvirt/images\n", "    mountpoint: /var/lib/libvirt\n")
    )
    assert [w.loc for w in warnings_of(text)] == [("mounts", "images", "nfs_version")]


def test_nfs3_absent_mount_does_not_warn(make_spec: MakeSpec) -> None:
    text = make_spec(
        NFS3, ("    options: [_netdev]\n", "    options: [_netdev]\n    state: absent\n")
    )
    assert all("Failed to lock" not in w.message for w in warnings_of(text))


# --- migration over storage that is not shared -------------------------------------------------

LOCAL_POOL = (
    "    path: /var/lib/libvirt/images\n    hosts: [kvm-1, kvm-2]\n",
    "    path: /srv/local-images\n    hosts: [kvm-1, kvm-2]\n",
)


def test_placement_over_a_local_pool_warns(make_spec: MakeSpec) -> None:
    text = make_spec(LOCAL_POOL)
    by_loc = {w.loc: w for w in warnings_of(text)}
    w = by_loc[("domains", "web", "disks", 0, "volume")]
    assert "not shared storage" in w.message
    assert "live migration would fail" in w.message
    assert w.line == line_no(text, "      - volume: web.qcow2")
    # ... and the pool itself is flagged: each host gets its own directory.
    p = by_loc[("pools", "images", "path")]
    assert "unshared directory" in p.message
    assert p.line == line_no(text, "    path: /srv/local-images")
    assert len(by_loc) == 2


def test_placement_over_a_pool_mounted_on_one_host_only_warns(make_spec: MakeSpec) -> None:
    text = make_spec(
        ("    hosts: [kvm-1, kvm-2]\n    mountpoint", "    hosts: [kvm-1]\n    mountpoint")
    )
    locs = {w.loc for w in warnings_of(text)}
    assert ("domains", "web", "disks", 0, "volume") in locs


def test_placement_over_two_different_exports_warns(make_spec: MakeSpec) -> None:
    # kvm-1 mounts export 'images', kvm-2 mounts a different export at the same place.
    text = make_spec(
        ("    hosts: [kvm-1, kvm-2]\n    mountpoint", "    hosts: [kvm-1]\n    mountpoint"),
        (
            "pools:\n",
            "  other:\n    export: other\n    hosts: [kvm-2]\n"
            "    mountpoint: /var/lib/libvirt/images\npools:\n",
        ),
        (
            "mounts:\n",
            "  other:\n    host: store\n    path: /srv/other\n    clients:\n"
            "      - network: 10.0.0.0/24\nmounts:\n",
        ),
    )
    warnings = warnings_of(text)
    assert [w.loc for w in warnings] == [("domains", "web", "disks", 0, "volume")]


def test_no_placement_no_migration_warning(make_spec: MakeSpec) -> None:
    text = make_spec(LOCAL_POOL, NO_PLACEMENT)
    locs = {w.loc for w in warnings_of(text)}
    assert ("domains", "web", "disks", 0, "volume") not in locs


def test_absent_domain_is_not_linted(make_spec: MakeSpec) -> None:
    text = make_spec(LOCAL_POOL, ("    host: kvm-1\n", "    state: absent\n    host: kvm-1\n"))
    locs = {w.loc for w in warnings_of(text)}
    assert ("domains", "web", "disks", 0, "volume") not in locs


def test_host_that_exports_and_mounts_the_same_export_warns(make_spec: MakeSpec) -> None:
    text = make_spec(
        (
            "    hosts: [kvm-1, kvm-2]\n    mountpoint",
            "    hosts: [kvm-1, kvm-2, store]\n    mountpoint",
        )
    )
    (w,) = warnings_of(text)
    assert w.loc == ("mounts", "images", "hosts")
    assert "both exports and mounts" in w.message


def test_warnings_do_not_hide_errors(make_spec: MakeSpec) -> None:
    text = make_spec(NFS3, ("    pool: images\n", "    pool: nope\n"))
    with pytest.raises(SpecError) as info:
        parse_spec_text(text, "w.yaml")
    assert [p.severity for p in info.value.problems] == ["error"]


# --- relation helpers --------------------------------------------------------------------------


def test_is_under() -> None:
    assert is_under("/a/b", "/a")
    assert is_under("/a", "/a")
    assert is_under("/a/b", "/")
    assert not is_under("/ab", "/a")
    assert not is_under("/a", "/a/b")


def test_covering_helpers_on_the_seed() -> None:
    spec = load_spec(SEED).spec
    assert covering_subvolume(spec, "xcloud", "/nfs/images/x.qcow2") == "images"
    assert covering_subvolume(spec, "devstack-1", "/nfs/images") is None
    assert covering_mount(spec, "devstack-1", "/var/lib/libvirt/images") == "images"
    assert covering_mount(spec, "xcloud", "/var/lib/libvirt/images") is None
    assert pool_is_shared(spec, "images", ["devstack-1", "devstack-2"])
    assert not pool_is_shared(spec, "images", ["devstack-1", "xcloud"])
    assert list(mounts_of_host(spec, "devstack-2")) == ["images"]
    assert mounts_of_host(spec, "xcloud") == {}
    assert list(subvolumes_of_host(spec, "xcloud")) == ["images"]


def test_covering_mount_prefers_the_deepest(make_spec: MakeSpec) -> None:
    text = make_spec(
        (
            "pools:\n",
            "  deep:\n    export: images\n    hosts: [kvm-1]\n"
            "    mountpoint: /var/lib/libvirt/images/deep\npools:\n",
        )
    )
    spec = parse_spec_text(text, "d.yaml").spec
    assert covering_mount(spec, "kvm-1", "/var/lib/libvirt/images/deep/x") == "deep"
    assert covering_mount(spec, "kvm-2", "/var/lib/libvirt/images/deep/x") == "images"


def test_a_single_client_address_is_a_valid_export_client() -> None:
    from kvmstate.spec import ExportClient

    assert ExportClient(network="10.77.0.11").network == "10.77.0.11"
    assert ExportClient(network="fe80::1").network == "fe80::1"
    with pytest.raises(ValueError, match="not a valid IPv4 address"):
        ExportClient(network="10.77.0.300")
