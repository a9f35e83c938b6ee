#!/usr/bin/env bash
# The main job, end to end on the local lab: bring the lab up, apply the seed's chain from
# scratch (btrfs subvolume -> NFS export -> NFS mounts -> pools -> volume -> guest), change the
# guest's placement and apply again (a real live migration), show that nothing is left to do,
# and tear the lab down. Run as root on Debian 12: `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
K=.venv/bin/kvmstate
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "kvmstate lab up"
$K lab up
trap 'step "kvmstate lab down"; $K lab down' EXIT

step "kvmstate validate specs/lab.yaml"
$K validate specs/lab.yaml

step "kvmstate apply specs/lab.yaml (from an empty lab)"
$K apply specs/lab.yaml --auto-approve

step "the guest runs on kvm-1 and counts"
$K lab guest-counter lab-guest --wait 20

step "kvmstate plan specs/lab-migrated.yaml (host: kvm-1 -> kvm-2)"
set +e; $K plan specs/lab-migrated.yaml; rc=$?; set -e
[ "$rc" -eq 2 ] || { echo "expected plan to exit 2 (changes pending), got $rc"; exit 1; }

step "kvmstate apply specs/lab-migrated.yaml (live migration)"
$K apply specs/lab-migrated.yaml --auto-approve

step "the guest kept counting on kvm-2"
$K lab guest-counter lab-guest --wait 20

step "kvmstate plan specs/lab-migrated.yaml (nothing left to do)"
$K plan specs/lab-migrated.yaml
