"""Lab pieces that need no root: parsers, renderers, argument handling (no lab marker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmstate.lab import exportfs, guest, image, nfsfuse, specgen
from kvmstate.lab.config import LabConfig
from kvmstate.lab.proc import LabError

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"


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


def test_counter_readings_carry_the_boot_id() -> None:
    text = "kvmstate-counter 40 boot=0a1b2c3d\nkvmstate-counter 41 boot=0a1b2c3d\n"
    assert guest.parse_serial_reading(text) == guest.CounterReading(41, "0a1b2c3d")
    assert guest.parse_serial_counter(text) == 41
    assert guest.parse_serial_reading("kvmstate-counter 7\n") == guest.CounterReading(7, None)
    record = b"KVMSTATE-COUNTER 12 boot=0a1b2c3d\n" + b"\0" * 40
    assert guest.parse_disk_reading(record) == guest.CounterReading(12, "0a1b2c3d")
    assert guest.parse_disk_counter(record) == 12
    assert str(guest.CounterReading(12, "0a1b2c3d")) == "12 (boot 0a1b2c3d)"


def test_disk_guest_serial_log_two_boots() -> None:
    """Two real boots of the disk guest in one serial file (captured, see fixtures/README)."""
    text = (FIXTURES / "guest-disk-serial.txt").read_text(errors="replace")
    first, second = guest.parse_boots(text)
    assert first.boot == "75c6f45d"
    assert first.hostname == "guest-one"  # user-data's hostname wins over meta-data
    assert first.addresses == ["10.0.2.15"]
    assert (first.first_counter, first.counter, first.resumed_from) == (1, 36, None)
    assert first.dirty_mib == 4 and first.clean_shutdown
    assert second.boot == "2aef5de7"
    assert second.hostname == "meta-only"  # meta-data only (quoted, CRLF)
    assert second.resumed_from == 36 and second.first_counter == 37
    assert second.dirty_mib == 16 and not second.addresses and not second.clean_shutdown
    # the last boot is what the single-value readers report
    assert guest.parse_serial_reading(text) == guest.CounterReading(second.counter or 0, "2aef5de7")
    assert guest.parse_hostname(text) == "meta-only"
    assert guest.parse_address(text) is None
    assert not guest.parse_clean_shutdown(text)
    cut = text.index("kvmstate-guest: clean shutdown") + 40
    assert guest.parse_clean_shutdown(text[:cut])
    assert guest.parse_address(text[:cut]) == "10.0.2.15"


def test_a_log_read_from_its_tail_starts_mid_boot() -> None:
    text = (
        "nter 9 boot=aaaaaaaa\nkvmstate-counter 10 boot=aaaaaaaa\n"
        "kvmstate-guest: clean shutdown\n[   40.4] reboot: Power down\n"
        "kvmstate-guest: hostname b\n"  # a new boot whose "booted" line was cut off
        "kvmstate-counter 11 boot=bbbbbbbb\n"
    )
    boots = guest.parse_boots(text)
    assert [(b.boot, b.counter, b.clean_shutdown) for b in boots] == [
        ("aaaaaaaa", 10, True),
        ("bbbbbbbb", 11, False),
    ]
    assert boots[1].hostname == "b"
    # the kernel-boot guest has no hostname/shutdown lines: one boot per boot id
    old = "kvmstate-counter 5 boot=11111111\nkvmstate-counter 1 boot=22222222\n"
    assert [(b.boot, b.counter) for b in guest.parse_boots(old)] == [
        ("11111111", 5),
        ("22222222", 1),
    ]


def test_qemu_io_hex_dump() -> None:
    out = (
        "000ffe00:  4b 56 4d 53 54 41 54 45 2d 43 4f 55 4e 54 45 52  KVMSTATE.COUNTER\n"
        "000ffe10:  20 33 36 20 62 6f 6f 74 3d 37 35 63 36 66 34 35  .36.boot.75c6f45\n"
        "000ffe20:  64 0a 00 00 00 00 00 00 00 00 00 00 00 00 00 00  d...............\n"
        "read 48/48 bytes at offset 0xffe00\n"
    )
    data = guest.parse_qemu_io_read(out)
    assert guest.parse_disk_reading(data) == guest.CounterReading(36, "75c6f45d")
    assert image.COUNTER_OFFSET == 0xFFE00 and image.COUNTER_OFFSET in guest.DISK_COUNTER_OFFSETS


def test_mbr_has_one_active_partition_after_the_counter_gap() -> None:
    sector = image.mbr(b"\xfa" * 440, image.PARTITION_START, 260096, image.FAT16_LBA, 0x1234)
    assert len(sector) == 512 and sector[:440] == b"\xfa" * 440
    assert image.parse_mbr_partitions(sector) == [(True, 0x0E, 2048, 260096)]
    assert image.COUNTER_SECTOR < image.PARTITION_START  # the gap, not the MBR or the FS
    assert image.COUNTER_SECTOR != 0
    assert sector[446 + 1 : 446 + 4] == bytes((32, 33, 0))  # CHS of LBA 2048 in 255/63
    with pytest.raises(ValueError):
        image.mbr(b"x" * 441, 2048, 1, 0x0E, 0)


def test_module_order_puts_dependencies_first() -> None:
    ko = b"\x7fELF...\0license=GPL\0depends=scsi_mod,cdrom,scsi-common\0name=sr_mod\0"
    assert image.module_depends(ko) == ["scsi_mod", "cdrom", "scsi_common"]
    assert image.module_depends(b"\0depends=\0name=cdrom\0") == []
    deps = {
        "sr_mod": ["scsi_mod", "cdrom", "scsi_common"],
        "scsi_mod": ["scsi_common"],
        "scsi_common": [],
        "cdrom": [],
        "isofs": ["cdrom"],
    }
    order = image.module_order(["isofs", "sr_mod"], deps)
    assert order == ["cdrom", "isofs", "scsi_common", "scsi_mod", "sr_mod"]
    assert image.module_order(["isofs"], {"isofs": ["cdrom"]}, frozenset({"cdrom"})) == ["isofs"]
    with pytest.raises(LabError, match=r"button .*not in the kernel package"):
        image.module_order(["button"], deps)
    with pytest.raises(LabError, match=r"t10_pi \(needed by sd_mod\)"):
        image.module_order(["sd_mod"], {"sd_mod": ["t10_pi"]})


def test_boot_config_carries_the_dirty_rate() -> None:
    cfg = image.syslinux_cfg(image.kernel_cmdline(32))
    assert image.parse_syslinux_append(cfg) == "console=ttyS0,115200 kvmstate.dirty=32"
    assert "INITRD /initrd.img" in cfg and "PROMPT 0" in cfg
    assert "kvmstate.dirty=4" in image.kernel_cmdline()
    with pytest.raises(ValueError):
        image.kernel_cmdline(-1)


@pytest.mark.parametrize(
    "script", [image.INIT, image.POWER_BUTTON, image.UDHCPC_SCRIPT, guest.INIT], ids=str.__len__
)
def test_guest_scripts_parse_as_posix_sh(script: str) -> None:
    import shutil
    import subprocess

    sh = shutil.which("busybox") or shutil.which("dash") or "sh"
    argv = [sh, "sh", "-n"] if sh.endswith("busybox") else [sh, "-n"]
    proc = subprocess.run(argv, input=script, text=True, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_disk_guest_prints_what_the_readers_parse() -> None:
    """The init's own lines match the readers (the boot test proves them on real QEMU)."""
    assert 'say "hostname $NAME"' in image.INIT and "say() {" in image.INIT
    assert f'echo "{image.GUEST_PREFIX} clean shutdown"' in image.POWER_BUTTON
    assert f'echo "{image.GUEST_PREFIX} address $ip"' in image.UDHCPC_SCRIPT
    assert 'echo "kvmstate-counter $n boot=$BOOT"' in image.INIT
    assert "kvmstate.dirty=*" in image.INIT and "kvmstate_dirty" in image.INIT


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


