"""Typed sizes and durations (kvmstate/units.py) and their round trip through the models."""

from __future__ import annotations

import math

import pytest
from pydantic import BaseModel, ValidationError

from kvmstate.spec import Domain, MigrationPolicy, Volume
from kvmstate.units import (
    Duration,
    Size,
    format_duration,
    format_size,
    human_size,
    parse_duration,
    parse_size,
)

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4


class Holder(BaseModel):
    size: Size | None = None
    duration: Duration | None = None


# --- sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GiB", 2 * GiB),
        ("512MiB", 512 * MiB),
        ("16GiB", 16 * GiB),
        ("1TiB", TiB),
        ("4KiB", 4 * KiB),
        ("2G", 2 * GiB),  # bare binary letter = binary unit
        ("2g", 2 * GiB),
        ("2gib", 2 * GiB),
        ("2 GiB", 2 * GiB),
        ("1.5GiB", 3 * GiB // 2),
        ("2GB", 2 * 1000**3),  # decimal units are decimal
        ("100MB", 100 * 1000**2),
        ("1000", 1000),
        ("10B", 10),
        (0, 0),
        (4096, 4096),
        (2 * GiB, 2 * GiB),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2 parsecs", "invalid size '2 parsecs'"),
        ("GiB", "invalid size"),
        ("", "invalid size"),
        ("-1GiB", "invalid size"),
        ("2GiB; reboot", "invalid size"),
        ("$(reboot)", "invalid size"),
        ("0x10", "invalid size"),
        ("1e9", "invalid size"),
        ("0.5B", "not a whole number of bytes"),
        ("0.1KiB", "not a whole number of bytes"),
        (-1, "cannot be negative"),
        (-2 * GiB, "cannot be negative"),
        (True, "a size is a number with a unit"),
        (False, "a size is a number with a unit"),
        (1.5, "a size is a number with a unit"),
        (None, "a size is a number with a unit"),
        ([1], "a size is a number with a unit"),
    ],
)
def test_parse_size_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(value)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (2 * GiB, "2GiB"),
        (512 * MiB, "512MiB"),
        (16 * GiB, "16GiB"),
        (TiB, "1TiB"),
        (1536 * MiB, "1536MiB"),
        (4 * KiB, "4KiB"),
        (1536, "1536B"),
        (1, "1B"),
        (0, "0B"),
    ],
)
def test_format_size_is_shortest_exact_and_round_trips(n: int, text: str) -> None:
    assert format_size(n) == text
    assert parse_size(format_size(n)) == n


@pytest.mark.parametrize("n", [0, 1, 1023, 1024, 10**9, 2 * GiB + 1, 3 * TiB, 123456789 * KiB])
def test_size_round_trip_any_integer(n: int) -> None:
    assert parse_size(format_size(n)) == n


def test_parse_size_exact_for_big_integers() -> None:
    assert parse_size("9007199254740993") == 9007199254740993


def test_human_size() -> None:
    assert human_size(2 * GiB) == "2 GiB"
    assert human_size(1.5 * GiB) == "1.5 GiB"
    assert human_size(100) == "100 B"


def test_size_in_a_model_is_an_int_and_serializes_back() -> None:
    vol = Volume.model_validate({"pool": "p", "capacity": "16GiB"})
    assert vol.capacity == 16 * GiB
    assert type(vol.capacity) is int
    assert vol.model_dump(mode="json")["capacity"] == "16GiB"
    again = Volume.model_validate(vol.model_dump(mode="json"))
    assert again == vol
    dom = Domain.model_validate({"memory": "512MiB", "host": "h"})
    assert dom.memory == 512 * MiB
    assert Domain.model_validate(dom.model_dump(mode="json")) == dom


@pytest.mark.parametrize("bad", ["2 parsecs", -1, True, "lots", 1.5])
def test_size_in_a_model_rejects(bad: object) -> None:
    with pytest.raises(ValidationError):
        Holder.model_validate({"size": bad})


# --- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("300ms", 0.3),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("30s", 30.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1.5s", 1.5),
        ("1m30s", 90.0),
        ("1h0m0s", 3600.0),
        (" 10m ", 600.0),
        (0, 0.0),
        (5, 5.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration(text: object, expected: float) -> None:
    got = parse_duration(text)
    assert isinstance(got, float)
    assert got == pytest.approx(expected)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10 minutes", "invalid duration '10 minutes'"),
        ("10", "invalid duration"),
        ("", "invalid duration"),
        ("m", "invalid duration"),
        ("-10m", "invalid duration"),
        ("10m; reboot", "invalid duration"),
        ("1h 30m", "invalid duration"),
        ("10M", "invalid duration"),
        ("10min", "invalid duration"),
        (-1, "cannot be negative"),
        (-0.5, "cannot be negative"),
        (True, "a duration is a number with a unit"),
        (None, "a duration is a number with a unit"),
        (["10m"], "a duration is a number with a unit"),
    ],
)
def test_parse_duration_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert message in str(info.value)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_parse_duration_rejects_nan_and_inf(value: float) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.3, "300ms"),
        (0.001, "1ms"),
        (600.0, "10m"),
        (5400.0, "90m"),
        (7200.0, "2h"),
        (30.0, "30s"),
        (90.0, "90s"),
        (1.5, "1.5s"),
        (0.0, "0ms"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["300ms", "10m", "1h30m", "30s", "2h", "1d", "1.5s", "250ms"])
def test_duration_round_trip(text: str) -> None:
    seconds = parse_duration(text)
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


def test_duration_round_trip_tiny() -> None:
    assert parse_duration(format_duration(1e-7)) == pytest.approx(1e-7)


def test_duration_in_a_model_is_a_float_and_serializes_back() -> None:
    m = MigrationPolicy.model_validate({"max_downtime": "300ms", "timeout": "1h30m"})
    assert m.max_downtime == pytest.approx(0.3)
    assert m.timeout == 5400.0
    dumped = m.model_dump(mode="json", exclude_none=True)
    assert dumped == {"max_downtime": "300ms", "timeout": "90m"}
    assert MigrationPolicy.model_validate(dumped) == m


@pytest.mark.parametrize("bad", ["10 minutes", -1, True, "soon"])
def test_duration_in_a_model_rejects(bad: object) -> None:
    with pytest.raises(ValidationError):
        Holder.model_validate({"duration": bad})


def test_json_schema_documents_units() -> None:
    props = Holder.model_json_schema()["properties"]
    text = repr(props)
    assert "2GiB" in text
    assert "300ms" in text
