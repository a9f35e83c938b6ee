"""The spec's safe scalar types (names, paths, options, addresses...) and their validators,
and ``Model``, the base of every spec model (frozen, ``extra="forbid"``)."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
)

# --- safe scalar types -------------------------------------------------------------------------

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_PATH_RE = re.compile(r"^/[A-Za-z0-9._/+@:=,-]*$")
_OPTION_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=:/+@-]*$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}\$?$")
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]{0,127}$")
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_DISK_TARGET_RE = re.compile(r"^(vd|sd|hd)[a-z]{1,2}$")
_DEVICE_TAG_RE = re.compile(r"^(LABEL|UUID|PARTUUID|PARTLABEL)=[A-Za-z0-9_.:-]{1,64}$")


def is_valid_name(value: str) -> bool:
    """A name kvmstate accepts for a host, resource or domain."""
    return bool(_NAME_RE.fullmatch(value)) and ".." not in value


def _check_name(value: str) -> str:
    if not is_valid_name(value):
        raise ValueError(
            f"invalid name {value!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return value


def _check_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"path {value!r} must be absolute")
    if value == "/":
        raise ValueError("path '/' is not allowed here: name a directory below it")
    if not _PATH_RE.fullmatch(value):
        bad = sorted({c for c in value if not re.fullmatch(r"[A-Za-z0-9._/+@:=,-]", c)})
        raise ValueError(f"path {value!r} contains characters kvmstate does not accept: {bad!r}")
    parts = value.split("/")
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"path {value!r} must not contain '.' or '..' components")
    if "//" in value:
        raise ValueError(f"path {value!r} must not contain '//'")
    if len(value) > 1 and value.endswith("/"):
        raise ValueError(f"path {value!r} must not end with '/'")
    if len(value) > 1024:
        raise ValueError("path is longer than 1024 characters")
    return value


def _check_option(value: str) -> str:
    if not _OPTION_RE.fullmatch(value) or len(value) > 256:
        raise ValueError(
            f"invalid option {value!r}: one option per list item; letters, digits and _.=:/+@- "
            "only, not starting with '-'"
        )
    return value


def _check_user(value: str) -> str:
    if not _USER_RE.fullmatch(value):
        raise ValueError(f"invalid user or group name {value!r}")
    return value


def _check_address(value: str) -> str:
    if "%" in value:
        raise ValueError(f"invalid address {value!r}: IPv6 scope ids are not supported")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", value):
        raise ValueError(f"invalid address {value!r}: not a valid IPv4 address")
    if not _HOSTNAME_RE.fullmatch(value):
        raise ValueError(f"invalid address {value!r}: expected an IP address or a DNS name")
    return value


def _check_device(value: str) -> str:
    if _DEVICE_TAG_RE.fullmatch(value):
        return value
    if "=" in value and not value.startswith("/"):
        raise ValueError(
            f"invalid device tag {value!r}: use LABEL=, UUID=, PARTUUID= or PARTLABEL= followed "
            "by letters, digits and _.:-"
        )
    return _check_path(value)


def _check_ifname(value: str) -> str:
    if not _IFNAME_RE.fullmatch(value):
        raise ValueError(f"invalid interface name {value!r} (1-15 letters, digits, '_.-')")
    return value


def _check_package(value: str) -> str:
    if not _PACKAGE_RE.fullmatch(value):
        raise ValueError(f"invalid Debian package name {value!r}")
    return value


def _check_network(value: str) -> str:
    if value == "*":
        return value
    if "%" in value:
        raise ValueError(f"invalid network {value!r}: IPv6 scope ids are not supported")
    try:
        if "/" in value:
            ipaddress.ip_network(value, strict=True)
        else:
            ipaddress.ip_address(value)
        return value
    except ValueError as e:
        if "/" in value:
            raise ValueError(f"invalid network {value!r}: {e}") from None
    if re.fullmatch(r"[0-9.]+", value):
        raise ValueError(f"invalid client {value!r}: not a valid IPv4 address")
    if not _HOSTNAME_RE.fullmatch(value):
        raise ValueError(
            f"invalid client {value!r}: expected a CIDR network, an IP address, a host name or '*'"
        )
    return value


def _check_cmdline(value: str) -> str:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("kernel command line must not contain control characters or newlines")
    if len(value) > 2048:
        raise ValueError("kernel command line is longer than 2048 characters")
    bad = sorted(set(value) & set("$`;&|<>\\'(){}!*?[]#~"))
    if bad:
        raise ValueError(f"kernel command line contains characters kvmstate refuses: {bad!r}")
    return value


def _to_str(value: Any) -> Any:
    # YAML turns 4 into an int and 4.1 into a float; NFS versions are written either way.
    if isinstance(value, bool):
        return value
    return str(value) if isinstance(value, int | float) else value


def _no_bool(value: Any) -> Any:
    # YAML reads yes/no/true/false as booleans, which pydantic would turn into 1 and 0.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {str(value).lower()!r}")
    return value


def _mode_str(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(
            f'quote the file mode, like mode: "0644" (YAML read it as the number {value})'
        )
    return value


def _check_mac(value: str) -> str:
    if int(value[:2], 16) & 1:
        raise ValueError(f"MAC address {value!r} is a multicast address")
    return value


def _str_or_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Name = Annotated[str, AfterValidator(_check_name)]
AbsPath = Annotated[str, AfterValidator(_check_path)]
Option = Annotated[str, AfterValidator(_check_option)]
UnixName = Annotated[str, AfterValidator(_check_user)]
Address = Annotated[str, AfterValidator(_check_address)]
Device = Annotated[str, AfterValidator(_check_device)]
IfName = Annotated[str, AfterValidator(_check_ifname)]
Package = Annotated[str, AfterValidator(_check_package)]
Network = Annotated[str, AfterValidator(_check_network)]
Cmdline = Annotated[str, AfterValidator(_check_cmdline)]
Int = Annotated[int, BeforeValidator(_no_bool)]
State = Literal["present", "absent"]


class Model(BaseModel):
    # defer_build: a model's validator is built when it is first used, not when its class is
    # defined. Loading a spec builds one validator, Spec's, with every section's schema in it;
    # the ~30 section models do not each build their own at import (bench B1b: ~10 ms net).
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, defer_build=True)