# Lab power (issue 19): the fence agent's arguments, exit codes and state file -------------


@pytest.fixture
def fake_netns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Hosts' network namespaces as files under tmp_path (the real /run/netns is never read)."""
    from kvmstate.lab.config import HostConfig

    ns_dir = tmp_path / "netns"
    ns_dir.mkdir()
    monkeypatch.setattr(HostConfig, "netns_path", property(lambda self: ns_dir / self.netns))
    return ns_dir


def test_fence_agent_arguments() -> None:
    import io

    from kvmstate.lab.power import parse_fence_args

    def parsed(*argv: str, stdin: str | None = None) -> tuple[str | None, str]:
        ns = parse_fence_args(argv, io.StringIO(stdin) if stdin is not None else None)
        return ns.plug, ns.action

    assert parsed("kvm-1", "off") == ("kvm-1", "off")
    assert parsed("kvm-1", "status") == ("kvm-1", "status")
    assert parsed("--action=off", "--plug=kvm-2") == ("kvm-2", "off")
    assert parsed("-n", "kvm-2", "-o", "on") == ("kvm-2", "on")
    assert parsed("--port", "kvm-2", "status") == ("kvm-2", "status")
    assert parsed(stdin="action=status\nplug=kvm-1\n") == ("kvm-1", "status")
    assert parsed("kvm-1") == ("kvm-1", "reboot")  # fence-agents' default action
    with pytest.raises(SystemExit):
        parsed("kvm-1", "explode")
    with pytest.raises(SystemExit):
        parsed("kvm-1", "off", "extra")


