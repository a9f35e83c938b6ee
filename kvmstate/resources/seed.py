"""The cloud-init seed of a domain: a NoCloud ``cidata`` ISO in the domain's shared pool.

A domain with ``cloud_init:`` gets a ``seed`` resource: kvmstate builds the ISO on the control
machine (``kvmstate.cloudinit``, pure Python: pycdlib), stores it as the volume
``NAME-cidata.iso`` of the domain's pool (on shared storage, so a live migration finds it on
the target) by libvirt's volume upload stream over the connection kvmstate already has, and
the domain attaches it as a read-only CD-ROM.

The seed's identity is the sha256 of its bytes (the same spec always builds the same ISO);
``plan`` compares it with ``sha256sum`` of the file on the pool's first host. A changed
identity (hostname, users, keys, user-data, network config) rewrites the ISO in place with a
new instance-id: cloud-init applies it at the guest's next boot. The domain's disk is never
touched. Secrets never appear in plans, logs or --json: only ``(secret, sha256 12ab...)``.

The ISO is created mode 0600 (owner root; libvirt's dynamic ownership may hand it to the qemu
user while a guest runs): a mode that lets anyone else read it is drift, put back to 0600.
A seed is deleted with its domain (``state: absent``, with ``--allow-destroy``); when
``cloud_init:`` is taken off a domain the domain detaches the CD-ROM and the ISO is left in the
pool (nothing is swept implicitly).
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

from kvmstate import virt
from kvmstate.checks import Finding
from kvmstate.cloudinit import Seed, build_seed, secret_digest
from kvmstate.errors import KvmstateError, ParseError, RefusedError
from kvmstate.facts import Fact
from kvmstate.ids import ResourceId
from kvmstate.model import Action, Change, FieldDiff
from kvmstate.resources import prereq
from kvmstate.resources.base import DocSection, Resource, RunContext
from kvmstate.resources.common import diff
from kvmstate.spec import Spec
from kvmstate.spec.models import CloudInit, CloudInitUser
from kvmstate.spec.values import _HOSTNAME_RE
from kvmstate.transport.base import CommandResult

log = logging.getLogger(__name__)

SEED_SUFFIX = "-cidata.iso"
SEED_MODE = "0600"
UPLOAD_CHUNK = 256 * 1024


def seed_volume(domain: str) -> str:
    return f"{domain}{SEED_SUFFIX}"


def seed_pool(spec: Any, domain: str) -> str | None:
    """The pool that holds the domain's seed: ``cloud_init.pool``, else its first disk's."""
    d = spec.domains[domain]
    if d.cloud_init is None:
        return None
    if d.cloud_init.pool:
        pool: str = d.cloud_init.pool
        return pool
    for disk in d.disks:
        vol = spec.volumes.get(disk.volume)
        if vol is not None:
            first: str = vol.pool
            return first
    return None


def seed_path(spec: Any, domain: str) -> str | None:
    """Where the domain's seed ISO is on its hosts (None: no cloud_init, or no pool)."""
    pool = seed_pool(spec, domain)
    if pool is None or pool not in spec.pools:
        return None
    return posixpath.join(spec.pools[pool].path, seed_volume(domain))


# --- facts: the file on the pool's first host ------------------------------------------------

_SHA_RE = re.compile(r"^([0-9a-f]{64})\s")


def sha256_fact(path: str) -> Fact[str | None]:
    """``sha256sum`` of the seed ISO; None when the file is missing."""

    def parse(res: CommandResult) -> str | None:
        if not res.ok:
            if "No such file" in res.stderr:
                return None
            raise ParseError(res.host, f"sha256sum {path}", res.stderr.strip())
        m = _SHA_RE.match(res.stdout)
        if m is None:
            raise ParseError(res.host, f"sha256sum {path}", f"unexpected output {res.stdout!r}")
        return m.group(1)

    return Fact(f"sha256:{path}", ("sha256sum", "--", path), parse)


