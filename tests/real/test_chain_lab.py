"""Issue 4 on the real lab: the seed's steps 1-8 done by `kvmstate apply`, observed by `plan`,
on real sshd, libvirtd, btrfs and NFS (NFS-Ganesha + the lab's userspace client)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from labkit import (
    GUEST,
    LAB_SPEC,
    cli,
    converge,
    defined_on,
    home,
    pending,
    plan,
    plan_with_stats,
    variant,
    virsh,
    wait_counter,
)

from kvmstate.lab.lab import Lab
from kvmstate.model import Status

pytestmark = pytest.mark.lab

CHAIN = {
    "subvolume:storage:images",
    "export:storage:images",
    "mount:kvm-1:images",
    "mount:kvm-2:images",
    "pool:kvm-1:images",
    "pool:kvm-2:images",
    "volume:kvm-1:lab-guest.qcow2",
    "domain:lab-guest",
}


def test_apply_from_empty_converges_in_one_run_and_the_guest_boots(bare_lab: Lab) -> None:
    r = cli("plan", LAB_SPEC)
    assert r.returncode == 2, r.stdout + r.stderr
    assert set(pending(plan(LAB_SPEC))) == CHAIN

    r = cli("apply", LAB_SPEC, "--auto-approve")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Apply complete" in r.stdout

    r = cli("plan", LAB_SPEC)  # no second apply needed
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No changes" in r.stdout

    # what the seed did by hand is really there
    lab = bare_lab
    assert "images" in lab.run("storage", ["btrfs", "subvolume", "list", "/srv/btrfs"]).stdout
    assert "subvol=images" in lab.run("storage", ["cat", "/etc/fstab"]).stdout
    assert "/srv/images" in lab.run("storage", ["exportfs", "-v"]).stdout
    for h in ("kvm-1", "kvm-2"):
        mounts = lab.run(h, ["cat", "/proc/self/mounts"]).stdout
        assert "10.77.0.10:/srv/images /var/lib/libvirt/images" in mounts
        assert "lab-guest.qcow2" in virsh(lab, h, "vol-list", "images")
    assert defined_on(lab) == {"kvm-1": "running"}
    first = wait_counter(lab)
    wait_counter(lab, above=first)  # and it keeps counting, from its disk on NFS


@pytest.fixture(scope="module")
def converged(lab: Lab) -> Iterator[Lab]:
    lab.reset()
    yield home(lab)


# A change made behind kvmstate's back, the resource it must show up on, and its drift class.
DRIFTS = {
    "subvolume-fstab-line-removed": (
        "storage",
        ["sed", "-i", "/subvol=images/d", "/etc/fstab"],
        "subvolume:storage:images",
        "config",
    ),
    "export-removed-from-live-table": (
        "storage",
        ["exportfs", "-u", "10.77.0.0/24:/srv/images"],
        "export:storage:images",
        "runtime",
    ),
    "nfs-unmounted": (
        "kvm-2",
        ["umount", "/var/lib/libvirt/images"],
        "mount:kvm-2:images",
        "runtime",
    ),
    "pool-destroyed": (
        "kvm-2",
        ["virsh", "-c", "qemu:///system", "pool-destroy", "images"],
        "pool:kvm-2:images",
        "runtime",
    ),
    "pool-autostart-off": (
        "kvm-2",
        ["virsh", "-c", "qemu:///system", "pool-autostart", "images", "--disable"],
        "pool:kvm-2:images",
        "config",
    ),
    "volume-owner-changed": (
        "kvm-1",
        ["chown", "nobody:nogroup", "/var/lib/libvirt/images/lab-guest.qcow2"],
        "volume:kvm-1:lab-guest.qcow2",
        "config",
    ),
    "domain-shut-off": (
        "kvm-1",
        ["virsh", "-c", "qemu:///system", "destroy", GUEST],
        "domain:lab-guest",
        "runtime",
    ),
}


@pytest.mark.parametrize("case", sorted(DRIFTS))
def test_three_runs_and_drift_behind_our_back_is_seen_and_restored(
    converged: Lab, case: str
) -> None:
    lab = converged
    assert pending(plan(LAB_SPEC)) == {}  # plan says no changes
    host, argv, rid, drift_class = DRIFTS[case]
    lab.run(host, argv)
    seen = pending(plan(LAB_SPEC))
    assert rid in seen, seen
    assert drift_class in {c for _, c in seen[rid]}, seen
    report = converge(LAB_SPEC)
    changed = {str(o.id) for o in report.outcomes if o.status is Status.CHANGED}
    assert rid in changed
    assert pending(plan(LAB_SPEC)) == {}
    assert defined_on(lab) == {"kvm-1": "running"}


def test_volume_is_visible_from_every_host_of_the_shared_pool(converged: Lab) -> None:
    sizes = {
        h: virsh(converged, h, "vol-info", "--pool", "images", "lab-guest.qcow2", "--bytes")
        for h in ("kvm-1", "kvm-2")
    }
    assert all("67108864" in s for s in sizes.values()), sizes


def test_observing_the_converged_lab_opens_one_ssh_connection_per_host(converged: Lab) -> None:
    p, stats = plan_with_stats(LAB_SPEC)
    assert not p.has_changes
    assert {h: s["connections"] for h, s in stats.items()} == {
        "storage": 1,
        "kvm-1": 1,
        "kvm-2": 1,
    }
    # facts are batched: a small fixed number of exec channels per host
    assert all(s["channels"] <= 3 for s in stats.values()), stats


def test_unreachable_host_fails_its_branch_and_names_it(converged: Lab, tmp_path: Path) -> None:
    spec = variant(
        tmp_path,
        "ghost",
        lambda t: t.replace(
            "  kvm-2: {address: 10.77.0.12}",
            "  kvm-2: {address: 10.77.0.12}\n"
            "  ghost: {address: 10.77.0.99, ssh: {connect_timeout: 2s}}",
        ).replace(
            "hosts: [kvm-1, kvm-2]\n    mountpoint", "hosts: [kvm-1, kvm-2, ghost]\n    mountpoint"
        ),
    )
    r = cli("apply", spec, "--auto-approve")
    assert r.returncode == 1
    out = r.stdout + r.stderr
    assert "ghost" in out and "10.77.0.99" in out
    assert "Traceback" not in out
    # the rest of the cluster is untouched and still converged
    assert pending(plan(LAB_SPEC)) == {}


def test_wrong_host_key_is_refused_with_a_clear_message(converged: Lab, tmp_path: Path) -> None:
    known = Path("/var/lib/kvmstate-lab/known_hosts").read_text().splitlines()
    other_key = next(line for line in known if line.startswith("10.77.0.12,")).split(" ", 1)[1]
    forged = [
        f"10.77.0.11,kvm-1 {other_key}" if line.startswith("10.77.0.11,") else line
        for line in known
    ]
    (tmp_path / "known_hosts").write_text("\n".join(forged) + "\n")
    spec = variant(
        tmp_path,
        "forged",
        lambda t: t.replace(
            "known_hosts: /var/lib/kvmstate-lab/known_hosts", f"known_hosts: {tmp_path}/known_hosts"
        ),
    )
    r = cli("plan", spec)
    assert r.returncode == 1
    assert "kvm-1" in r.stdout + r.stderr
    assert "host key" in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def test_permission_denied_names_the_host_and_the_key(converged: Lab, tmp_path: Path) -> None:
    key = tmp_path / "stranger"
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    spec = variant(
        tmp_path,
        "stranger",
        lambda t: t.replace("identity: /var/lib/kvmstate-lab/id_ed25519", f"identity: {key}"),
    )
    r = cli("plan", spec)
    assert r.returncode == 1
    assert "permission denied" in (r.stdout + r.stderr).lower()
    assert "Traceback" not in r.stdout + r.stderr


def test_secrets_never_reach_logs_plans_json_or_the_journal(converged: Lab, tmp_path: Path) -> None:
    """The lab's private key is what authenticates every run here: run every command at
    the most verbose level and look for any line of it in what they print or record."""
    key_lines = [
        line
        for line in Path("/var/lib/kvmstate-lab/id_ed25519").read_text().splitlines()
        if line and not line.startswith("-----")
    ]
    assert key_lines
    env = {"KVMSTATE_STATE_DIR": str(tmp_path)}
    outputs = [
        cli("-vv", "plan", LAB_SPEC, "--json", env=env),
        cli("-vv", "drift", LAB_SPEC, "--json", env=env),
        cli("-vv", "show", LAB_SPEC, env=env),
        cli("-vv", "apply", LAB_SPEC, "--auto-approve", "--json", env=env),
    ]
    converged.run("kvm-2", ["virsh", "-c", "qemu:///system", "pool-destroy", "images"])
    outputs.append(cli("-vv", "apply", LAB_SPEC, "--auto-approve", env=env))
    assert outputs[-1].returncode == 0
    texts = [o.stdout + o.stderr for o in outputs]
    texts += [p.read_text() for p in tmp_path.rglob("*") if p.is_file()]  # journal, locks
    assert any("journal" in str(p) for p in tmp_path.rglob("*"))
    for text in texts:
        for line in key_lines:
            assert line not in text


SECRET_HASH = "$6$kvmstatelab$Zq3u0Vn9c1yQ3pM2tT5e6r7w8x9y0z1a2b3c4d5e6f7g8h9i0j1k2l3m4n5o6p"
SECRET_KEY = "AAAAC3NzaC1lZDI1NTE5AAAAIOtZ9Ek8oXFZc2w9r8c1F7M3Tq1Jm4aQdNqgqT0sYv0H"
SECRET_USER_DATA = "kvmstate-lab-token-9f8e7d6c"
SECRET_GUEST = """  secret-guest:
    type: qemu
    memory: 64MiB
    state: {state}
    host: kvm-1
    cloud_init:
      pool: images
      users:
        - name: debian
          ssh_authorized_keys: ["ssh-ed25519 {key} lab@x"]
          password_hash: "{hash}"
  other-guest:
    type: qemu
    memory: 64MiB
    state: {state}
    host: kvm-1
    cloud_init:
      pool: images
      user_data: "#cloud-config\\nruncmd: [echo {token}]\\n"