def test_fence_agent_status_exit_codes_follow_the_state_file(
    tmp_path: Path, fake_netns: Path
) -> None:
    import io

    from kvmstate.lab import power

    cfg = LabConfig(dir=tmp_path / "lab")

    def agent(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        ns = power.parse_fence_args(["--dir", str(cfg.dir), *argv])
        code = power.fence(ns.dir, ns.plug, ns.action, out=out, err=err)
        return code, out.getvalue().strip(), err.getvalue().strip()

    # The lab is down (no namespaces): every host is off.
    assert agent("kvm-1", "status") == (2, "Status: OFF", "")
    for h in cfg.hosts:
        (fake_netns / h.netns).touch()
    cfg.save()  # as `lab up` does: no power recorded yet, so on
    assert agent("kvm-1", "status") == (0, "Status: ON", "")
    power.record_power(cfg, {"kvm-1": power.OFF, "kvm-2": power.ISOLATED})
    assert agent("kvm-1", "status") == (2, "Status: OFF", "")
    assert agent("kvm-2", "status") == (0, "Status: ON", "")  # partitioned is not off
    assert power.power_state(cfg, cfg.host("kvm-2")) == power.ISOLATED
    assert power.power_state(cfg, cfg.host("storage")) == power.ON
    code, out, err = agent("kvm-9", "status")
    assert (code, out) == (1, "") and err.startswith("Failed: no lab host 'kvm-9'")
    assert agent("kvm-1", "list")[1].splitlines() == [
        "storage,10.77.0.10",
        "kvm-1,10.77.0.11",
        "kvm-2,10.77.0.12",
    ]
    # record_power keeps the other keys of state.json (kvm_hosts is what `lab` reloads).
    power.record_power(cfg, {"kvm-1": power.ON})
    assert LabConfig.load(cfg.dir).kvm_hosts == 2
    assert power.recorded_power(cfg) == {"storage": "on", "kvm-1": "on", "kvm-2": "isolated"}


def test_lab_state_file_records_every_hosts_power(tmp_path: Path, fake_netns: Path) -> None:
    from kvmstate.lab import power
    from kvmstate.lab.lab import Lab

    lab = Lab(tmp_path / "lab")
    lab.cfg.save()
    lab._write_state(up=True)
    assert power.recorded_power(lab.cfg) == {"storage": "on", "kvm-1": "on", "kvm-2": "on"}
    lab._write_state(up=False)
    assert set(power.recorded_power(lab.cfg).values()) == {"off"}


def test_fence_agent_script(tmp_path: Path) -> None:
    from kvmstate.lab import power

    text = power.render_fence_agent("/opt/venv/bin/python", tmp_path)
    assert text.startswith("#!/opt/venv/bin/python\n")
    assert f"fence_main(['--dir', {str(tmp_path)!r}, *sys.argv[1:]])" in text
    compile(text, "fence-agent", "exec")