def mode_fact(path: str) -> Fact[str | None]:
    """The file's permission bits as four octal digits (``0600``); None when missing."""

    def parse(res: CommandResult) -> str | None:
        if not res.ok:
            if "No such file" in res.stderr:
                return None
            raise ParseError(res.host, f"stat {path}", res.stderr.strip())
        text = res.stdout.strip()
        if not re.fullmatch(r"[0-7]{1,4}", text):
            raise ParseError(res.host, f"stat {path}", f"unexpected mode {text!r}")
        return text.zfill(4)

    return Fact(f"mode:{path}", ("stat", "-c", "%a", "--", path), parse)


def too_open(mode: str) -> bool:
    """Anyone but the owner (root, or the qemu user libvirt hands it to) and its group may
    read it, or the group may write it."""
    bits = int(mode, 8)
    return bool(bits & 0o007 or bits & 0o020)


# --- the upload (runs in the libvirt worker thread) ------------------------------------------


def seed_volume_xml(name: str, capacity: int) -> str:
    return (
        f"<volume><name>{name}</name><capacity unit='bytes'>{capacity}</capacity>"
        "<target><format type='raw'/><permissions>"
        f"<mode>{SEED_MODE}</mode><owner>0</owner><group>0</group>"
        "</permissions></target></volume>"
    )


def write_seed_volume(conn: Any, pool_name: str, name: str, seed: Seed) -> None:
    """Create (or reuse, when the size is the same) the raw volume ``name`` in the pool and
    write the seed's image into it through libvirt's upload stream (``virStorageVolUpload`` +
    ``virStream``), over the host's existing libvirt connection. Blocking: call it through
    ``Libvirt.run``. An existing volume of the same size is written in place (the same file:
    a guest that has it open sees the new seed at its next boot); one of another size is
    replaced. ``seed`` travels whole, never as bytes: an error names the call's arguments,
    and a seed's repr shows no content."""
    image = seed.image
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"invalid seed volume name {name!r}")
    pool = conn.storagePoolLookupByName(pool_name)
    vol = virt.lookup_volume(pool, name)
    if vol is not None and int(vol.info()[1]) != len(image):
        vol.delete(0)
        vol = None
    if vol is None:
        vol = pool.createXML(seed_volume_xml(name, len(image)), 0)
    chunks = (image[i : i + UPLOAD_CHUNK] for i in range(0, len(image), UPLOAD_CHUNK))
    virt.upload_volume(conn, pool_name, name, chunks, len(image))


# --- the kind -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedObs:
    path: str
    sha256: str | None
    mode: str | None
    unknown: str | None = None  # why the file cannot be seen right now (pool inactive)


def _shown(sha: str) -> str:
    return f"(secret, sha256 {sha[:12]}...)"


