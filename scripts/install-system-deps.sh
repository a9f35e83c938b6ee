#!/usr/bin/env bash
# Debian packages kvmstate needs to build (libvirt-python) and to run its local lab.
# Idempotent: does nothing when every package is already installed.
set -euo pipefail
PKGS=(
  # build libvirt-python, make the venv
  libvirt-dev pkg-config gcc python3-dev python3-venv
  # the lab: libvirtd + QEMU (TCG), sshd, btrfs, NFS-Ganesha, libnfs, FUSE, namespaces
  libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils
  openssh-server openssh-client btrfs-progs busybox-static cpio iproute2 kmod
  nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils libnfs13 fuse3 nfs-common util-linux
  # libvirt NAT/isolated networks: libvirtd runs dnsmasq (only Recommended by libvirt)
  dnsmasq-base
  # the lab's bootable disk guest: SYSLINUX (MBR + installer via mtools), FAT, NoCloud ISO
  syslinux syslinux-common mtools dosfstools genisoimage
  # the tests: the zsh completion script is parsed by zsh itself
  zsh
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "install-system-deps: need root to install: ${missing[*]}" >&2; exit 1
fi
# Keep dpkg from starting libvirtd, sshd, ganesha... in the root namespace: the lab starts
# its own daemons inside its hosts.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
