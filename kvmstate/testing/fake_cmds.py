"""The commands a fake host understands: exactly the argv forms the resources run.

Anything else raises ``FakeCommandError`` (a test fails loudly). A command that would exit
non-zero on a real host raises ``Fail`` (turned into a non-zero ``CommandResult``).

The fake prints what the real command prints (text: ``exportfs -v`` in nfs-utils' format,
mountinfo with the kernel's octal escapes) and lets kvmstate's own parsers read it. Where it
must understand a file it simulates (/etc/fstab for ``mount TARGET``, /etc/exports for
``exportfs -ra``), it reads it with its own small readers below, never with kvmstate's parsers:
a bug in those parsers then shows up in the fake tests instead of being mirrored by the fake.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvmstate.errors import KvmstateError
from kvmstate.nfsexports import EXPORTS_D_SCRIPT
from kvmstate.ops.clusterlock import LOCK_SCRIPT
from kvmstate.resources import lockprobe, prereq
from kvmstate.transport.base import ATOMIC_WRITE_SCRIPT

if TYPE_CHECKING:
    from kvmstate.testing.fake import FakeHost


class FakeCommandError(KvmstateError):
    """A resource ran a command the fake host does not emulate."""


class Fail(Exception):
    def __init__(self, stderr: str, status: int = 1, stdout: str = "") -> None:
        super().__init__(stderr)
        self.stderr = stderr
        self.status = status
        self.stdout = stdout


def _lock_key(h: Any, path: str) -> tuple[str, str]:
    """Where a flock on ``path`` lives: on the NFS server when the mount carries locks (NFSv4,
    or NFSv3 without ``nolock``), on this client only otherwise."""
    server, p = h.resolve(path)
    if server is h:
        return (h.name, p)
    covering = [m for m in h.mounts if path.startswith(m.mountpoint.rstrip("/") + "/")]
    m = max(covering, key=lambda m: len(m.mountpoint))
    opts = (*m.options, *m.super_options)
    # nolock keeps locks on the client; so does a FUSE client without lock support (the lab's)
    local = "nolock" in opts or "local_lock=all" in opts or m.fstype.startswith("fuse")
    return (h.name, path) if local else (server.name, p)


@dataclass
class FakeMount:
    source: str
    mountpoint: str
    fstype: str
    options: tuple[str, ...]
    root: str = "/"
    super_options: tuple[str, ...] = ()


@dataclass
class FakeBtrfs:
    node: str
    label: str | None
    uuid: str
    subvolumes: dict[str, int] = field(default_factory=dict)
    next_id: int = 256


@dataclass
class FakeFile:
    content: str = ""
    owner: str = "root"
    group: str = "root"
    mode: str = "0644"
    size: int = 0
    data: bytes | None = None  # an image's bytes (``content`` is for text files)

    def digest(self) -> str:
        return hashlib.sha256(self.content.encode() if self.data is None else self.data).hexdigest()


def is_under(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


_VISIBLE = {"ro", "noatime", "nodiratime", "relatime", "strictatime", "nosuid", "nodev", "noexec"}


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def run_command(h: FakeHost, argv: tuple[str, ...], input: str | None) -> str:
    match argv:
        case ("true",):  # a reachability probe
            return ""
        case ("cat", "--", "/proc/self/mountinfo"):
            return h.proc_mountinfo()
        case ("cat", "--", "/proc/meminfo"):
            return f"MemTotal: 16000000 kB\nMemAvailable: {h.mem_available // 1024} kB\n"
        case ("cat", "--", path):
            text = h.read(path)
            if text is None:
                raise Fail(f"cat: {path}: No such file or directory")
            return text
        case ("sh", "-c", script, "kvmstate-write", path, mode, size) if (
            script == ATOMIC_WRITE_SCRIPT
        ):
            if len((input or "").encode()) != int(size):
                raise Fail(f"kvmstate-write: short input for {path}; left it unchanged")
            if not h.is_dir(_parent(path)):
                raise Fail(f"mktemp: failed to create file via template '{path}': No such dir")
            fh, p = h.resolve(path)
            old = fh.files.get(p)
            fh.files[p] = FakeFile(input or "", mode=old.mode if old else mode)
            return ""
        case ("sh", "-c", script, "kvmstate-lockprobe", path) if script == lockprobe.HOLD_SCRIPT:
            held = _lock_key(h, path)
            if held in h.cluster.flocks:
                raise Fail("", 75)
            h.cluster.flocks[held] = h.name
            return "HELD\n"
        case ("sh", "-c", script, "kvmstate-lockprobe", path) if script == lockprobe.TRY_SCRIPT:
            return "rc=75\n" if _lock_key(h, path) in h.cluster.flocks else "rc=0\n"
        case ("sh", "-c", script, "kvmstate-lock", holder) if script == LOCK_SCRIPT:
            # flock -n on the lock file: refused (75, the holder printed) while held
            if h.lock_holder is not None:
                raise Fail("", 75, stdout=h.lock_holder + "\n")
            h.lock_holder = holder
            return "LOCKED\n"
        case ("sh", "-c", script, "kvmstate-prereq", *probes) if script == prereq.CHECK_SCRIPT:
            return "".join(f"missing {p}\n" for p in probes if p in h.missing)
        case ("dpkg-query", "-W", "-f", _fmt, "--", *pkgs):
            return "".join(f"{p}\t{'ii ' if p in h.packages else 'un '}\n" for p in pkgs)
        case ("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "update"):
            h.apt_lists_fresh = True
            return ""
        case (
            "env",
            "DEBIAN_FRONTEND=noninteractive",
            "apt-get",
            "install",
            "-y",
            "--no-install-recommends",
            "--",
            *pkgs,
        ):
            if not h.apt_lists_fresh:
                raise Fail(f"E: Unable to locate package {pkgs[0]}", 100)
            h.install(pkgs)
            return ""
        case ("sh", "-c", script) if script == EXPORTS_D_SCRIPT:
            out = []
            for p in sorted(h.files):
                if _parent(p) == "/etc/exports.d" and p.endswith(".exports"):
                    out.append(f"==> {p} <==\n{h.files[p].content}")
            return "".join(out)
        case ("mkdir", "-p", "--", path):
            fh, p = h.resolve(path)
            while p not in ("", "/"):
                fh.dirs.add(p)
                p = _parent(p)
            return ""
        case ("rmdir", "--", path):
            fh, p = h.resolve(path)
            if h.listdir(path) or h.mount_at(path):
                raise Fail(f"rmdir: failed to remove '{path}': Device or resource busy")
            fh.dirs.discard(p)
            return ""
        case ("readlink", "-e", "--", path):
            if path in h.btrfs or h.is_dir(path) or path in h.files:
                return path + "\n"
            raise Fail("", 1)
        case ("blkid", "-o", "device", "-t", tag):
            key, _, value = tag.partition("=")
            for fs in h.btrfs.values():
                if (key == "LABEL" and fs.label == value) or (key == "UUID" and fs.uuid == value):
                    return fs.node + "\n"
            raise Fail("", 2)
        case ("mount", "-t", "btrfs", "-o", "subvolid=5", device, target):
            fs = _device(h, device)
            _need_dir(h, target)
            h.mounts.append(
                FakeMount(fs.node, target, "btrfs", ("rw", "relatime"), "/", _btrfs_super(5, "/"))
            )
            return ""
        case ("mount", "-o", opts, target) if opts.startswith("remount,"):
            m = h.mount_at(target)
            if m is None:
                raise Fail(f"mount: {target}: mount point not mounted or bad option.", 32)
            new = opts.split(",")[1:]
            m.options = ("rw", *sorted(o for o in new if o in _VISIBLE))
            keep = [o for o in m.super_options if o.startswith(("subvol", "space_cache", "rw"))]
            m.super_options = (*keep, *sorted(o for o in new if "=" in o and "subvol" not in o))
            return ""
        case ("mount", target):
            _mount_from_fstab(h, target)
            return ""
        case ("umount", target):
            m = h.mount_at(target)
            if m is None:
                raise Fail(f"umount: {target}: not mounted.", 32)
            h.mounts.remove(m)
            return ""
        case ("btrfs", "subvolume", "list", path):
            m = h.mount_at(path)
            if m is None or m.fstype != "btrfs":
                raise Fail(f"ERROR: not a btrfs filesystem: {path}", 1)
            fs = h.btrfs[m.source]
            return "".join(
                f"ID {i} gen 7 top level 5 path {n}\n" for n, i in sorted(fs.subvolumes.items())
            )
        case ("btrfs", "subvolume", "create", path):
            fs, rel = _btrfs_path(h, path)
            if rel in fs.subvolumes or h.is_dir(path):
                raise Fail(f"ERROR: target path already exists: {path}")
            fs.subvolumes[rel] = fs.next_id  # (its directory lives in the btrfs, not h.dirs)
            fs.next_id += 1
            return f"Create subvolume '{path}'\n"
        case ("btrfs", "subvolume", "delete", path):
            fs, rel = _btrfs_path(h, path)
            if rel not in fs.subvolumes:
                raise Fail(f"ERROR: Could not statfs: No such file or directory: {path}")
            del fs.subvolumes[rel]
            return f"Delete subvolume (no-commit): '{path}'\n"
        case ("find", path, "-mindepth", "1", "-maxdepth", "1", "-print", "-quit"):
            entries = h.listdir(path)
            return f"{path}/{entries[0]}\n" if entries else ""
        case ("test", "-e", path):
            fh, p = h.resolve(path)
            if p not in fh.files and p not in fh.dirs:
                raise Fail("", 1)
            return ""
        case ("rm", "-f", "--", path):
            fh, p = h.resolve(path)
            if p in fh.dirs:
                raise Fail(f"rm: cannot remove '{path}': Is a directory")
            fh.files.pop(p, None)
            return ""
        case ("cp", "--sparse=always", "--no-clobber", "--", src, dst):
            sh, sp = h.resolve(src)
            if sp not in sh.files:
                raise Fail(f"cp: cannot stat '{src}': No such file or directory")
            if not h.is_dir(_parent(dst)):
                raise Fail(f"cp: cannot create regular file '{dst}': No such file or directory")
            dh, dp = h.resolve(dst)
            if dp not in dh.files:  # --no-clobber: an existing file is silently kept
                dh.files[dp] = dataclasses.replace(sh.files[sp], owner="root", group="root")
            return ""
        case ("sha256sum", "--", path):
            fh, p = h.resolve(path)
            if p not in fh.files:
                raise Fail(f"sha256sum: {path}: No such file or directory")
            return f"{fh.files[p].digest()}  {path}\n"
        case ("test", "-d", path):
            if not h.is_dir(path):
                raise Fail("", 1)
            return ""
        case ("exportfs", "-v"):
            return _exportfs_v(h)
        case ("exportfs", "-ra"):
            _exportfs_ra(h)
            return ""
        case ("stat", "-c", "%U:%G", "--", path):
            fh, p = h.resolve(path)
            if p not in fh.files:
                raise Fail(f"stat: cannot statx '{path}': No such file or directory")
            return f"{fh.files[p].owner}:{fh.files[p].group}\n"
        case ("stat", "-c", "%a", "--", path):
            fh, p = h.resolve(path)
            if p not in fh.files:
                raise Fail(f"stat: cannot statx '{path}': No such file or directory")
            return f"{int(fh.files[p].mode, 8):o}\n"  # stat prints 600, not 0600
        case ("chmod", mode, "--", path) if re.fullmatch(r"[0-7]{3,4}", mode):
            fh, p = h.resolve(path)
            if p not in fh.files:
                raise Fail(f"chmod: cannot access '{path}': No such file or directory")
            fh.files[p].mode = mode.zfill(4)
            return ""
        case ("chown", owner_group, "--", path):
            owner, _, group = owner_group.partition(":")
            if (owner and owner not in h.users) or (group and group not in h.groups):
                raise Fail(f"chown: invalid user: '{owner_group}'")
            fh, p = h.resolve(path)
            if p not in fh.files:
                raise Fail(f"chown: cannot access '{path}': No such file or directory")
            fh.files[p].owner = owner or fh.files[p].owner
            fh.files[p].group = group or fh.files[p].group
            return ""
        case ("ip", "link", "set", "dev", tap, "master", bridge, "up"):
            networks = {n.bridgeName() for n in h.conn().listAllNetworks() if n.isActive()}
            if bridge not in h.bridges | networks:
                raise Fail(f'Error: argument "{bridge}" is wrong: Device does not exist', 2)
            h.enslaved[tap] = bridge
            return ""
        case ("ip", "-o", "link", "show", "type", "bridge"):
            return "".join(
                f"{i + 3}: {b}: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 state UP\\    "
                f"link/ether 52:54:00:00:00:{i:02x} brd ff:ff:ff:ff:ff:ff\n"
                for i, b in enumerate(sorted(h.bridges))
            )
    raise FakeCommandError(f"{h.name}: fake host does not emulate {list(argv)!r}")


def _need_dir(h: FakeHost, path: str) -> None:
    if not h.is_dir(path):
        raise Fail(f"mount: {path}: mount point does not exist.", 32)


def _device(h: FakeHost, device: str) -> FakeBtrfs:
    for fs in h.btrfs.values():
        if device in (fs.node, f"LABEL={fs.label}", f"UUID={fs.uuid}"):
            return fs
    raise Fail(f"mount: {device}: special device does not exist.", 32)


def _btrfs_super(subvolid: int, subvol: str) -> tuple[str, ...]:
    return ("rw", "space_cache=v2", f"subvolid={subvolid}", f"subvol={subvol}")


def _btrfs_path(h: FakeHost, path: str) -> tuple[FakeBtrfs, str]:
    parent = _parent(path)
    m = h.mount_at(parent)
    if m is None or m.fstype != "btrfs":
        raise Fail(f"ERROR: not a btrfs filesystem: {parent}")
    rel = (m.root.strip("/") + "/" + path.rsplit("/", 1)[1]).strip("/")
    return h.btrfs[m.source], rel


# --- the fake's own readers and printers of the files and tables it simulates -----------------


def octal_unescape(text: str) -> str:
    """fstab(5), exports(5) and the kernel write a space as \\040 (and so on)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def octal_escape(text: str) -> str:
    """The kernel's escaping of mountinfo fields (space, tab, newline, backslash)."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in text)


@dataclass(frozen=True)
class FstabLine:
    source: str
    mountpoint: str
    fstype: str
    options: tuple[str, ...]


def read_fstab(text: str) -> list[FstabLine]:
    """What ``mount TARGET`` reads of /etc/fstab (lines it cannot read are skipped, as mount
    skips them with a warning)."""
    out = []
    for raw in text.splitlines():
        fields = raw.split("#", 1)[0].split()
        if len(fields) < 3:
            continue
        opts = tuple(fields[3].split(",")) if len(fields) > 3 else ("defaults",)
        out.append(FstabLine(octal_unescape(fields[0]), octal_unescape(fields[1]), fields[2], opts))
    return out


def read_exports(text: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """What ``exportfs -ra`` reads of an exports(5) file: (path, client, options) with the
    ``-defaults`` of the line first; a client without options gets none of its own."""
    out = []
    logical, buf = [], ""
    for raw in text.splitlines():
        line = raw if raw.lstrip().startswith('"') else raw.split("#", 1)[0]
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    logical.append(buf)
    for line in (x.strip() for x in logical):
        if not line:
            continue
        if line.startswith('"'):
            end = line.index('"', 1)
            path, words = line[1:end], line[end + 1 :].split()
        else:
            path, *words = line.split()
        defaults: tuple[str, ...] = ()
        for word in words or ["*"]:
            if word.startswith("-"):
                defaults = tuple(o for o in word[1:].split(",") if o)
                continue
            client, _, opts = word.partition("(")
            own = tuple(o for o in opts.rstrip(")").split(",") if o)
            out.append((octal_unescape(path), client or "*", defaults + own))
    return out


# what nfs-utils assumes for an option not given, and each option's opposite
_EXPORT_DEFAULTS = ("ro", "sync", "wdelay", "hide", "no_subtree_check", "secure", "root_squash")
_OPPOSITES = {
    "rw": "ro", "ro": "rw", "sync": "async", "async": "sync", "wdelay": "no_wdelay",
    "no_wdelay": "wdelay", "hide": "nohide", "nohide": "hide",
    "subtree_check": "no_subtree_check", "no_subtree_check": "subtree_check",
    "secure": "insecure", "insecure": "secure", "root_squash": "no_root_squash",
    "no_root_squash": "root_squash", "all_squash": "no_all_squash", "no_all_squash": "all_squash",
}  # fmt: skip


def exportfs_options(options: frozenset[str] | tuple[str, ...]) -> str:
    """One export's options as nfs-utils' ``exportfs -v`` prints them: every flag spelled
    out in its fixed order, ``no_subtree_check`` shown and ``subtree_check`` not."""
    o: set[str] = set()
    for opt in (*_EXPORT_DEFAULTS, *sorted(options)):
        o.discard(_OPPOSITES.get(opt, ""))
        o.add(opt)
    out = ["async" if "async" in o else "sync", "no_wdelay" if "no_wdelay" in o else "wdelay"]
    out.append("nohide" if "nohide" in o else "hide")
    if "crossmnt" in o:
        out.append("crossmnt")
    if "subtree_check" not in o:
        out.append("no_subtree_check")
    out.append("sec=sys")
    out.append("rw" if "rw" in o else "ro")
    out.append("insecure" if "insecure" in o else "secure")
    out.append("no_root_squash" if "no_root_squash" in o else "root_squash")
    out.append("all_squash" if "all_squash" in o else "no_all_squash")
    return ",".join(out)


def _mount_from_fstab(h: FakeHost, target: str) -> None:
    entry = next(
        (e for e in read_fstab(h.read("/etc/fstab") or "") if e.mountpoint == target), None
    )
    if entry is None:
        raise Fail(f"mount: {target}: can't find in /etc/fstab.", 1)
    if h.mount_at(target) is not None:
        raise Fail(f"mount: {target}: already mounted.", 32)
    _need_dir(h, target)
    opts = dict(o.partition("=")[::2] for o in entry.options)
    visible = ("rw", *sorted(o for o in entry.options if o in _VISIBLE))
    if entry.fstype == "btrfs":
        fs = _device(h, entry.source)
        name = opts.get("subvol", "").strip("/")
        if name not in fs.subvolumes:
            raise Fail(f"mount: {target}: wrong fs type, bad option, bad superblock.", 32)
        sup = _btrfs_super(fs.subvolumes[name], f"/{name}")
        h.mounts.append(FakeMount(fs.node, target, "btrfs", visible, f"/{name}", sup))
        return
    if entry.fstype not in ("nfs", "nfs4"):
        raise FakeCommandError(f"fake mount does not emulate fstype {entry.fstype}")
    server_addr, _, path = entry.source.partition(":")
    server = h.cluster.by_address(server_addr)
    if not server.reachable:
        raise Fail(f"mount.nfs: Connection timed out for {entry.source}", 32)
    if not h.cluster.client_allowed(server, path, h):
        raise Fail(f"mount.nfs: access denied by server while mounting {entry.source}", 32)
    if h.nfs_as_fuse:
        fuse = ("rw", "user_id=0", "group_id=0", "allow_other")
        h.mounts.append(FakeMount(entry.source, target, "fuse.glusterfs", visible, "/", fuse))
        return
    vers = opts.get("vers", "4" if entry.fstype == "nfs4" else "3")
    vers = "4.2" if vers == "4" else vers
    nfs: tuple[str, ...] = ("rw", f"vers={vers}", "hard", "proto=tcp", f"addr={server.address}")
    if "nolock" in entry.options:
        nfs = (*nfs, "nolock")
    fstype = "nfs" if vers == "3" else "nfs4"
    h.mounts.append(FakeMount(entry.source, target, fstype, visible, "/", nfs))


def _export_entries(h: FakeHost) -> list[tuple[str, str, tuple[str, ...]]]:
    entries = read_exports(h.read("/etc/exports") or "")
    for p in sorted(h.files):
        if _parent(p) == "/etc/exports.d" and p.endswith(".exports"):
            entries += read_exports(h.files[p].content)
    return entries


def _exportfs_ra(h: FakeHost) -> None:
    live: dict[tuple[str, str], frozenset[str]] = {}
    for path, client, opts in _export_entries(h):
        if not h.is_dir(path):
            raise Fail(f"exportfs: Failed to stat {path}: No such file or directory")
        live[(path, client)] = frozenset(opts)
    h.exports_live = live


def _exportfs_v(h: FakeHost) -> str:
    """nfs-utils' dump(): the path padded to 14 columns, or on a line of its own (and the
    client after two tabs on the next) when longer; ``*`` shown as ``<world>``."""
    out = []
    for (path, client), opts in sorted(h.exports_live.items()):
        who = "<world>" if client == "*" else client
        shown = octal_escape(path)
        head = f"{shown}\n\t\t{who}" if len(shown) > 14 else f"{shown:<14}\t{who}"
        out.append(f"{head}({exportfs_options(opts)})\n")
    return "".join(out)