class SeedResource(Resource[SeedObs]):
    kind = "seed"
    section = "domains"  # the domain's cloud_init: (the domain kind owns the section)
    docs = (
        DocSection(
            "domains.NAME.cloud_init",
            CloudInit,
            "The guest's first-boot identity: kvmstate builds a NoCloud seed (a `cidata` ISO "
            "with meta-data, user-data and network-config), stores it as the volume "
            "`NAME-cidata.iso` in the domain's pool (mode 0600) and attaches it as a read-only "
            "CD-ROM. A changed identity rewrites the seed with a new instance-id: cloud-init "
            "applies it at the guest's next boot; the disk is never re-imaged. Password "
            "hashes, keys and user_data are never shown: plans, logs and --json print "
            "`(secret, sha256 ...)`.",
        ),
        DocSection(
            "domains.NAME.cloud_init.users[]",
            CloudInitUser,
            "A user cloud-init creates at first boot.",
        ),
    )
    cannot_import: ClassVar[str | None] = (
        "a seed holds password hashes and keys that cannot be read back into cloud_init: "
        "the domain's import names the seed CD-ROM it leaves out"
    )
    requires = (prereq.LIBVIRTD_BINARY, prereq.LIBVIRTD)
    uses_libvirt = True

    def __init__(self, spec: Spec, name: str, host: str | None = None) -> None:
        self.d = spec.domains[name]
        if self.d.cloud_init is None:
            raise ValueError(f"domain {name} has no cloud_init")
        self.ci: CloudInit = self.d.cloud_init
        pool = seed_pool(spec, name)
        path = seed_path(spec, name)
        if pool is None or path is None:
            raise ValueError(f"domain {name}: no pool for its cloud-init seed")
        self.pool = pool
        self.volume = seed_volume(name)
        self.path = path
        self.pool_hosts: list[str] = list(spec.pools[pool].hosts)
        super().__init__(spec, name, host or self.pool_hosts[0])
        self.h: str = self.pool_hosts[0]

    @classmethod
    def expand(cls, spec: Spec) -> Iterable[SeedResource]:
        return [
            cls(spec, n)
            for n, d in spec.domains.items()
            if d.cloud_init is not None and seed_path(spec, n) is not None
        ]

    @classmethod
    def check(cls, spec: Any) -> Iterable[Finding]:
        for name, d in spec.domains.items():
            if d.cloud_init is None:
                continue
            loc: tuple[str | int, ...] = ("domains", name, "cloud_init")
            pool = seed_pool(spec, name)
            if pool is None:
                yield (
                    loc,
                    "cloud_init needs a pool for its seed ISO: set cloud_init.pool or give "
                    "the domain a disk",
                    "error",
                )
                continue
            if pool not in spec.pools:
                yield (*loc, "pool"), f"unknown pool {pool!r}", "error"
                continue
            missing = [h for h in d.allowed_hosts() if h not in spec.pools[pool].hosts]
            if missing:
                yield (
                    loc,
                    f"the seed's pool {pool} is not on {', '.join(missing)}, where the domain "
                    "may run: it would not find its CD-ROM there",
                    "error",
                )
            vol = spec.volumes.get(seed_volume(name))
            if vol is not None and vol.pool == pool:
                yield (
                    ("volumes", seed_volume(name)),
                    f"the name {seed_volume(name)} is the cloud-init seed of domain {name}",
                    "error",
                )
            if d.cloud_init.hostname is None and not _HOSTNAME_RE.fullmatch(name):
                yield (
                    loc,
                    f"the domain name {name!r} is not a valid hostname: set cloud_init.hostname",
                    "error",
                )

    @property
    def absent(self) -> bool:
        return self.d.state == "absent"

    def hosts(self) -> tuple[str, ...]:
        return tuple(self.pool_hosts)

    def needs(self) -> dict[str, frozenset[prereq.Requirement]]:
        return {h: frozenset(self.requires) for h in self.pool_hosts}

    def depends_on(self) -> frozenset[ResourceId]:
        return frozenset({ResourceId("pool", self.pool, self.h)})

    @cached_property
    def seed(self) -> Seed:
        return build_seed(self.name, self.ci)

    def facts(self) -> Iterable[tuple[str, Fact[Any]]]:
        return [(self.h, sha256_fact(self.path)), (self.h, mode_fact(self.path))]

    async def observe(self, ctx: RunContext) -> SeedObs | None:
        facts = ctx.facts(self.h)
        sha = await facts.get(sha256_fact(self.path))
        if sha is None:
            lv = ctx.libvirt(self.h)
            if await lv.run(virt.pool_is_active, await lv.connect(), self.pool) is False:
                return SeedObs(self.path, None, None, f"pool {self.pool} is not active on {self.h}")
            return None
        return SeedObs(self.path, sha, await facts.get(mode_fact(self.path)))

    def diff(self, observed: SeedObs | None) -> Change:
        if self.absent:
            if observed is None or observed.unknown:
                why = observed.unknown if observed else "does not exist"
                return self.noop(f"cloud-init seed of {self.name}: {why}")
            return self.change(
                Action.DELETE,
                [diff("seed", self.path, None)],
                f"state: absent (the cloud-init seed of domain {self.name})",
            )
        seed = self.seed
        files = seed.files
        if observed is None:
            diffs = [
                diff("volume", None, f"{self.pool}/{self.volume}"),
                diff("hostname", None, files.hostname),
                diff("instance_id", None, files.instance_id),
            ]
            if self.ci.users:
                diffs.append(diff("users", None, [u.name for u in self.ci.users]))
            if self.ci.user_data is not None:
                user_data = self.ci.user_data.get_secret_value()
                diffs.append(diff("user_data", None, secret_digest(user_data)))
            if files.network_config is not None:
                diffs.append(diff("network_config", None, "(given)"))
            diffs.append(diff("seed", None, seed.shown))
            return self.change(
                Action.CREATE,
                diffs,
                f"cloud-init seed (NoCloud cidata ISO) of domain {self.name}, read at first boot",
            )
        if observed.unknown:
            return self.noop(
                f"cloud-init seed of {self.name} not checked: {observed.unknown} "
                "(checked once it runs)"
            )
        out: list[FieldDiff] = []
        reason = f"cloud-init seed of domain {self.name}"
        if observed.sha256 != seed.sha256:
            out += [
                diff("seed", _shown(observed.sha256 or ""), seed.shown),
                diff("instance_id", None, files.instance_id),
            ]
            reason = (
                f"identity of {self.name} changed: applied at the guest's next boot "
                "(new instance-id); the disk is not touched"
            )
        if observed.mode is not None and too_open(observed.mode):
            out.append(diff("mode", observed.mode, SEED_MODE))
        if not out:
            return self.noop(
                f"cloud-init seed of {self.name} current ({seed.shown}, instance-id "
                f"{files.instance_id}); cloud-init reads it at boot"
            )
        return self.change(Action.UPDATE, out, reason)

    async def apply(
        self, change: Change, observed: SeedObs | None, ctx: RunContext
    ) -> SeedObs | None:
        cur = observed
        if cur is not None and cur.unknown:
            raise RefusedError(f"cloud-init seed of {self.name}: {cur.unknown}")
        lv = ctx.libvirt(self.h)
        conn = await lv.connect()
        if self.absent:
            if cur is not None:
                self.log.info("%s: deleting the cloud-init seed %s", self.h, self.path)
                await lv.run(virt.delete_volume, conn, self.pool, self.volume)
                await self._refresh_others(ctx)
            ctx.invalidate(self.h)
            return await self.observe(ctx)
        seed = self.seed
        if cur is None or cur.sha256 != seed.sha256:
            self.log.info(
                "%s: writing the cloud-init seed %s (%s, instance-id %s, %d bytes)",
                self.h,
                self.path,
                seed.shown,
                seed.files.instance_id,
                len(seed.image),
            )
            await lv.run(write_seed_volume, conn, self.pool, self.volume, seed)
            await self._refresh_others(ctx)
        if cur is not None and cur.mode is not None and too_open(cur.mode):
            self.log.info("%s: chmod %s %s", self.h, SEED_MODE, self.path)
            await ctx.shell(self.h).run(["chmod", SEED_MODE, "--", self.path])
        ctx.invalidate(self.h)
        return await self.observe(ctx)

    async def _refresh_others(self, ctx: RunContext) -> None:
        for h in self.pool_hosts[1:]:
            lv = ctx.libvirt(h)
            try:
                if await lv.run(virt.refresh_pool, await lv.connect(), self.pool):
                    self.log.info("%s: refreshed pool %s", h, self.pool)
            except KvmstateError as e:
                self.log.warning("%s: could not refresh pool %s: %s", h, self.pool, e)
