"""The spec's models, section by section, and the whole ``Spec``."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    WithJsonSchema,
    model_validator,
)

from kvmstate.spec.values import (
    _DISK_TARGET_RE,
    _HOSTNAME_RE,
    _MAC_RE,
    AbsPath,
    Address,
    Cmdline,
    Device,
    IfName,
    Int,
    Model,
    Name,
    Network,
    Option,
    Package,
    State,
    UnixName,
    _check_mac,
    _mode_str,
    _no_bool,
    _str_or_list,
    _to_str,
)
from kvmstate.units import Duration, Size

# --- ssh ---------------------------------------------------------------------------------------


class SSHOverrides(Model):
    """SSH settings of one host; anything unset comes from the top-level ``ssh:``."""

    user: UnixName | None = None
    port: Int | None = Field(default=None, ge=1, le=65535)
    identity: Annotated[
        list[AbsPath] | None,
        BeforeValidator(_str_or_list),
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}},
                    {"type": "null"},
                ]
            }
        ),
    ] = Field(default=None, description="private key file(s); default: ssh-agent and ~/.ssh/id_*")
    known_hosts: AbsPath | None = Field(
        default=None, description="known_hosts file; default ~/.ssh/known_hosts"
    )
    verify_host_key: bool | None = Field(
        default=None, description="verify the host key against known_hosts (default true)"
    )
    config: AbsPath | None = Field(
        default=None, description="ssh_config file (default ~/.ssh/config)"
    )
    connect_timeout: Duration | None = None
    keepalive_interval: Duration | None = None
    sudo: bool | None = Field(default=None, description="run commands with sudo -n (non-root user)")


class SSHDefaults(SSHOverrides):
    user: UnixName | None = "root"
    port: Int | None = Field(default=22, ge=1, le=65535)
    verify_host_key: bool | None = True
    connect_timeout: Duration | None = 10.0
    keepalive_interval: Duration | None = 60.0
    sudo: bool | None = False


class SSHSettings(Model):
    """Effective SSH settings of a host (defaults merged with the host's overrides)."""

    user: str
    port: int
    identity: tuple[str, ...] | None
    known_hosts: str | None
    verify_host_key: bool
    config: str | None
    connect_timeout: float
    keepalive_interval: float
    sudo: bool


# --- hosts -------------------------------------------------------------------------------------


class MigrationLimits(Model):
    outgoing: Int = Field(default=1, ge=1, le=16)
    incoming: Int = Field(default=2, ge=1, le=16)


def _check_argv_item(value: str) -> str:
    if not value or "\x00" in value or "\n" in value:
        raise ValueError("an argv item must be non-empty, on one line, without NUL")
    return value


def _argv_text(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError('quote it: YAML reads off/on/yes/no/true/false as booleans; write "off"')
    if isinstance(value, int | float):
        return str(value)
    return value


Argv = Annotated[
    list[Annotated[str, BeforeValidator(_argv_text), AfterValidator(_check_argv_item)]],
    Field(min_length=1),
]


class Fence(Model):
    """How the control machine powers a dead host off and confirms it is off (fencing), so
    that its HA domains can be started elsewhere without a second copy. The commands run on
    the machine running kvmstate, never on the host; only their program name is shown
    (arguments may hold credentials: they never reach plan output, logs, the journal or
    ``--json``)."""

    power_off: Argv = Field(
        repr=False,
        description="argv that powers the host off, e.g. [fence_ipmilan, --ip=..., "
        "--username=..., --password-script=..., --action=off]",
    )
    status: Argv = Field(
        repr=False,
        description="argv that reports the power state: exit status 2 (fence-agents' "
        "convention) or a word 'off' in its output means off; exit 0 with 'on' means on",
    )
    grace: Annotated[Duration, Field(ge=0)] = Field(
        default=30.0,
        description="how long the host must stay unreachable (SSH and libvirt) before apply "
        "fences it",
    )
    timeout: Annotated[Duration, Field(gt=0)] = Field(
        default=60.0, description="how long the agent may take to power off and confirm it"
    )

    @property
    def program(self) -> str:
        """What output may name: the agent's program, never its arguments."""
        return self.power_off[0].rsplit("/", 1)[-1]


class Host(Model):
    address: Address
    ssh: SSHOverrides | None = None
    packages: list[Package] = Field(
        default_factory=list,
        description="Debian packages apply installs (apt-get) before anything else on the "
        "host; a name taken off the list stays installed",
    )
    drain: bool = Field(default=False, description="move every domain off this host")
    migrations: MigrationLimits = Field(default_factory=MigrationLimits)
    max_guest_memory: Annotated[Size, Field(gt=0)] | None = Field(
        default=None,
        description="the most memory the running domains on this host may have together; "
        "migrations onto the host are ordered (or refused) so that it is never exceeded",
    )
    fence: Fence | None = Field(
        default=None,
        description="the fence agent that powers this host off when it is dead (HA): "
        "without one, a person confirms it with `kvmstate fence HOST SPEC --confirm-off`",
    )


# --- storage -----------------------------------------------------------------------------------


class Subvolume(Model):
    host: Name
    device: Device = Field(description="the btrfs filesystem (device path, LABEL= or UUID=)")
    mountpoint: AbsPath = Field(description="where the subvolume is mounted (and kept in fstab)")
    mount_options: list[Option] = Field(default_factory=lambda: ["defaults"])
    toplevel: AbsPath | None = Field(
        default=None,
        description="where the filesystem's top level is mounted; default: mounted "
        "temporarily under /run/kvmstate when a subvolume must be created",
    )
    state: State = "present"
    force_destroy: bool = False


class ExportClient(Model):
    network: Network = Field(description="CIDR network, IP address, host name or '*'")
    options: list[Option] = Field(default_factory=lambda: ["ro", "sync", "no_subtree_check"])


class Export(Model):
    host: Name
    path: AbsPath
    clients: list[ExportClient] = Field(min_length=1)
    state: State = "present"


NfsVersion = Literal["3", "4", "4.0", "4.1", "4.2"]


class Mount(Model):
    export: Name = Field(description="the export this mount uses (server and path come from it)")
    hosts: list[Name] = Field(min_length=1)
    mountpoint: AbsPath
    nfs_version: Annotated[NfsVersion, BeforeValidator(_to_str)] = "4"
    options: list[Option] = Field(default_factory=list)
    state: State = "present"


class Pool(Model):
    type: Literal["dir"] = "dir"
    path: AbsPath
    hosts: list[Name] = Field(min_length=1)
    autostart: bool = True
    state: State = "present"


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_URL_RE = re.compile(r"^https?://[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]+$")


def _check_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"url {value!r}: only http:// and https:// are supported")
    if not parts.hostname:
        raise ValueError(f"url {value!r} names no host")
    if parts.username or parts.password:
        raise ValueError(f"url {value!r}: credentials in a URL would be shown in plans and logs")
    if not _URL_RE.fullmatch(value) or len(value) > 2048:
        raise ValueError(f"url {value!r} contains characters kvmstate does not accept")
    return value


def _check_sha256(value: str) -> str:
    if not _SHA256_RE.fullmatch(value.lower()):
        raise ValueError("sha256 must be 64 hexadecimal digits")
    return value.lower()


Url = Annotated[str, AfterValidator(_check_url)]


def _sha256_str(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError("quote the sha256 (YAML read it as a number)")
    return value


Sha256 = Annotated[str, BeforeValidator(_sha256_str), AfterValidator(_check_sha256)]

VOLUME_SOURCES = ("file", "upload", "url", "clone", "backing")


class FileSource(Model):
    """A file on one of the spec's hosts, copied into the pool once."""

    host: Name = Field(
        description="the host that has the file: a host of the pool (copied there) or the "
        "host that exports the pool's directory (copied into the export)"
    )
    path: AbsPath = Field(description="the file on that host")


class Volume(Model):
    pool: Name
    format: Literal["qcow2", "raw"] = "qcow2"
    capacity: Annotated[Size, Field(gt=0)] | None = Field(
        default=None,
        description="size of the disk; optional with a source (then the image's own size), "
        "larger than the image grows it at creation",
    )
    file: FileSource | None = Field(
        default=None, description="image it from a file on a host (copied into the pool)"
    )
    upload: AbsPath | None = Field(
        default=None,
        description="image it from a file on the machine running kvmstate, uploaded through "
        "libvirt over the host's SSH connection",
    )
    url: Url | None = Field(
        default=None,
        description="image it from an http(s) URL, streamed through kvmstate into the volume",
    )
    clone: Name | None = Field(
        default=None, description="image it as a full copy of this other volume of the spec"
    )
    backing: Name | None = Field(
        default=None,
        description="a linked clone: a qcow2 overlay on this base volume of the same pool",
    )
    sha256: Sha256 | None = Field(
        default=None,
        description="the image's SHA-256 (file, upload, url), checked before the volume is "
        "used; a mismatch deletes what was made",
    )
    replace: bool = Field(
        default=False,
        description="re-image the volume when its source differs from the one it was "
        "imaged from (needs force_destroy: true and apply --allow-destroy); otherwise a "
        "changed source keeps the data",
    )
    owner: UnixName | None = None
    group: UnixName | None = None
    mode: Annotated[str, BeforeValidator(_mode_str), Field(pattern=r"^0?[0-7]{3,4}$")] | None = None
    state: State = "present"
    force_destroy: bool = False

    @property
    def source(self) -> str | None:
        """Which source field is set (None: an empty volume)."""
        for f in VOLUME_SOURCES:
            if getattr(self, f) is not None:
                return f
        return None

    @model_validator(mode="after")
    def _one_source(self) -> Volume:
        given = [f for f in VOLUME_SOURCES if getattr(self, f) is not None]
        if len(given) > 1:
            raise ValueError(
                f"a volume has one source ({', '.join(VOLUME_SOURCES)}); this one has "
                + " and ".join(given)
            )
        if not given and self.capacity is None and self.state == "present":
            raise ValueError("an empty volume needs a capacity (or give it a source)")
        if self.backing is not None and self.format != "qcow2":
            raise ValueError("backing (a linked clone) is a qcow2 overlay: it needs format: qcow2")
        if self.sha256 is not None and (not given or given[0] not in ("file", "upload", "url")):
            raise ValueError("sha256 checks an image brought in by file, upload or url")
        if self.replace and not given:
            raise ValueError("replace: true re-images a volume from its source; it has none")
        return self


# --- networks ----------------------------------------------------------------------------------


def _ipv4(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError(f"invalid IPv4 address {value!r}") from None


def _ipv4_interface(value: str) -> str:
    try:
        iface = ipaddress.IPv4Interface(value)
    except ValueError:
        raise ValueError(
            f"invalid address {value!r}: the host's IPv4 address on the network with its "
            "prefix, like 192.168.122.1/24"
        ) from None
    if "/" not in value:
        raise ValueError(f"address {value!r} needs a prefix length, like {value}/24")
    net = iface.network
    if net.prefixlen < 31 and iface.ip in (net.network_address, net.broadcast_address):
        raise ValueError(f"address {value!r} is the network's own or its broadcast address")
    return str(iface)


IPv4 = Annotated[str, AfterValidator(_ipv4)]
IPv4Interface = Annotated[str, AfterValidator(_ipv4_interface)]
_DHCP_NAME_RE = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"


class DhcpRange(Model):
    start: IPv4
    end: IPv4

    @model_validator(mode="after")
    def _ordered(self) -> DhcpRange:
        if ipaddress.IPv4Address(self.start) > ipaddress.IPv4Address(self.end):
            raise ValueError(f"DHCP range starts after it ends ({self.start} > {self.end})")
        return self


class DhcpHost(Model):
    mac: Annotated[str, Field(pattern=_MAC_RE.pattern), AfterValidator(_check_mac)]
    ip: IPv4
    name: Annotated[str, Field(pattern=_DHCP_NAME_RE)] | None = Field(
        default=None, description="the host name dnsmasq gives the guest"
    )


class NetworkDhcp(Model):
    range: DhcpRange | None = Field(
        default=None, description="the addresses handed out (default: only the static hosts)"
    )
    hosts: list[DhcpHost] = Field(
        default_factory=list, description="static leases: a MAC always gets its IP (and name)"
    )

    @model_validator(mode="after")
    def _unique(self) -> NetworkDhcp:
        for what in ("mac", "ip", "name"):
            seen: set[str] = set()
            for h in self.hosts:
                v = getattr(h, what)
                key = v.lower() if isinstance(v, str) else v
                if key is None:
                    continue
                if key in seen:
                    raise ValueError(f"DHCP hosts: {what} {v!r} is listed twice")
                seen.add(key)
        return self


class VirtualNetwork(Model):
    mode: Literal["nat", "isolated", "bridge"] = Field(
        default="nat",
        description="nat: guests reach out through the host (libvirt's `default`); "
        "isolated: guests and host only; bridge: guests on an existing host bridge",
    )
    hosts: list[Name] = Field(min_length=1, description="the hosts the network is defined on")
    bridge: IfName | None = Field(
        default=None,
        description="nat/isolated: the bridge libvirt creates (default: libvirt picks "
        "virbrN); bridge: the existing host bridge (required)",
    )
    address: IPv4Interface | None = Field(
        default=None,
        description="the host's address on the network with its prefix, e.g. "
        "192.168.122.1/24 (required for nat; needs dnsmasq on the host)",
    )
    dhcp: NetworkDhcp | None = Field(default=None, description="DHCP served by libvirt's dnsmasq")
    autostart: bool = True
    state: State = "present"

    @model_validator(mode="after")
    def _consistent(self) -> VirtualNetwork:
        if self.mode == "bridge":
            if self.bridge is None:
                raise ValueError("a bridge network needs bridge: (the existing host bridge)")
            if self.address is not None or self.dhcp is not None:
                raise ValueError(
                    "a bridge network takes no address or dhcp (the host bridge's own "
                    "network serves its guests)"
                )
            return self
        if self.mode == "nat" and self.address is None:
            raise ValueError("a nat network needs address: (e.g. 192.168.122.1/24)")
        if self.dhcp is not None:
            if self.address is None:
                raise ValueError("dhcp needs address: (the network DHCP serves)")
            iface = ipaddress.IPv4Interface(self.address)
            net = iface.network
            inside = [*([self.dhcp.range.start, self.dhcp.range.end] if self.dhcp.range else [])]
            inside += [h.ip for h in self.dhcp.hosts]
            for ip in inside:
                a = ipaddress.IPv4Address(ip)
                if a not in net:
                    raise ValueError(f"DHCP address {ip} is outside the network {net}")
                if a == iface.ip:
                    raise ValueError(f"DHCP address {ip} is the host's own address")
        return self


# --- domains -----------------------------------------------------------------------------------


class Boot(Model):
    firmware: Literal["bios", "uefi"] | None = None
    kernel: AbsPath | None = None
    initrd: AbsPath | None = None
    cmdline: Cmdline | None = None

    @model_validator(mode="after")
    def _one_way(self) -> Boot:
        if self.firmware and self.kernel:
            raise ValueError("choose firmware boot or direct kernel boot (kernel:), not both")
        if (self.initrd or self.cmdline) and not self.kernel:
            raise ValueError("initrd and cmdline need a kernel (direct kernel boot)")
        return self


class Disk(Model):
    volume: Name
    bus: Literal["virtio", "sata", "scsi", "ide"] = "virtio"
    cache: Literal["none", "writeback", "writethrough", "directsync", "unsafe", "default"] = "none"
    target: Annotated[str, Field(pattern=_DISK_TARGET_RE.pattern)] | None = None


class Interface(Model):
    bridge: IfName | None = None
    network: Name | None = None
    model: Literal["virtio", "e1000", "rtl8139"] = "virtio"
    mac: Annotated[str, Field(pattern=_MAC_RE.pattern), AfterValidator(_check_mac)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Interface:
        if (self.bridge is None) == (self.network is None):
            raise ValueError("an interface needs exactly one of bridge: or network:")
        return self


CpuPolicy = Literal["force", "require", "optional", "disable", "forbid"]
CpuFeature = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
CpuModel = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class Cpu(Model):
    """The guest CPU: ``host-passthrough`` and ``host-model`` (KVM only), a named ``custom``
    model, or the ``baseline`` of every host the domain may run on (``host`` and
    ``placement.hosts``), computed with libvirt's ``baselineHypervisorCPU`` at plan time."""

    mode: Literal["host-passthrough", "host-model", "custom", "baseline"] = Field(
        default="custom",
        description="host-passthrough / host-model: the host's CPU (KVM only); custom: "
        "`model`; baseline: a CPU every allowed host can run (for live migration anywhere)",
    )
    model: CpuModel | None = Field(
        default=None, description="the named CPU model (mode: custom), e.g. qemu64, Nehalem"
    )
    features: dict[CpuFeature, CpuPolicy] = Field(
        default_factory=dict,
        description="CPU features and their policy, e.g. {vmx: require} (nested "
        "virtualization); on top of the mode's CPU",
    )

    @model_validator(mode="after")
    def _model_for_custom(self) -> Cpu:
        if self.mode == "custom" and not self.model:
            raise ValueError("cpu mode custom needs a model (e.g. qemu64, Nehalem)")
        if self.mode != "custom" and self.model:
            raise ValueError(f"cpu mode {self.mode} takes no model (mode: custom does)")
        return self


def _serial_shorthand(value: Any) -> Any:
    return {"type": value} if isinstance(value, str) else value


class Serial(Model):
    type: Literal["pty", "file"] = "pty"
    path: AbsPath | None = None

    @model_validator(mode="after")
    def _path_for_file(self) -> Serial:
        if self.type == "file" and not self.path:
            raise ValueError("a file serial console needs a path")
        if self.type == "pty" and self.path:
            raise ValueError("a pty serial console takes no path")
        return self


class DowntimeStep(Model):
    after: Duration = Field(description="time since the migration started")
    max_downtime: Duration


class MigrationPolicy(Model):
    """How a domain is live-migrated when its placement changes. Unset fields inherit."""

    live: bool | None = Field(
        default=None, description="live-migrate a running domain (default true)"
    )
    max_downtime: Duration | None = None
    bandwidth: Size | None = Field(
        default=None, description="bandwidth limit per second, e.g. 100MiB"
    )
    auto_converge: bool | None = None
    postcopy: Duration | None = Field(
        default=None, description="switch to post-copy after this long without convergence"
    )
    parallel_connections: Int | None = Field(default=None, ge=1, le=32)
    compressed: bool | None = None
    timeout: Duration | None = None
    on_timeout: Literal["abort", "postcopy"] | None = None
    downtime_steps: list[DowntimeStep] | None = Field(
        default=None, description="raise the allowed downtime in steps while not converging"
    )

    def merged(self, override: MigrationPolicy | None) -> MigrationPolicy:
        if override is None:
            return self
        data = self.model_dump(exclude_none=True)
        data.update(override.model_dump(exclude_none=True))
        return MigrationPolicy.model_validate(data)


def _ha_shorthand(value: Any) -> Any:
    return {} if value is True else value


class HaPolicy(Model):
    """Restart the domain on another host when its host is dead and fenced (powered off by
    its fence agent, or confirmed off by a person). Never on a timeout alone."""

    priority: Int = Field(
        default=0, description="restart order when several domains need a host: higher first"
    )
    hosts: list[Name] | None = Field(
        default=None,
        description="where it may be restarted, in order of preference (default: the "
        "domain's allowed hosts, `host` first)",
    )


class Placement(Model):
    hosts: list[Name] = Field(min_length=1, description="hosts the domain may run on")
    policy: Literal["pinned", "preferred", "floating"] = Field(
        default="pinned",
        description="pinned: exactly `host`; preferred: move back to `host` when possible; "
        "floating: any allowed host, a move by hand is not drift",
    )


# --- cloud-init (the NoCloud seed of a domain) ----------------------------------------------------
# Secrets (password hashes, SSH keys, user-data) are ``SecretStr``: masked in every repr and
# dump, and no validator below puts the value in its message (spec errors are shown, logged
# and printed with --json).

_CRYPT_RE = re.compile(r"^\$(1|5|6|y|gy|7|2[abxy]?)\$[A-Za-z0-9./$=,]{8,}$")
_SSH_KEY_RE = re.compile(
    r"^(?:[A-Za-z0-9,=\"-]+ )?"  # options (restrict, from="..."): rarely used, kept simple
    r"(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)"
    r"@openssh\.com) [A-Za-z0-9+/]+={0,3}( [^\n\r]*)?$"
)
_USER_DATA_HEADERS = (
    "#cloud-config",
    "#!",
    "#include",
    "#cloud-boothook",
    "#part-handler",
    "#cloud-config-archive",
    "Content-Type:",
)


def _check_crypt(value: SecretStr) -> SecretStr:
    if not _CRYPT_RE.fullmatch(value.get_secret_value()):
        raise ValueError(
            "password_hash must be a crypt(3) hash such as one from `mkpasswd -m sha-512` "
            "($6$...), never a plain password (the value is not shown)"
        )
    return value


def _check_ssh_key(value: SecretStr) -> SecretStr:
    if not _SSH_KEY_RE.fullmatch(value.get_secret_value().strip()):
        raise ValueError(
            "not an SSH public key on one line (ssh-ed25519 AAAA... comment); the value is "
            "not shown"
        )
    return value


def _check_user_data(value: SecretStr) -> SecretStr:
    text = value.get_secret_value()
    if not text.strip():
        raise ValueError("user_data is empty")
    if not text.lstrip().startswith(_USER_DATA_HEADERS):
        raise ValueError(
            "user_data must start with a cloud-init header: #cloud-config, #! (a script), "
            "#include, #cloud-boothook or a MIME Content-Type (the value is not shown)"
        )
    if len(text.encode()) > 16 * 1024 * 1024:
        raise ValueError("user_data is larger than 16 MiB")
    return value


def _check_sudo(value: str) -> str:
    if any(ord(c) < 0x20 for c in value) or len(value) > 512:
        raise ValueError("sudo: one sudoers rule on one line")
    return value


def _check_hostname(value: str) -> str:
    if not _HOSTNAME_RE.fullmatch(value):
        raise ValueError(f"invalid hostname {value!r} (letters, digits, '-' and dots)")
    return value


def _check_network_config(value: Any) -> Any:
    if isinstance(value, dict) and not ({"version", "network"} & set(value)):
        raise ValueError(
            "network_config is cloud-init's network config: a mapping with `version: 1` or "
            "`version: 2` (or `network:` around it), or that YAML as text"
        )
    if isinstance(value, str) and not value.strip():
        raise ValueError("network_config is empty")
    return value


Hostname = Annotated[str, AfterValidator(_check_hostname)]
SSHKey = Annotated[SecretStr, AfterValidator(_check_ssh_key)]
PasswordHash = Annotated[SecretStr, AfterValidator(_check_crypt)]


class CloudInitUser(Model):
    """A user cloud-init creates on first boot (cloud-config ``users:``)."""

    name: UnixName
    ssh_authorized_keys: list[SSHKey] = Field(
        default_factory=list, description="public keys, one per item (kept secret in output)"
    )
    password_hash: PasswordHash | None = Field(
        default=None,
        description="crypt(3) hash (`mkpasswd -m sha-512`); the password is unlocked. "
        "Never shown: plan, logs and --json print `(secret, sha256 ...)`",
    )
    sudo: Annotated[str, AfterValidator(_check_sudo)] | None = Field(
        default=None, description="a sudoers rule, e.g. 'ALL=(ALL) NOPASSWD:ALL'"
    )
    groups: list[UnixName] = Field(default_factory=list)
    shell: AbsPath | None = None


class CloudInit(Model):
    """The guest's identity on first boot: a NoCloud seed (``cidata`` ISO) kvmstate builds,
    stores in the domain's pool and attaches as a read-only CD-ROM."""

    hostname: Hostname | None = Field(
        default=None, description="the guest's hostname (default: the domain's name)"
    )
    users: list[CloudInitUser] = Field(
        default_factory=list,
        description="users to create (cloud-init's default user is then not created)",
    )
    user_data: Annotated[SecretStr, AfterValidator(_check_user_data)] | None = Field(
        default=None,
        description="your own user-data, used as it is (#cloud-config, a #! script...) "
        "instead of the one kvmstate writes from hostname and users; kept secret in output",
    )
    network_config: Annotated[
        dict[str, Any] | str | None, AfterValidator(_check_network_config)
    ] = Field(
        default=None,
        description="cloud-init network config (version 1 or 2), as a mapping or as YAML text",
    )
    pool: Name | None = Field(
        default=None,
        description="the pool that holds the seed volume NAME-cidata.iso (default: the pool "
        "of the domain's first disk); it must be on every host the domain may run on",
    )
    bus: Literal["sata", "ide"] = Field(
        default="sata", description="the bus of the read-only CD-ROM"
    )

    @model_validator(mode="after")
    def _users_or_user_data(self) -> CloudInit:
        if self.user_data is not None and self.users:
            raise ValueError(
                "cloud_init: give users or your own user_data, not both (put the users in "
                "your user_data)"
            )
        return self


_HOST_CPU_MODES = ("host-passthrough", "host-model")


class Domain(Model):
    type: Literal["kvm", "qemu"] = "kvm"
    memory: Annotated[Size, Field(gt=0)]
    vcpus: Int = Field(default=1, ge=1, le=512)
    boot: Boot | None = None
    disks: list[Disk] = Field(default_factory=list)
    interfaces: list[Interface] = Field(default_factory=list)
    serial: Annotated[Serial | None, BeforeValidator(_serial_shorthand)] = None
    state: Literal["running", "shut-off", "absent"] = "running"
    autostart: bool = False
    host: Name = Field(description="placement: the host the domain runs on")
    placement: Placement | None = None
    migration: MigrationPolicy | None = None
    ha: Annotated[HaPolicy | None, BeforeValidator(_ha_shorthand)] = Field(
        default=None,
        description="high availability: restarted on another allowed host when its host is "
        "dead and fenced (`ha: true` or {priority, hosts}); libvirt's autostart is then kept "
        "off on every host (kvmstate starts it), so a host coming back never starts a stale "
        "copy",
    )
    force_destroy: bool = False
    cloud_init: CloudInit | None = Field(
        default=None, description="the guest's first-boot identity (a NoCloud seed CD-ROM)"
    )
    guest_agent: bool = Field(
        default=False,
        description="add the QEMU guest agent channel; shutdowns then ask the agent first, "
        "the ACPI power button second",
    )
    shutdown_timeout: Annotated[Duration, Field(ge=0)] = Field(
        default=60.0,
        description="how long a shutdown (state: shut-off, a restart) waits for the guest "
        "to power off after the ACPI power button before it is powered off by force "
        "(0: at once)",
    )
    cpu: Cpu | None = Field(
        default=None,
        description="the guest CPU model (none: the hypervisor's default CPU)",
    )
    restart: Literal["on-request", "on-change"] = Field(
        default="on-request",
        description="a running guest whose config changed in a way that needs a restart "
        "(memory, vCPUs, devices): on-request: it stays 'pending restart' until `apply "
        "--restart-pending`; on-change: apply restarts it (graceful shutdown, then start)",
    )

    @model_validator(mode="after")
    def _cpu_for_type(self) -> Domain:
        if self.cpu is not None and self.type == "qemu" and self.cpu.mode in _HOST_CPU_MODES:
            raise ValueError(
                f"cpu mode {self.cpu.mode} needs hardware virtualization (type: kvm): a TCG "
                "guest (type: qemu) has no host CPU to pass through or model; use mode: "
                "custom with a model (qemu64, Nehalem...) or mode: baseline"
            )
        return self

    def allowed_hosts(self) -> list[str]:
        if self.placement is None:
            return [self.host]
        return list(dict.fromkeys([self.host, *self.placement.hosts]))

    def ha_hosts(self) -> list[str]:
        """Where an HA restart may go, in order (empty without ``ha:``)."""
        if self.ha is None:
            return []
        return list(self.ha.hosts) if self.ha.hosts is not None else self.allowed_hosts()

    @property
    def libvirt_autostart(self) -> bool:
        """The autostart flag kvmstate keeps in libvirt: off for an HA domain, which
        kvmstate starts (a host that comes back after fencing must not start a stale copy)."""
        return self.autostart and self.ha is None


# --- the whole spec ----------------------------------------------------------------------------


class Spec(Model):
    # a ValidationError's text never repeats a value (cloud-init secrets); the loader's
    # messages are made from the errors' own fields
    model_config = ConfigDict(**Model.model_config, hide_input_in_errors=True)

    version: Annotated[Literal[1], BeforeValidator(_no_bool)] = Field(
        description="spec format version"
    )
    ssh: SSHDefaults = Field(default_factory=SSHDefaults)
    migration: MigrationPolicy = Field(default_factory=MigrationPolicy)
    hosts: dict[Name, Host] = Field(min_length=1)
    subvolumes: dict[Name, Subvolume] = Field(default_factory=dict)
    exports: dict[Name, Export] = Field(default_factory=dict)
    mounts: dict[Name, Mount] = Field(default_factory=dict)
    pools: dict[Name, Pool] = Field(default_factory=dict)
    volumes: dict[Name, Volume] = Field(default_factory=dict)
    networks: dict[Name, VirtualNetwork] = Field(default_factory=dict)
    domains: dict[Name, Domain] = Field(default_factory=dict)

    def ssh_for(self, host: str) -> SSHSettings:
        merged = {k: getattr(self.ssh, k) for k in SSHOverrides.model_fields}
        overrides = self.hosts[host].ssh
        if overrides is not None:
            for k in SSHOverrides.model_fields:
                if getattr(overrides, k) is not None:
                    merged[k] = getattr(overrides, k)
        identity = merged.get("identity")
        merged["identity"] = tuple(identity) if identity else None
        return SSHSettings.model_validate(merged)

    def migration_for(self, domain: str) -> MigrationPolicy:
        return self.migration.merged(self.domains[domain].migration)
