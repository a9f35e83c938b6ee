"""Shared helpers for the spec tests: a minimal valid spec that exercises every section.

The corpus files under ``corpus/`` are derived from the same text (plus a header), so a line
number here is the body line number there.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

BASE = """\
version: 1
ssh:
  user: root
  port: 22
hosts:
  store:
    address: 10.0.0.10
  kvm-1:
    address: 10.0.0.11
    packages: [qemu-kvm, nfs-common]
  kvm-2:
    address: 10.0.0.12
    ssh:
      port: 2222
subvolumes:
  images:
    host: store
    device: /dev/sdb1
    mountpoint: /srv/images
    mount_options: [defaults, noatime]
exports:
  images:
    host: store
    path: /srv/images
    clients:
      - network: 10.0.0.0/24
        options: [rw, sync, no_subtree_check]
mounts:
  images:
    export: images
    hosts: [kvm-1, kvm-2]
    mountpoint: /var/lib/libvirt/images
    nfs_version: "4.2"
    options: [_netdev]
pools:
  images:
    type: dir
    path: /var/lib/libvirt/images
    hosts: [kvm-1, kvm-2]
volumes:
  web.qcow2:
    pool: images
    format: qcow2
    capacity: 8GiB
    owner: libvirt-qemu
    group: kvm
domains:
  web:
    memory: 1GiB
    vcpus: 2
    disks:
      - volume: web.qcow2
        target: vda
    interfaces:
      - bridge: br0
        mac: "52:54:00:12:34:56"
    host: kvm-1
    placement:
      hosts: [kvm-1, kvm-2]
    migration:
      max_downtime: 300ms
      timeout: 10m
"""


def edit(text: str, *replacements: tuple[str, str]) -> str:
    """Apply exact, unique replacements (fails loudly if one does not match exactly once)."""
    for old, new in replacements:
        count = text.count(old)
        assert count == 1, f"{old!r} occurs {count} times"
        text = text.replace(old, new, 1)
    return text


@pytest.fixture
def make_spec() -> Callable[..., str]:
    def make(*replacements: tuple[str, str]) -> str:
        return edit(BASE, *replacements)

    return make


@pytest.fixture
def base_text() -> str:
    return BASE
