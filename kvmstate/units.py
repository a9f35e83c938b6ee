"""Typed sizes (``2GiB``) and durations (``300ms``) for the spec."""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_size(value: Any) -> int:
    """``"2GiB"`` -> bytes. Plain integers are bytes; ``2G`` means 2 GiB."""
    if isinstance(value, bool):
        raise ValueError("a size is a number with a unit, like 2GiB or 512MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("a size is a number with a unit, like 2GiB or 512MiB")
    m = _SIZE_RE.match(value)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"invalid size {value!r}: use a number with a unit, like 2GiB or 512MiB")
    try:
        result = Decimal(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    except InvalidOperation:
        raise ValueError(f"invalid size {value!r}") from None
    if result != result.to_integral_value():
        raise ValueError(f"invalid size {value!r}: not a whole number of bytes")
    return int(result)


def format_size(n: int) -> str:
    """bytes -> the shortest exact binary-unit form (``2147483648`` -> ``2GiB``)."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n}B"


def human_size(n: float) -> str:
    """bytes -> a rounded human form for display (``1.5 GiB``)."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= factor:
            value = n / factor
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


def parse_duration(value: Any) -> float:
    """``"300ms"``, ``"10m"``, ``"1h30m"`` -> seconds. Plain numbers are seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number with a unit, like 300ms, 30s or 10m")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("a duration must be a finite number")
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("a duration is a number with a unit, like 300ms, 30s or 10m")
    text = value.strip()
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(
            f"invalid duration {value!r}: use a number with a unit (ms, s, m, h, d), "
            "like 300ms or 10m"
        )
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    if seconds < 1 and seconds * 1000 == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    if seconds == int(seconds):
        s = int(seconds)
        if s and s % 3600 == 0:
            return f"{s // 3600}h"
        if s and s % 60 == 0:
            return f"{s // 60}m"
        return f"{s}s"
    text = f"{seconds:.9f}".rstrip("0").rstrip(".")
    return f"{text}s"


Size = Annotated[
    int,
    BeforeValidator(parse_size),
    PlainSerializer(format_size, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": r"^\d+(\.\d+)?\s*([KMGT]i?B?|[kmgt]i?b?|B|b)?$"},
            ],
            "description": "a size: bytes, or a number with a unit (512MiB, 2GiB)",
        }
    ),
]

Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": r"^(\d+(\.\d+)?(ms|s|m|h|d))+$"},
            ],
            "description": "a duration: seconds, or a number with a unit (300ms, 30s, 10m)",
        }
    ),
]
