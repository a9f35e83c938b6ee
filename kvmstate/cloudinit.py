"""The NoCloud seed of a domain: its files (``meta-data``, ``user-data``, ``network-config``)
from the spec's ``cloud_init:``, and the ``cidata`` ISO that carries them. Pure: no I/O.

The same spec always gives the same ISO, byte for byte: pycdlib stamps every date it writes
with the clock and the local time zone, so the build runs with a fixed clock (``EPOCH``, read
as UTC); files are added in a fixed order; the image is padded with zeros to a whole MiB
(``PAD``), so a new seed of about the same size overwrites the old one in place. The sha256 of
those bytes identifies the seed: it is what ``plan`` compares with the volume on the host.

``instance-id`` is derived from the seed's content: a changed identity is a new instance-id,
which is how cloud-init knows, at the guest's next boot, that it must apply it again.

Secrets (password hashes, SSH keys, user-data) only ever leave this module inside the ISO
bytes; what may be shown of them is ``secret_digest``: ``(secret, sha256 12ab34cd56ef...)``.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time as _time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import yaml

from kvmstate.spec.models import CloudInit

EPOCH = 946684800.0  # 2000-01-01T00:00:00Z: every date in the ISO
PAD = 1024 * 1024
VOLUME_LABEL = "cidata"  # what cloud-init's NoCloud datasource looks for

# ISO 9660 level-1 names (8.3), the Rock Ridge / Joliet names guests read
_ISO_NAMES = {
    "meta-data": "/METADATA.;1",
    "user-data": "/USERDATA.;1",
    "network-config": "/NETCONF.;1",
}


@dataclass(frozen=True, repr=False)
class SeedFiles:
    """The files of a NoCloud seed, as bytes, and what can be shown of them (its repr shows
    no content)."""

    meta_data: bytes
    user_data: bytes
    network_config: bytes | None
    instance_id: str
    hostname: str

    def __repr__(self) -> str:
        return f"SeedFiles(instance_id={self.instance_id!r}, hostname={self.hostname!r})"

    def files(self) -> dict[str, bytes]:
        out = {"meta-data": self.meta_data, "user-data": self.user_data}
        if self.network_config is not None:
            out["network-config"] = self.network_config
        return out


def secret_digest(value: str | bytes) -> str:
    """How a secret is shown: never its text, a short digest that tells two apart."""
    data = value.encode() if isinstance(value, str) else value
    return f"(secret, sha256 {hashlib.sha256(data).hexdigest()[:12]}...)"


def _dump(data: Any) -> str:
    text: str = yaml.safe_dump(data, default_flow_style=False, sort_keys=False, width=4096)
    return text


def user_data(c: CloudInit, hostname: str) -> bytes:
    """The user's own user-data as it is, or a #cloud-config from hostname and users."""
    if c.user_data is not None:
        return c.user_data.get_secret_value().encode()
    config: dict[str, Any] = {"hostname": hostname, "preserve_hostname": False}
    if c.users:
        users = []
        for u in c.users:
            entry: dict[str, Any] = {"name": u.name}
            if u.password_hash is not None:
                entry["hashed_passwd"] = u.password_hash.get_secret_value()
                entry["lock_passwd"] = False
            if u.ssh_authorized_keys:
                entry["ssh_authorized_keys"] = [
                    k.get_secret_value().strip() for k in u.ssh_authorized_keys
                ]
            if u.sudo:
                entry["sudo"] = u.sudo
            if u.groups:
                entry["groups"] = ", ".join(u.groups)
            if u.shell:
                entry["shell"] = u.shell
            users.append(entry)
        config["users"] = users
        if any(u.password_hash is not None for u in c.users):
            config["ssh_pwauth"] = False  # a password for the console, keys for SSH
    return ("#cloud-config\n" + _dump(config)).encode()


def network_config(c: CloudInit) -> bytes | None:
    if c.network_config is None:
        return None
    if isinstance(c.network_config, str):
        return c.network_config.encode()
    return _dump(c.network_config).encode()


def seed_files(domain: str, c: CloudInit) -> SeedFiles:
    hostname = c.hostname or domain
    ud = user_data(c, hostname)
    nc = network_config(c)
    h = hashlib.sha256()
    for part in (domain.encode(), hostname.encode(), ud, nc or b""):
        h.update(len(part).to_bytes(8, "big") + part)
    instance_id = f"kvmstate-{domain}-{h.hexdigest()[:12]}"
    meta = _dump({"instance-id": instance_id, "local-hostname": hostname}).encode()
    return SeedFiles(meta, ud, nc, instance_id, hostname)


# pycdlib reads the clock (time.time) and the local time zone (time.localtime) for every date
# it writes; during a build its modules see this fixed clock instead. A lock, because the
# swap is module-wide (builds run in worker threads).
class _FixedClock:
    def __init__(self, now: float) -> None:
        self._now = now

    def time(self) -> float:
        return self._now

    localtime = staticmethod(_time.gmtime)
    gmtime = staticmethod(_time.gmtime)
    strftime = staticmethod(_time.strftime)
    struct_time = _time.struct_time


_clock_lock = threading.Lock()


@contextmanager
def _fixed_clock(modules: list[Any]) -> Iterator[None]:
    with _clock_lock:
        saved = [(m, m.time) for m in modules if getattr(m, "time", None) is _time]
        for m, _ in saved:
            m.time = _FixedClock(EPOCH)
        try:
            yield
        finally:
            for m, orig in saved:
                m.time = orig


def build_iso(files: Mapping[str, bytes]) -> bytes:
    """A ``cidata`` ISO 9660 image (Rock Ridge and Joliet names) holding ``files``, padded
    with zeros to a whole MiB. The same files always give the same bytes."""
    import pycdlib  # imported when a seed is built, not with kvmstate
    from pycdlib import dates, headervd, rockridge, utils
    from pycdlib import pycdlib as core

    iso = pycdlib.PyCdlib()
    with _fixed_clock([core, headervd, dates, utils, rockridge]):
        iso.new(interchange_level=1, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_LABEL)
        for name in sorted(files):
            data = files[name]
            iso.add_fp(
                io.BytesIO(data),
                len(data),
                _ISO_NAMES[name],
                rr_name=name,
                joliet_path=f"/{name}",
            )
        out = io.BytesIO()
        iso.write_fp(out)
        iso.close()
    image = out.getvalue()
    return image + b"\0" * (-len(image) % PAD)


@dataclass(frozen=True, repr=False)
class Seed:
    """A domain's seed: its files, the ISO, and its identity (the ISO's sha256). Its repr
    (in a log line, an error naming a call's arguments) shows no content."""

    files: SeedFiles
    image: bytes

    def __repr__(self) -> str:
        return f"<cloud-init seed {self.files.instance_id}, {len(self.image)} bytes, {self.shown}>"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.image).hexdigest()

    @property
    def shown(self) -> str:
        return secret_digest(self.image)


def build_seed(domain: str, c: CloudInit) -> Seed:
    files = seed_files(domain, c)
    return Seed(files, build_iso(files.files()))


def read_iso(image: bytes) -> dict[str, bytes]:
    """The files of a seed ISO by their Rock Ridge names (for tests and ``import``)."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(image))
    try:
        out = {}
        for name in _ISO_NAMES:
            buf = io.BytesIO()
            try:
                iso.get_file_from_iso_fp(buf, rr_path=f"/{name}")
            except pycdlib.pycdlibexception.PyCdlibInvalidInput:
                continue
            out[name] = buf.getvalue()
        label: str = iso.pvd.volume_identifier.decode().strip()
        out[":label"] = label.encode()
        return out
    finally:
        iso.close()
