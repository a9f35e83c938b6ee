"""The seed spec is part of kvmstate's interface contract: it must validate exactly as written."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmstate.loader import LoadedSpec, load_spec, parse_spec_text
from kvmstate.spec import Spec

REPO = Path(__file__).resolve().parents[2]
SEED = REPO / "specs" / "seed.yaml"
SHARED_SEED = REPO.parent / "shared" / "spec-contract" / "seed.yaml"

GiB = 1024**3


@pytest.fixture(scope="module")
def loaded() -> LoadedSpec:
    return load_spec(SEED)


@pytest.fixture(scope="module")
def spec(loaded: LoadedSpec) -> Spec:
    return loaded.spec


def test_seed_is_the_shared_contract_byte_for_byte() -> None:
    assert SEED.is_file(), "specs/seed.yaml is missing"
    if not SHARED_SEED.is_file():
        pytest.skip(f"{SHARED_SEED} is not present in this environment")
    assert SEED.read_bytes() == SHARED_SEED.read_bytes()


def test_seed_validates_without_errors_or_warnings(loaded: LoadedSpec) -> None:
    assert loaded.path == str(SEED)
    assert loaded.warnings == ()


def test_seed_validates_from_text_too() -> None:
    loaded = parse_spec_text(SEED.read_text(encoding="utf-8"), "specs/seed.yaml")
    assert loaded.warnings == ()


def test_seed_section_counts(spec: Spec) -> None:
    assert spec.version == 1
    assert sorted(spec.hosts) == ["devstack-1", "devstack-2", "xcloud"]
    assert list(spec.subvolumes) == ["images"]
    assert list(spec.exports) == ["images"]
    assert list(spec.mounts) == ["images"]
    assert list(spec.pools) == ["images"]
    assert list(spec.volumes) == ["nested-ubuntu18.04.qcow2"]
    assert list(spec.domains) == ["nested-ubuntu18.04"]
    assert len(spec.exports["images"].clients) == 1
    dom = spec.domains["nested-ubuntu18.04"]
    assert len(dom.disks) == 1
    assert len(dom.interfaces) == 1


def test_seed_values(spec: Spec) -> None:
    assert spec.hosts["xcloud"].address == "192.168.122.1"
    assert spec.hosts["devstack-1"].address == "192.168.122.21"
    assert spec.hosts["devstack-2"].address == "192.168.122.22"

    sv = spec.subvolumes["images"]
    assert (sv.host, sv.device, sv.mountpoint) == ("xcloud", "/dev/sda3", "/nfs/images")
    assert sv.mount_options == ["defaults", "noatime"]

    ex = spec.exports["images"]
    assert (ex.host, ex.path) == ("xcloud", "/nfs/images")
    assert ex.clients[0].network == "192.168.122.0/24"
    assert ex.clients[0].options == ["rw", "sync", "no_root_squash", "no_subtree_check"]

    m = spec.mounts["images"]
    assert m.export == "images"
    assert m.hosts == ["devstack-1", "devstack-2"]
    assert m.mountpoint == "/var/lib/libvirt/images"
    assert m.nfs_version == "4"
    assert m.options == ["_netdev", "auto"]

    p = spec.pools["images"]
    assert (p.type, p.path, p.autostart) == ("dir", "/var/lib/libvirt/images", True)
    assert p.hosts == ["devstack-1", "devstack-2"]

    v = spec.volumes["nested-ubuntu18.04.qcow2"]
    assert (v.pool, v.format, v.owner, v.group) == ("images", "qcow2", "libvirt-qemu", "kvm")
    assert v.capacity == 16 * GiB

    d = spec.domains["nested-ubuntu18.04"]
    assert d.vcpus == 1
    assert d.state == "running"
    assert d.host == "devstack-1"
    assert d.disks[0].volume == "nested-ubuntu18.04.qcow2"
    assert (d.disks[0].bus, d.disks[0].cache) == ("virtio", "none")
    assert (d.interfaces[0].bridge, d.interfaces[0].model) == ("virbr0", "virtio")
    assert d.allowed_hosts() == ["devstack-1"]


def test_seed_memory_is_two_gib_as_an_int(spec: Spec) -> None:
    memory = spec.domains["nested-ubuntu18.04"].memory
    assert memory == 2 * GiB
    assert type(memory) is int


def test_seed_durations_are_typed(spec: Spec) -> None:
    mig = spec.domains["nested-ubuntu18.04"].migration
    assert mig is not None
    assert isinstance(mig.max_downtime, float)
    assert isinstance(mig.timeout, float)
    assert mig.max_downtime == pytest.approx(0.3)
    assert mig.timeout == 600.0
    merged = spec.migration_for("nested-ubuntu18.04")
    assert merged.max_downtime == pytest.approx(0.3)
    assert merged.timeout == 600.0


def test_seed_ssh_defaults(spec: Spec) -> None:
    for host in spec.hosts:
        s = spec.ssh_for(host)
        assert s.user == "root"
        assert s.port == 22
        assert s.verify_host_key is True
        assert s.sudo is False
        assert s.identity is None


def test_seed_lines_point_into_the_file(loaded: LoadedSpec) -> None:
    text = SEED.read_text(encoding="utf-8").splitlines()
    line = loaded.line_of(("domains", "nested-ubuntu18.04", "memory"))
    assert line is not None
    assert text[line - 1].strip() == "memory: 2GiB"
    line = loaded.line_of(("mounts", "images", "nfs_version"))
    assert line is not None
    assert text[line - 1].lstrip().startswith('nfs_version: "4"')


SSH_SPEC = """\
version: 1
ssh:
  user: admin
  port: 2200
  identity: /home/admin/.ssh/id_ed25519
  sudo: true
  connect_timeout: 5s
hosts:
  plain:
    address: 10.0.0.1
  custom:
    address: 10.0.0.2
    ssh:
      port: 22
      user: root
      sudo: false
      identity: [/root/.ssh/a, /root/.ssh/b]
      known_hosts: /etc/kvmstate/known_hosts
      keepalive_interval: 15s
  emptyssh:
    address: 10.0.0.3
    ssh: {}
"""


def test_ssh_for_merges_defaults_and_host_overrides() -> None:
    spec = parse_spec_text(SSH_SPEC, "ssh.yaml").spec
    plain = spec.ssh_for("plain")
    assert (plain.user, plain.port, plain.sudo) == ("admin", 2200, True)
    assert plain.identity == ("/home/admin/.ssh/id_ed25519",)  # a single string becomes a list
    assert plain.connect_timeout == 5.0
    assert plain.keepalive_interval == 60.0  # the model's default
    assert plain.known_hosts is None
    assert plain.verify_host_key is True

    custom = spec.ssh_for("custom")
    assert (custom.user, custom.port, custom.sudo) == ("root", 22, False)  # false overrides true
    assert custom.identity == ("/root/.ssh/a", "/root/.ssh/b")
    assert custom.known_hosts == "/etc/kvmstate/known_hosts"
    assert custom.keepalive_interval == 15.0
    assert custom.connect_timeout == 5.0  # inherited

    assert spec.ssh_for("emptyssh") == plain


def test_ssh_for_unknown_host_is_a_key_error() -> None:
    spec = parse_spec_text(SSH_SPEC, "ssh.yaml").spec
    with pytest.raises(KeyError):
        spec.ssh_for("nope")
