"""A storage volume, created through libvirt in its pool on the pool's first host, empty or
imaged **once** from one source.

Capacity grows in place (never shrinks: blocked); owner/group are applied with ``chown`` by
name. After a create or a resize, the pool is refreshed on every other host of the pool so the
volume is visible wherever a domain may run. A volume is a disk: deleting it always counts as
"holds data" and needs ``force_destroy: true`` (plus ``--allow-destroy``).

Sources (at most one per volume; none: an empty volume of ``capacity``):

- ``file: {host, path}``: a file on a host, copied with ``cp`` on that host. On a host of the
  pool it is copied into the pool's directory; on the host that exports the directory the pool
  is mounted from (the spec knows pool -> mount -> export -> path) it is copied into the
  export's path, then the pool is refreshed. Any other host is refused in the plan.
- ``upload: PATH``: a file on the machine running kvmstate, sent through libvirt's volume
  upload stream (virStorageVolUpload + virStream) over the libvirt connection kvmstate already
  has, which rides the host's one SSH connection: no scp, no second connection. Progress is
  reported as ``VolumeProgress`` events.
- ``url: http(s)://...``: **streamed through kvmstate** into the same upload path. Why not
  fetch on the host: the host then needs no downloader (curl/wget are not in kvmstate's
  prerequisites, and a storage host may have no route out), the bytes are hashed while they
  stream (the ``sha256`` is checked without reading the image again), a 404 or a refused
  connection is seen before any volume exists, and the one code path (and its progress bar)
  is shared with ``upload``. The price is the control machine's link: an image crosses it
  twice (in, then out to the host); fetch big images onto a host and use ``file:`` for those.
- ``clone: VOLUME``: a full copy of another volume (libvirt's createXMLFrom), then grown to
  ``capacity`` if that is larger.
- ``backing: VOLUME``: a linked clone, a qcow2 overlay on a base volume of the same pool,
  created at ``capacity`` (at least the base's: larger grows it at creation).
- ``sha256`` (file, upload, url): checked before the volume is used; a mismatch deletes what
  was made and fails naming the volume. So does an image whose format is not the spec's, or
  whose size is above the spec's ``capacity``.

Provenance: libvirt keeps no record of where a volume's data came from, so kvmstate writes one,
a small JSON file per imaged volume on the pool's first host,
``/var/lib/kvmstate/volumes/POOL/NAME.json`` (mode 0600: the source, the image's SHA-256 when
it was computed, the time), after the image is complete and checked. Why a file on the host
and not in the pool: a dir pool lists every file of its directory as a volume, and a record
beside the image would travel with the shared storage into every host's view. Linked clones
need no record: the qcow2 backing chain is the truth, read from the volume's ``backingStore``.
A volume without a record (made by hand, imported, made before it had a source) is "source
unknown: data kept".

Imaged once: when the spec's source is not the recorded one, the plan says so and that the
data is kept (a NOOP with that reason, and the ``source`` before/after in its diffs); nothing is
rewritten. A replacement is asked with ``replace: true``: then a differing (or unknown) source
plans a REPLACE (delete, then image again), blocked unless ``force_destroy: true`` and
``apply --allow-destroy``. ``replace`` stays harmless in the spec: once re-imaged, the record
matches and the plan is empty. A base volume with linked clones (in the spec, or found in the
pool by their backing file) is never deleted, replaced or resized under them: refused in the
plan, naming the clones.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from kvmstate import hostfacts, virt
from kvmstate import spec as spec_models
from kvmstate.errors import KvmstateError, ParseError, RefusedError
from kvmstate.facts import Fact
from kvmstate.ids import ResourceId
from kvmstate.model import Action, Change, Event, FieldDiff, Payload, VolumeProgress
from kvmstate.resources import prereq
from kvmstate.resources.base import DocSection, Resource, RunContext
from kvmstate.resources.common import diff
from kvmstate.resources.imports import Existing, Imported, Inventory
from kvmstate.spec import Spec, Volume, is_valid_name
from kvmstate.spec.models import FileSource
from kvmstate.transport.base import CommandResult, write_file
from kvmstate.units import format_size

log = logging.getLogger(__name__)

RECORD_DIR = "/var/lib/kvmstate/volumes"
CHUNK = 256 * 1024  # libvirt sends at most 256 KiB per stream message


@dataclass(frozen=True)
class Provenance:
    """What a volume was imaged from, as its record says."""

    source: str
    sha256: str | None = None


@dataclass(frozen=True)
class VolumeObs:
    path: str
    format: str | None
    capacity: int
    owner: str | None = None
    group: str | None = None
    unknown: str | None = None  # why the volume cannot be seen right now (pool inactive)
    backing: str | None = None  # the qcow2 backing file
    record: Provenance | None = None  # read only when the spec gives a source
    overlays: tuple[str, ...] = ()  # linked clones found in the pool (read when deleting/replacing)


@dataclass(frozen=True)
class VolumeImage(Payload):
    """How apply images the volume: the source (``file``, ``upload``, ``url``, ``clone``,
    ``backing``), its label (what the record keeps), and for ``file`` where ``cp`` runs."""

    source: str
    label: str
    copy_host: str | None = None
    copy_to: str | None = None


def record_path(pool: str, name: str) -> str:
    return f"{RECORD_DIR}/{pool}/{name}.json"


def record_fact(host: str, pool: str, name: str) -> Fact[Provenance | None]:
    path = record_path(pool, name)

    def parse(res: CommandResult) -> Provenance | None:
        if not res.ok:
            if "No such file" in res.stderr:
                return None
            raise ParseError(host, path, f"exit {res.exit_status}: {res.stderr.strip()}")
        try:
            data = json.loads(res.stdout)
            source = data["source"]
            sha = data.get("sha256")
        except (ValueError, KeyError, TypeError) as e:
            raise ParseError(host, path, f"not a kvmstate volume record ({e})") from None
        if not isinstance(source, str) or not (sha is None or isinstance(sha, str)):
            raise ParseError(host, path, "not a kvmstate volume record (field types)")
        return Provenance(source, sha)

    return Fact(f"volume-record:{pool}/{name}", ("cat", "--", path), parse)


def source_label(v: Volume) -> str | None:
    """The source as the record keeps it (None: an empty volume)."""
    if v.file is not None:
        return f"file {v.file.host}:{v.file.path}"
    if v.upload is not None:
        return f"upload {v.upload}"
    if v.url is not None:
        return f"url {v.url}"
    if v.clone is not None:
        return f"clone {v.clone}"
    if v.backing is not None:
        return f"backing {v.backing}"
    return None


def _is_under(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def copy_route(spec: Spec, name: str, src: FileSource, pool_name: str) -> tuple[str, str] | str:
    """Where ``cp`` runs and what it writes, for a file on ``src.host``: (host, target path),
    or why it cannot be copied from there."""
    pool = spec.pools[pool_name]
    if src.host in pool.hosts:
        return src.host, posixpath.join(pool.path, name)
    best: tuple[int, str] | None = None
    for m in spec.mounts.values():
        if pool.hosts[0] not in m.hosts or not _is_under(pool.path, m.mountpoint):
            continue
        ex = spec.exports.get(m.export)
        if ex is None or ex.host != src.host:
            continue
        rel = pool.path[len(m.mountpoint) :].strip("/")
        target = posixpath.join(ex.path, rel, name) if rel else posixpath.join(ex.path, name)
        if best is None or len(m.mountpoint) > best[0]:
            best = (len(m.mountpoint), target)
    if best is not None:
        return src.host, best[1]
    return (
        f"the file is on {src.host}, which is neither a host of pool {pool_name} "
        f"({', '.join(pool.hosts)}) nor the host that exports the directory the pool is "
        "mounted from; kvmstate copies a file only on its own host"
    )


class _Progress:
    """Turns bytes sent into ``VolumeProgress`` events, at most about one per percent."""

    def __init__(self, volume: str, total: int, emit: Callable[[Event], None]) -> None:
        self.volume, self.total, self.emit = volume, total, emit
        self.step = max(total // 100, 1024 * 1024)
        self.last = -1

    def __call__(self, sent: int) -> None:
        if self.last < 0 or sent - self.last >= self.step or sent >= self.total:
            self.last = sent
            self.emit(VolumeProgress(self.volume, sent, self.total))


def _chunks(
    reader: IO[bytes], hasher: Any, progress: Callable[[int], None], length: int
) -> Iterator[bytes]:
    """The image in chunks, hashed and counted as it goes (runs in libvirt's worker thread)."""
    sent = 0
    progress(0)
    while sent < length:
        chunk = reader.read(min(CHUNK, length - sent))
        if not chunk:
            return
        hasher.update(chunk)
        sent += len(chunk)
        yield chunk
        progress(sent)


def _open_upload(name: str, path: str) -> tuple[IO[bytes], int]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the caller after the upload
    except OSError as e:
        raise KvmstateError(f"volume {name}: cannot read {path}: {e.strerror or e}") from None
    return f, os.fstat(f.fileno()).st_size


def _open_url(name: str, url: str) -> tuple[IO[bytes], int]:
    """The response (or, without a Content-Length, a local spool of it) and its length. An
    HTTP error or an unreachable server fails here, before any volume exists."""
    import urllib.error  # only an apply that fetches pays for urllib (start-up: bench B1b)
    import urllib.request

    try:
        resp = urllib.request.urlopen(url, timeout=60)  # noqa: S310 - http(s) only (spec)
    except urllib.error.HTTPError as e:
        raise KvmstateError(f"volume {name}: {url} answered {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        why = getattr(e, "reason", None) or e
        raise KvmstateError(f"volume {name}: cannot fetch {url}: {why}") from None
    length = resp.headers.get("Content-Length")
    if length is not None and length.isdigit():
        return resp, int(length)
    spool = tempfile.TemporaryFile(prefix="kvmstate-")  # noqa: SIM115 - closed by the caller
    with resp:
        shutil.copyfileobj(resp, spool, CHUNK)
    size = spool.tell()
    spool.seek(0)
    return spool, size


class VolumeResource(Resource[VolumeObs]):
    kind = "volume"
    section = "volumes"
    section_model = spec_models.Volume
    docs = (
        DocSection(
            "volumes.NAME",
            spec_models.Volume,
            "A disk image in a pool; NAME is its file name. Empty, or imaged once from one "
            "source: file (on a host), upload (from this machine), url, clone or backing "
            "(a linked clone). A later change of the source keeps the data unless "
            "replace: true and force_destroy: true (and apply --allow-destroy).",
        ),
        DocSection(
            "volumes.NAME.file",
            FileSource,
            "A file on a host, copied into the pool on that host.",
        ),
    )
    requires = (prereq.LIBVIRTD_BINARY, prereq.LIBVIRTD, prereq.QEMU_IMG)
    uses_libvirt = True

    @classmethod
    def import_into(cls, invs: Sequence[Inventory], out: Imported, existing: Existing) -> None:
        import_volumes(invs, out, existing)

    @classmethod
    def check(cls, spec: Any) -> Iterable[tuple[tuple[str | int, ...], str, Any]]:
        yield from check_volumes(spec)

    def __init__(self, spec: Spec, name: str, host: str | None = None) -> None:
        self.v: Volume = spec.volumes[name]
        self.pool_hosts = spec.pools[self.v.pool].hosts
        super().__init__(spec, name, host or self.pool_hosts[0])
        self.h: str = self.pool_hosts[0]

    @classmethod
    def expand(cls, spec: Spec) -> Iterable[VolumeResource]:
        return [cls(spec, n) for n in spec.volumes]

    @property
    def absent(self) -> bool:
        return self.v.state == "absent"

    def needs(self) -> dict[str, frozenset[prereq.Requirement]]:
        return {h: frozenset(self.requires) for h in self.pool_hosts}  # every host of its pool

    def depends_on(self) -> frozenset[ResourceId]:
        out = {ResourceId("pool", self.v.pool, self.h)}
        base = self.v.clone or self.v.backing
        if base is not None and base in self.spec.volumes:
            base_pool = self.spec.pools.get(self.spec.volumes[base].pool)
            if base_pool is not None:
                out.add(ResourceId("volume", base, base_pool.hosts[0]))
        return frozenset(out)

    @property
    def _reads_record(self) -> bool:
        return self.v.source not in (None, "backing") and not self.absent

    def facts(self) -> Iterable[tuple[str, Fact[Any]]]:
        if self._reads_record:
            return [(self.h, record_fact(self.h, self.v.pool, self.name))]
        return []

    def spec_clones(self) -> list[str]:
        """Volumes of the spec that are linked clones of this one (and are to exist)."""
        return sorted(
            n
            for n, o in self.spec.volumes.items()
            if o.backing == self.name and o.state == "present"
        )

    async def observe(self, ctx: RunContext) -> VolumeObs | None:
        lv = ctx.libvirt(self.h)
        conn = await lv.connect()
        st = await lv.run(virt.observe_volume, conn, self.v.pool, self.name)
        if st is None:
            if await lv.run(virt.pool_is_active, conn, self.v.pool) is False:
                why = f"pool {self.v.pool} is not active on {self.h}"
                return VolumeObs("", None, 0, unknown=why)
            return None
        owner = group = None
        if self.v.owner or self.v.group:
            res = await ctx.shell(self.h).run(["stat", "-c", "%U:%G", "--", st.path], check=False)
            got = hostfacts.stat_owner_fact(st.path).parse(res)
            if got is not None:
                owner, group = got
        record = None
        if self._reads_record:
            record = await ctx.facts(self.h).get(record_fact(self.h, self.v.pool, self.name))
        overlays: tuple[str, ...] = ()
        if self.absent or self.v.replace:  # the two ways data goes: look for linked clones
            overlays = tuple(await lv.run(virt.overlays_of, conn, self.v.pool, st.path))
        return VolumeObs(
            st.path, st.format, st.capacity, owner, group, None, st.backing, record, overlays
        )

    # --- diff --------------------------------------------------------------------------------

    def _payload(self) -> VolumeImage | str | None:
        """The plan's imaging of this volume, or why it cannot be done (None: empty)."""
        v = self.v
        label = source_label(v)
        if v.source is None or label is None:
            return None
        if v.file is not None:
            route = copy_route(self.spec, self.name, v.file, v.pool)
            if isinstance(route, str):
                return f"volume {self.name}: {route}"
            return VolumeImage("file", label, route[0], route[1])
        return VolumeImage(v.source, label)

    def _observed_source(self, o: VolumeObs) -> tuple[str | None, str | None]:
        """(what the volume was imaged from, as known; why it differs from the spec or None)."""
        v = self.v
        want = source_label(v)
        if v.backing is not None:
            base = posixpath.join(self.spec.pools[v.pool].path, v.backing)
            got = None if o.backing is None else f"backing {posixpath.basename(o.backing)}"
            if o.backing == base:
                return want, None
            if o.backing is None:
                return None, "it has no backing file"
            return got, f"its backing file is {o.backing}"
        if o.record is None:
            return None, "source unknown (no record of what it was imaged from)"
        if o.record.source != want:
            return o.record.source, f"it was imaged from {o.record.source}"
        if v.sha256 is not None and o.record.sha256 != v.sha256:
            had = o.record.sha256 or "not computed"
            return o.record.source, f"its image's sha256 was {had}"
        return want, None

    def diff(self, observed: VolumeObs | None) -> Change:
        v = self.v
        clones = self.spec_clones()
        if self.absent:
            if observed is None or observed.unknown:
                why = observed.unknown if observed else "does not exist"
                return self.noop(f"volume {self.name}: {why}")
            ch = self.change(Action.DELETE, [diff("volume", observed.path, None)], "state: absent")
            under = sorted({*observed.overlays, *clones})
            if under:
                return ch.with_blocked(
                    f"volume {self.name} is the base of linked clones {', '.join(under)}: "
                    "it is not deleted under them"
                )
            if not v.force_destroy:
                return ch.with_blocked(
                    f"volume {self.name} holds data; set force_destroy: true to delete it"
                )
            return ch
        owner = [("owner", v.owner), ("group", v.group)]
        payload = self._payload()
        diffs: list[FieldDiff]
        if observed is None:
            label = source_label(v)
            diffs = [
                *([diff("source", None, label)] if label else []),
                *([diff("capacity", None, format_size(v.capacity))] if v.capacity else []),
                diff("format", None, v.format),
                *[diff(f, None, want) for f, want in owner if want],
            ]
            what = f"{v.format} volume in pool {v.pool}" + (f" from {label}" if label else "")
            if isinstance(payload, str):
                return self.change(Action.CREATE, diffs, what).with_blocked(payload)
            return self.change(Action.CREATE, diffs, what, data=payload)
        o = observed
        if o.unknown:  # never plan a "create" over a disk we merely cannot see
            return self.noop(f"volume {self.name} not checked: {o.unknown} (checked once it runs)")
        if v.source is not None:
            got, differs = self._observed_source(o)
            if differs is not None:
                return self._source_differs(o, got, differs, payload, clones)
        diffs = []
        blocked = None
        if o.format != v.format:
            diffs.append(diff("format", o.format, v.format))
            blocked = (
                f"volume {self.name} is {o.format}, spec says {v.format}: kvmstate does not convert"
            )
        if v.capacity is not None and o.capacity < v.capacity:
            diffs.append(diff("capacity", format_size(o.capacity), format_size(v.capacity)))
            if clones:
                blocked = (
                    f"volume {self.name} is the base of linked clones {', '.join(clones)}: "
                    "it is not resized under them"
                )
        elif v.capacity is not None and o.capacity > v.capacity:
            diffs.append(diff("capacity", format_size(o.capacity), format_size(v.capacity)))
            blocked = (
                f"volume {self.name}: shrinking {format_size(o.capacity)} -> "
                f"{format_size(v.capacity)} would lose data; refused"
            )
        for f, want in owner:
            have = getattr(o, f)
            if want and have != want:
                diffs.append(diff(f, have, want))
        if not diffs:
            src = f", imaged from {source_label(v)}" if v.source else ""
            return self.noop(
                f"volume {self.name}: {o.format} {format_size(o.capacity)} at {o.path}{src}"
            )
        ch = self.change(Action.UPDATE, diffs, f"volume {self.name}")
        return ch.with_blocked(blocked) if blocked else ch

    def _source_differs(
        self,
        o: VolumeObs,
        got: str | None,
        differs: str,
        payload: VolumeImage | str | None,
        clones: list[str],
    ) -> Change:
        v = self.v
        want = source_label(v)
        field = diff("source", got or "unknown", want)
        if not v.replace:
            return self.noop(
                f"volume {self.name}: the spec's source is {want}, but {differs}: data kept "
                "(a volume is imaged once; to re-image it set replace: true and "
                "force_destroy: true, then apply --allow-destroy)",
                [field],
            )
        ch = self.change(
            Action.REPLACE,
            [field],
            f"volume {self.name}: {differs}; replace: true re-images it from {want}",
            data=payload if isinstance(payload, VolumeImage) else None,
        )
        under = sorted({*o.overlays, *clones})
        if under:
            return ch.with_blocked(
                f"volume {self.name} is the base of linked clones {', '.join(under)}: it is "
                "not replaced under them"
            )
        if isinstance(payload, str):
            return ch.with_blocked(payload)
        if not v.force_destroy:
            return ch.with_blocked(
                f"volume {self.name} holds data; replacing it needs force_destroy: true"
            )
        return ch

    # --- apply -------------------------------------------------------------------------------

    async def apply(
        self, change: Change, observed: VolumeObs | None, ctx: RunContext
    ) -> VolumeObs | None:
        lv = ctx.libvirt(self.h)
        conn = await lv.connect()
        cur = observed
        if cur is not None and cur.unknown:
            raise RefusedError(f"volume {self.name}: {cur.unknown}")
        if self.absent:
            if cur is not None:
                self.log.info("%s: deleting volume %s from pool %s", self.h, self.name, self.v.pool)
                await lv.run(virt.delete_volume, conn, self.v.pool, self.name)
                await self._forget(ctx)
                await self._refresh_others(ctx)
            return await self.observe(ctx)
        if change.action is Action.REPLACE and cur is not None:
            await self._unmake(ctx, cur)
            cur = None
        if cur is None:
            await self._create(ctx, change)
        elif self.v.capacity is not None and cur.capacity < self.v.capacity:
            users = await self._running_users(ctx, cur.path)
            if users:
                raise RefusedError(
                    f"volume {self.name} is the disk of {', '.join(users)}; growing an image "
                    "under a running guest is refused (shut it off, then apply)"
                )
            self.log.info(
                "%s: growing volume %s to %s", self.h, self.name, format_size(self.v.capacity)
            )
            await lv.run(virt.resize_volume, conn, self.v.pool, self.name, self.v.capacity)
            await self._refresh_others(ctx)
        # a new volume: its owner is whatever libvirt made it; an existing one: as observed
        path = posixpath.join(self.spec.pools[self.v.pool].path, self.name)
        owner, group = (None, None) if cur is None else (cur.owner, cur.group)
        if cur is not None:
            path = cur.path
        if (self.v.owner and owner != self.v.owner) or (self.v.group and group != self.v.group):
            who = f"{self.v.owner or ''}:{self.v.group or ''}"
            self.log.info("%s: chown %s %s", self.h, who, path)
            await ctx.shell(self.h).run(["chown", who, "--", path])
        ctx.invalidate(self.h)
        return await self.observe(ctx)

    async def _unmake(self, ctx: RunContext, cur: VolumeObs) -> None:
        """REPLACE: delete the volume (and its record) before imaging it again."""
        if not ctx.options.allow_destroy:
            raise RefusedError(f"volume {self.name}: replacing needs --allow-destroy")
        if not self.v.force_destroy:
            raise RefusedError(f"volume {self.name}: replacing needs force_destroy: true")
        if cur.overlays or self.spec_clones():
            under = ", ".join(sorted({*cur.overlays, *self.spec_clones()}))
            raise RefusedError(f"volume {self.name} is the base of linked clones {under}")
        users = await self._all_users(ctx, cur.path)
        if users:
            raise RefusedError(
                f"volume {self.name} is the disk of {', '.join(users)}; not replaced under it"
            )
        lv = ctx.libvirt(self.h)
        self.log.info("%s: deleting volume %s to re-image it", self.h, self.name)
        await lv.run(virt.delete_volume, await lv.connect(), self.v.pool, self.name)
        await self._forget(ctx)

    async def _create(self, ctx: RunContext, change: Change) -> None:
        v = self.v
        lv = ctx.libvirt(self.h)
        conn = await lv.connect()
        data = change.data
        if v.source is None or not isinstance(data, VolumeImage):
            if v.capacity is None:
                raise KvmstateError(f"volume {self.name}: an empty volume needs a capacity")
            self.log.info(
                "%s: creating %s volume %s (%s) in pool %s",
                self.h,
                v.format,
                self.name,
                format_size(v.capacity),
                v.pool,
            )
            await lv.run(virt.create_volume, conn, v.pool, self.name, v.format, v.capacity)
            await self._refresh_others(ctx)
            return
        undo: list[Callable[[], Awaitable[None]]] = []
        try:
            sha = await self._image(ctx, data, undo)
            st = await lv.run(virt.observe_volume, conn, v.pool, self.name)
            if st is None:
                raise KvmstateError(
                    f"volume {self.name}: imaged, but pool {v.pool} on {self.h} does not show it"
                )
            if not undo:
                undo.append(self._deleter(ctx))
            if st.format != v.format:
                raise KvmstateError(
                    f"volume {self.name}: the image from {data.label} is {st.format}, the spec "
                    f"says {v.format} (kvmstate does not convert); the volume was deleted"
                )
            if v.capacity is not None and st.capacity > v.capacity:
                raise KvmstateError(
                    f"volume {self.name}: the image from {data.label} is "
                    f"{format_size(st.capacity)}, above capacity {format_size(v.capacity)}; "
                    "the volume was deleted"
                )
            if v.capacity is not None and st.capacity < v.capacity and data.source != "backing":
                self.log.info("%s: growing volume %s to %s", self.h, self.name, v.capacity)
                await lv.run(virt.resize_volume, conn, v.pool, self.name, v.capacity)
            if data.source != "backing":
                await self._write_record(ctx, data.label, sha)
        except BaseException:
            for step in reversed(undo):
                try:
                    await step()
                except Exception as e:  # noqa: BLE001 - the imaging error is the one to report
                    self.log.warning("cleaning up volume %s failed: %s", self.name, e)
            raise
        await self._refresh_others(ctx)

    async def _image(
        self, ctx: RunContext, data: VolumeImage, undo: list[Callable[[], Awaitable[None]]]
    ) -> str | None:
        """Make the volume from its source; the image's sha256 when it was computed."""
        v = self.v
        lv = ctx.libvirt(self.h)
        conn = await lv.connect()
        if data.source == "file":
            return await self._copy(ctx, data, undo)
        if data.source in ("upload", "url"):
            return await self._stream(ctx, data, undo)
        base = v.clone or v.backing
        assert base is not None
        base_pool = self.spec.volumes[base].pool
        bst = await lv.run(virt.observe_volume, conn, base_pool, base)
        if bst is None:
            raise KvmstateError(
                f"volume {self.name}: its base volume {base} is not in pool {base_pool} on {self.h}"
            )
        if data.source == "clone":
            self.log.info("%s: cloning volume %s into %s", self.h, base, self.name)
            await lv.run(virt.clone_volume, conn, v.pool, self.name, v.format, base_pool, base)
        else:
            capacity = max(v.capacity or 0, bst.capacity)
            self.log.info(
                "%s: creating %s as a linked clone of %s (%s)",
                self.h,
                self.name,
                base,
                format_size(capacity),
            )
            await lv.run(
                virt.create_overlay,
                conn,
                v.pool,
                self.name,
                capacity,
                bst.path,
                bst.format or "raw",
            )
        undo.append(self._deleter(ctx))
        return None

    async def _copy(
        self, ctx: RunContext, data: VolumeImage, undo: list[Callable[[], Awaitable[None]]]
    ) -> str | None:
        v = self.v
        assert v.file is not None and data.copy_host and data.copy_to
        sh = ctx.shell(data.copy_host)
        host, target = data.copy_host, data.copy_to
        if (await sh.run(["test", "-e", target], check=False)).ok:
            raise RefusedError(
                f"volume {self.name}: {host} already has a file at {target} that libvirt does "
                "not list as a volume; kvmstate does not overwrite it"
            )

        async def remove() -> None:
            await sh.run(["rm", "-f", "--", target])
            await self._refresh(ctx, self.h)

        undo.append(remove)
        self.log.info("%s: copying %s to %s", host, v.file.path, target)
        await sh.run(["cp", "--sparse=always", "--no-clobber", "--", v.file.path, target])
        sha = None
        if v.sha256 is not None:
            res = await sh.run(["sha256sum", "--", target])
            sha = res.stdout.split(maxsplit=1)[0].lower() if res.stdout.strip() else ""
            if sha != v.sha256:
                raise KvmstateError(
                    f"volume {self.name}: sha256 of {host}:{v.file.path} is {sha}, the spec "
                    f"says {v.sha256}; the copy was deleted"
                )
        if host != self.h:
            await self._look_up_by_name(ctx)
        await self._refresh(ctx, self.h)
        return sha

    async def _look_up_by_name(self, ctx: RunContext, tries: int = 20) -> None:
        """A file written on the NFS server is seen by a client's directory listing (which
        libvirt's pool refresh reads) only once the client has revalidated the directory: an
        NFS client (and NFS-Ganesha's own cache) may serve the old listing for a while. A
        lookup BY NAME goes to the server, and makes the entry known: ``test -e`` the new path
        on the volume's host, a bounded number of times, before the pool is refreshed."""
        path = posixpath.join(self.spec.pools[self.v.pool].path, self.name)
        sh = ctx.shell(self.h)
        for _ in range(tries):
            if (await sh.run(["test", "-e", path], check=False)).ok:
                return
            await asyncio.sleep(0.5)
        raise KvmstateError(
            f"volume {self.name}: copied on the NFS server, but {self.h} does not see "
            f"{path} after {tries * 0.5:.0f} s (NFS attribute caching?)"
        )

    async def _stream(
        self, ctx: RunContext, data: VolumeImage, undo: list[Callable[[], Awaitable[None]]]
    ) -> str:
        v = self.v
        lv = ctx.libvirt(self.h)
        conn = await lv.connect()
        where = v.upload if v.upload is not None else v.url
        assert where is not None
        opener = _open_upload if v.upload is not None else _open_url
        reader, length = await asyncio.to_thread(opener, self.name, where)
        hasher = hashlib.sha256()
        try:
            self.log.info(
                "%s: sending %s (%s) into volume %s", self.h, where, format_size(length), self.name
            )
            await lv.run(virt.create_upload_target, conn, v.pool, self.name, length)
            undo.append(self._deleter(ctx))
            loop = asyncio.get_running_loop()

            def emit(event: Event) -> None:
                loop.call_soon_threadsafe(ctx.emit, event)

            chunks = _chunks(reader, hasher, _Progress(self.name, length, emit), length)
            await lv.run(virt.upload_volume, conn, v.pool, self.name, chunks, length)
        finally:
            await asyncio.to_thread(reader.close)
        digest = hasher.hexdigest()
        if v.sha256 is not None and digest != v.sha256:
            raise KvmstateError(
                f"volume {self.name}: sha256 of {where} is {digest}, the spec says {v.sha256}; "
                "the volume was deleted"
            )
        await self._refresh(ctx, self.h)  # libvirt reads the uploaded image's format again
        return digest

    def _deleter(self, ctx: RunContext) -> Callable[[], Awaitable[None]]:
        async def delete() -> None:
            lv = ctx.libvirt(self.h)
            self.log.info("%s: deleting volume %s (imaging failed)", self.h, self.name)
            await lv.run(virt.delete_volume, await lv.connect(), self.v.pool, self.name)

        return delete

    async def _write_record(self, ctx: RunContext, label: str, sha: str | None) -> None:
        sh = ctx.shell(self.h)
        path = record_path(self.v.pool, self.name)
        text = json.dumps(
            {
                "volume": self.name,
                "pool": self.v.pool,
                "source": label,
                "sha256": sha,
                "imaged": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=2,
        )
        await sh.run(["mkdir", "-p", "--", posixpath.dirname(path)])
        await write_file(sh, path, text + "\n", mode="0600")

    async def _forget(self, ctx: RunContext) -> None:
        await ctx.shell(self.h).run(["rm", "-f", "--", record_path(self.v.pool, self.name)])

    async def _refresh(self, ctx: RunContext, host: str) -> None:
        lv = ctx.libvirt(host)
        await lv.run(virt.refresh_pool, await lv.connect(), self.v.pool)

    async def _all_users(self, ctx: RunContext, path: str) -> list[str]:
        out = []
        for h in self.pool_hosts:
            lv = ctx.libvirt(h)
            users = await lv.run(virt.users_of_path, await lv.connect(), path)
            out += [f"{u} on {h}" for u in users if u.startswith("running domain")]
        return out

    async def _running_users(self, ctx: RunContext, path: str) -> list[str]:
        return await self._all_users(ctx, path)

    async def _refresh_others(self, ctx: RunContext) -> None:
        for h in self.pool_hosts[1:]:
            lv = ctx.libvirt(h)
            try:
                if await lv.run(virt.refresh_pool, await lv.connect(), self.v.pool):
                    self.log.info("%s: refreshed pool %s", h, self.v.pool)
            except KvmstateError as e:
                self.log.warning("%s: could not refresh pool %s: %s", h, self.v.pool, e)


# --- spec checks ----------------------------------------------------------------------------------


def check_volumes(spec: Any) -> Iterator[tuple[tuple[str | int, ...], str, Any]]:
    """Sources that name other things: the file's host, the base volume of a clone."""
    for name, v in spec.volumes.items():
        if v.file is not None and v.file.host not in spec.hosts:
            yield ("volumes", name, "file", "host"), f"unknown host {v.file.host!r}", "error"
        for field in ("clone", "backing"):
            base = getattr(v, field)
            if base is None:
                continue
            loc = ("volumes", name, field)
            if base == name:
                yield loc, "a volume cannot be its own base", "error"
                continue
            b = spec.volumes.get(base)
            if b is None:
                yield loc, f"unknown volume {base!r}", "error"
                continue
            if b.state == "absent" and v.state == "present":
                yield (
                    loc,
                    f"volume {base!r} is marked absent, but this volume is made from it",
                    ("error"),
                )
            if field == "backing" and b.pool != v.pool:
                yield (
                    loc,
                    (
                        f"the base {base!r} is in pool {b.pool!r}: a linked clone must be in "
                        "its base's pool (the overlay names its path)"
                    ),
                    "error",
                )
            if field == "clone" and v.pool in spec.pools and b.pool in spec.pools:
                first = spec.pools[v.pool].hosts[0]
                if first not in spec.pools[b.pool].hosts:
                    yield (
                        loc,
                        (
                            f"the base {base!r} is in pool {b.pool!r}, which is not on {first} "
                            f"(the first host of pool {v.pool!r}, where the clone is made)"
                        ),
                        "error",
                    )
        seen = {name}
        cur = v
        while (nxt := cur.clone or cur.backing) is not None and nxt in spec.volumes:
            if nxt in seen:
                yield ("volumes", name), f"volumes made from each other in a loop: {nxt}", "error"
                break
            seen.add(nxt)
            cur = spec.volumes[nxt]


# --- import: what hosts have -> spec entries ------------------------------------------------------


def import_volumes(invs: Sequence[Inventory], out: Imported, existing: Existing) -> None:
    backed: list[tuple[str, str, str]] = []  # (host, volume, backing path)
    for inv in invs:
        for v in inv.volumes:
            pool = out.data["pools"].get(v.pool)
            if pool is None or v.name in existing.names("volumes"):
                continue
            what = f"volume {v.name} in pool {v.pool}"
            have = out.data["volumes"].get(v.name)
            if have is not None:
                if have["pool"] != v.pool:
                    out.skip(inv.host, what, f"the name is taken by pool {have['pool']}'s volume")
                continue  # the same shared volume seen from another host of the pool
            if inv.host != pool["hosts"][0]:
                continue  # kvmstate reads a volume on its pool's first host
            if not is_valid_name(v.name):
                out.skip(inv.host, what, "not a usable spec name")
                continue
            if v.state.format not in ("qcow2", "raw") or v.state.capacity <= 0:
                out.skip(inv.host, what, f"format {v.state.format!r} (qcow2 or raw only)")
                continue
            data: dict[str, Any] = {
                "pool": v.pool,
                "format": v.state.format,
                "capacity": format_size(v.state.capacity),
            }
            if v.owner and v.group:
                data |= {"owner": v.owner, "group": v.group}
            out.data["volumes"][v.name] = data
            if v.state.backing:
                backed.append((inv.host, v.name, v.state.backing))
    # backing chains: a qcow2 overlay on a volume of the same pool becomes ``backing:``
    vols = out.data["volumes"]
    for host, name, path in backed:
        data = vols[name]
        pool_path = out.data["pools"][data["pool"]]["path"]
        base = posixpath.basename(path)
        if (
            posixpath.dirname(path) == pool_path
            and base in vols
            and vols[base]["pool"] == data["pool"]
            and data["format"] == "qcow2"
        ):
            data["backing"] = base
            continue
        out.notes.append(
            f"{host}: volume {name} is a qcow2 overlay on {path}, which is not a volume of pool "
            f"{data['pool']} in this import: imported without backing:"
        )
