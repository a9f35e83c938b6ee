"""Lab pieces that need no root: parsers, renderers, argument handling (no lab marker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmstate.lab import exportfs, guest, nfsfuse, specgen
from kvmstate.lab.config import LabConfig

REPO = Path(__file__).resolve().parents[2]


def test_topology_addresses() -> None:
    cfg = LabConfig(kvm_hosts=3)
    assert [(h.name, h.role, h.address) for h in cfg.hosts] == [
        ("storage", "storage", "10.77.0.10"),
        ("kvm-1", "kvm", "10.77.0.11"),
        ("kvm-2", "kvm", "10.77.0.12"),
        ("kvm-3", "kvm", "10.77.0.13"),
    ]
    assert cfg.host("10.77.0.12").name == "kvm-2"
    with pytest.raises(ValueError):
        LabConfig(kvm_hosts=1)


def test_checked_in_specs_match_the_generator() -> None:
    cfg = LabConfig()
    assert (REPO / "specs" / "lab.yaml").read_text() == specgen.render_spec(cfg)
    assert (REPO / "specs" / "lab-migrated.yaml").read_text() == specgen.render_spec(cfg, "kvm-2")


def test_generated_spec_follows_dir_and_hosts(tmp_path: Path) -> None:
    text = specgen.render_spec(LabConfig(dir=tmp_path, kvm_hosts=3))
    assert f"identity: {tmp_path}/id_ed25519" in text
    assert "kvm-3: {address: 10.77.0.13}" in text
    assert "hosts: [kvm-1, kvm-2, kvm-3]" in text


def test_known_hosts_names_every_host_by_address_and_name() -> None:
    cfg = LabConfig()
    text = specgen.render_known_hosts(cfg, {h.name: f"KEY{h.name}" for h in cfg.hosts})
    assert text.splitlines()[1] == "10.77.0.11,kvm-1 ssh-ed25519 KEYkvm-1"


def test_exports_parse_and_verbose_format() -> None:
    text = (
        "# comment\n"
        "/srv/images 10.77.0.0/24(rw,sync,no_root_squash,no_subtree_check)\n"
        "/srv/a/rather/long/path -ro 10.77.0.11 \\\n  *(rw,insecure,all_squash,anonuid=7)\n"
    )
    entries = exportfs.parse_exports(text)
    assert [(e.path, e.client) for e in entries] == [
        ("/srv/images", "10.77.0.0/24"),
        ("/srv/a/rather/long/path", "10.77.0.11"),
        ("/srv/a/rather/long/path", "*"),
    ]
    assert exportfs.format_list(entries, verbose=True) == (
        "/srv/images   \t10.77.0.0/24(sync,wdelay,hide,no_subtree_check,sec=sys,rw,secure,"
        "no_root_squash,no_all_squash)\n"
        "/srv/a/rather/long/path\n\t\t10.77.0.11(sync,wdelay,hide,no_subtree_check,sec=sys,ro,"
        "secure,root_squash,no_all_squash)\n"
        "/srv/a/rather/long/path\n\t\t<world>(sync,wdelay,hide,no_subtree_check,anonuid=7,"
        "sec=sys,rw,insecure,root_squash,all_squash)\n"
    )
    assert exportfs.format_list(entries[:1], verbose=False) == "/srv/images   \t10.77.0.0/24\n"


def test_ganesha_export_allows_only_listed_clients() -> None:
    conf = exportfs.render_ganesha(
        exportfs.parse_exports("/srv/images 10.77.0.0/24(rw,no_root_squash)\n")
    )
    assert "Access_Type = None;" in conf  # everyone else: no access
    assert "Clients = 10.77.0.0/24;" in conf
    assert "Access_Type = RW;" in conf and "Squash = No_Root_Squash;" in conf
    with pytest.raises(ValueError):
        exportfs.render_ganesha([exportfs.Export("/x", "a;b}", ())])


@pytest.mark.parametrize(
    ("prog", "args"),
    [
        ("/sbin/mount.nfs", ["h:/p", "/mnt", "-o", "vers=4"]),
        ("/sbin/mount.nfs", ["h:/p", "/mnt", "-o", "rw,nfsvers=4.1"]),
        ("/sbin/mount.nfs4", ["h:/p", "/mnt"]),
    ],
)
def test_mount_nfs_refuses_v4(prog: str, args: list[str]) -> None:
    with pytest.raises(nfsfuse.MountError) as exc:
        nfsfuse.parse_mount_args(prog, args)
    assert exc.value.code == 32
    assert "NFSv3 only" in str(exc.value)


def test_mount_nfs_arguments_as_mount8_passes_them() -> None:
    req = nfsfuse.parse_mount_args(
        "/sbin/mount.nfs",
        ["10.77.0.10:/srv/images", "/var/lib/libvirt/images", "-o", "rw,vers=3,nolock,_netdev"],
    )
    assert str(req.source) == "10.77.0.10:/srv/images"
    assert req.mountpoint == "/var/lib/libvirt/images"
    assert not req.read_only
    assert "nolock" in req.options


def test_counter_parsers() -> None:
    assert guest.parse_serial_counter("boot\nkvmstate-counter 3\nkvmstate-counter 41\n") == 41
    assert guest.parse_serial_counter("nothing yet") is None
    assert guest.parse_disk_counter(b"KVMSTATE-COUNTER 12\n" + b"\0" * 40) == 12
    assert guest.parse_disk_counter(b"\0" * 64) is None


def test_cli_refuses_without_root(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvmstate.lab import cli

    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert cli.main(["down"]) == 1
    assert "root" in capsys.readouterr().err


def test_status_json_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from kvmstate.lab import cli

    assert cli.main(["--dir", str(tmp_path), "status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["up"] is False and data["dir"] == str(tmp_path)
    assert [(h["name"], h["role"], h["address"]) for h in data["hosts"]][:2] == [
        ("storage", "storage", "10.77.0.10"),
        ("kvm-1", "kvm", "10.77.0.11"),
    ]