"""


def test_cloud_init_secrets_never_reach_logs_plans_json_or_the_journal(
    converged: Lab, tmp_path: Path
) -> None:
    """Password hashes, keys and user-data: shown as `(secret, sha256 ...)` at most."""
    env = {"KVMSTATE_STATE_DIR": str(tmp_path)}

    def with_guests(state: str) -> Path:
        block = SECRET_GUEST.format(
            state=state, key=SECRET_KEY, hash=SECRET_HASH, token=SECRET_USER_DATA
        )
        return variant(tmp_path, state, lambda t: t + block)

    present, absent = with_guests("shut-off"), with_guests("absent")
    outputs = [
        cli("-vv", "plan", present, "--json", env=env),
        cli("-vv", "plan", present, env=env),
        cli("-vv", "apply", present, "--auto-approve", "--json", env=env),
        cli("-vv", "show", present, env=env),
        cli("-vv", "drift", present, "--json", env=env),
        cli("-vv", "apply", absent, "--auto-approve", "--allow-destroy", env=env),
    ]
    assert outputs[2].returncode == 0 and outputs[-1].returncode == 0
    texts = [o.stdout + o.stderr for o in outputs]
    texts += [p.read_text() for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".yaml"]
    assert any("(secret, sha256 " in t for t in texts)
    for text in texts:
        for secret in (SECRET_HASH, SECRET_KEY, SECRET_USER_DATA):
            assert secret not in text


def _bare_variant(tmp_path: Path, name: str, old: str, new: str) -> Path:
    text = LAB_SPEC.read_text()
    assert old in text
    path = tmp_path / f"{name}.yaml"
    path.write_text(text.replace(old, new))
    return path


def test_btrfs_device_missing_fails_clearly_and_changes_nothing(
    bare_lab: Lab, tmp_path: Path
) -> None:
    spec = _bare_variant(
        tmp_path, "nodev", "device: LABEL=kvmstate-lab", "device: LABEL=no-such-fs"
    )
    fstab = bare_lab.run("storage", ["cat", "/etc/fstab"]).stdout
    r = cli("apply", spec, "--auto-approve")
    assert r.returncode == 1
    out = r.stdout + r.stderr
    assert "storage" in out and "no-such-fs" in out, out
    assert "Traceback" not in out
    assert bare_lab.run("storage", ["cat", "/etc/fstab"]).stdout == fstab
    assert (
        "images" not in bare_lab.run("storage", ["btrfs", "subvolume", "list", "/srv/btrfs"]).stdout
    )
    assert defined_on(bare_lab) == {}


def test_export_path_missing_is_refused_before_exports_is_written(
    bare_lab: Lab, tmp_path: Path
) -> None:
    spec = _bare_variant(tmp_path, "nopath", "    path: /srv/images\n", "    path: /srv/nowhere\n")
    exports = bare_lab.run("storage", ["cat", "/etc/exports"]).stdout
    r = cli("apply", spec, "--auto-approve")
    assert r.returncode == 1
    out = r.stdout + r.stderr
    assert "export path /srv/nowhere does not exist" in out, out
    assert bare_lab.run("storage", ["cat", "/etc/exports"]).stdout == exports
    assert bare_lab.run("storage", ["exportfs", "-v"]).stdout == ""


def test_pool_is_never_started_on_the_bare_directory_when_its_mount_fails(
    bare_lab: Lab, tmp_path: Path
) -> None:
    """kvm-2 is not allowed by the export: its NFS mount is refused by the server, so its pool
    (whose path is on that mount) is skipped, never started on the local directory."""
    spec = _bare_variant(tmp_path, "kvm1only", "network: 10.77.0.0/24", "network: 10.77.0.11")
    r = cli("apply", spec, "--auto-approve")
    assert r.returncode == 1
    out = r.stdout + r.stderr
    assert "mount:kvm-2:images" in out and "kvm-2" in out
    assert "skipped because of mount:kvm-2:images: pool:kvm-2:images" in out, out
    assert "images" not in virsh(bare_lab, "kvm-2", "pool-list", "--all", "--name")
    assert (
        "10.77.0.10:/srv/images" not in bare_lab.run("kvm-2", ["cat", "/proc/self/mounts"]).stdout
    )
    # kvm-1 is allowed: its branch converged
    assert "images" in virsh(bare_lab, "kvm-1", "pool-list", "--name")
