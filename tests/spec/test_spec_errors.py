"""Errors a person can act on: file:line: field: message, all at once, never a traceback."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmstate.errors import KvmstateError, Problem, SpecError
from kvmstate.loader import load_spec, parse_spec_text

MakeSpec = Callable[..., str]


def line_no(text: str, marker: str) -> int:
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if line == marker]
    assert len(hits) == 1, (marker, hits)
    return hits[0]


def problems(text: str, path: str = "specs/x.yaml") -> list[Problem]:
    with pytest.raises(SpecError) as info:
        parse_spec_text(text, path)
    assert "Traceback" not in str(info.value)
    return info.value.problems


# --- the format --------------------------------------------------------------------------------


def test_problem_format() -> None:
    p = Problem("specs/x.yaml", 23, ("domains", "web", "memory"), "invalid size 'x'")
    assert str(p) == "specs/x.yaml:23: domains.web.memory: invalid size 'x'"
    assert p.field == "domains.web.memory"
    p = Problem("specs/x.yaml", 7, ("domains", "web", "disks", 0, "volume"), "m")
    assert str(p) == "specs/x.yaml:7: domains.web.disks.0.volume: m"
    assert str(Problem("x.yaml", 1, (), "the spec is empty")) == "x.yaml:1: the spec is empty"
    assert str(Problem("x.yaml", None, (), "no such file")) == "x.yaml: no such file"
    w = Problem("x.yaml", 3, ("mounts", "m"), "careful", "warning")
    assert str(w) == "x.yaml:3: mounts.m: warning: careful"


def test_spec_error_is_every_problem_one_per_line(make_spec: MakeSpec) -> None:
    text = make_spec(("    memory: 1GiB\n", "    memory: lots\n"), ("  port: 22\n", "  port: 0\n"))
    with pytest.raises(SpecError) as info:
        parse_spec_text(text, "specs/x.yaml")
    err = info.value
    assert isinstance(err, KvmstateError)
    assert isinstance(err, ValueError)
    assert str(err).splitlines() == [str(p) for p in err.problems]
    assert len(err.problems) == 2
    for p in err.problems:
        assert str(p).startswith(f"specs/x.yaml:{p.line}: {p.field}: ")


def test_the_documented_example(make_spec: MakeSpec) -> None:
    text = make_spec(("    memory: 1GiB\n", "    memory: 2 parsecs\n"))
    (p,) = problems(text)
    n = line_no(text, "    memory: 2 parsecs")
    assert str(p) == (
        f"specs/x.yaml:{n}: domains.web.memory: invalid size '2 parsecs': "
        "use a number with a unit, like 2GiB or 512MiB"
    )


# --- all errors at once ------------------------------------------------------------------------


def test_three_independent_shape_errors_are_three_problems(make_spec: MakeSpec) -> None:
    text = make_spec(
        ("    memory: 1GiB\n", "    memory: lots\n"),
        ("    address: 10.0.0.12\n", "    address: 'a b'\n"),
        ("    mountpoint: /srv/images\n", "    mountpoint: srv/images\n"),
    )
    got = problems(text)
    assert len(got) == 3
    assert {p.field for p in got} == {
        "domains.web.memory",
        "hosts.kvm-2.address",
        "subvolumes.images.mountpoint",
    }
    assert all(p.line is not None for p in got)


def test_three_independent_reference_errors_are_three_problems(make_spec: MakeSpec) -> None:
    text = make_spec(
        ("    export: images\n", "    export: nope\n"),
        ("    pool: images\n", "    pool: nope\n"),
        ("      - volume: web.qcow2\n", "      - volume: nope\n"),
    )
    got = problems(text)
    assert [p.field for p in got] == [
        "mounts.images.export",
        "volumes.web.qcow2.pool",
        "domains.web.disks.0.volume",
    ]
    assert [p.line for p in got] == [
        line_no(text, "    export: nope"),
        line_no(text, "    pool: nope"),
        line_no(text, "      - volume: nope"),
    ]


def test_shape_and_reference_errors_are_reported_together(make_spec: MakeSpec) -> None:
    text = make_spec(
        ("    memory: 1GiB\n", "    memory: lots\n"),
        ("    pool: images\n", "    pool: nope\n"),
        ("    export: images\n", "    export: nope\n"),
    )
    got = problems(text)
    assert len(got) == 3, got
    assert sorted(p.field for p in got) == [
        "domains.web.memory",
        "mounts.images.export",
        "volumes.web.qcow2.pool",
    ]
    assert got == sorted(got, key=lambda p: p.line or 0)  # in file order


def test_a_reference_to_an_entry_left_out_for_its_shape_is_not_reported(
    make_spec: MakeSpec,
) -> None:
    # the volume has a shape error; the domain's disk names it: not a dangling reference
    text = make_spec(("    capacity: 8GiB\n", "    capacity: huge\n"))
    got = problems(text)
    assert [p.field for p in got] == ["volumes.web.qcow2.capacity"], got


def test_many_errors_in_one_list_are_all_reported(make_spec: MakeSpec) -> None:
    text = make_spec(("    packages: [qemu-kvm, nfs-common]\n", "    packages: [A, B, C, D, E]\n"))
    got = problems(text)
    assert [p.field for p in got] == [f"hosts.kvm-1.packages.{i}" for i in range(5)]


def test_a_newline_in_a_key_cannot_forge_an_error_line(make_spec: MakeSpec) -> None:
    text = make_spec(("  web:\n    memory", '  "web\\nspecs/x.yaml:1: all good":\n    memory'))
    with pytest.raises(SpecError) as info:
        parse_spec_text(text, "specs/x.yaml")
    err = info.value
    assert len(err.problems) == 1
    assert len(str(err).splitlines()) == 1


# --- line numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "parent", "field"),
    [
        (("    memory: 1GiB\n", ""), "  web:", "domains.web.memory"),
        (("    address: 10.0.0.12\n", ""), "  kvm-2:", "hosts.kvm-2.address"),
        (("    pool: images\n    format", "    format"), "  web.qcow2:", "volumes.web.qcow2.pool"),
        (
            ("      - volume: web.qcow2\n        target: vda\n", "      - target: vda\n"),
            "      - target: vda",
            "domains.web.disks.0.volume",
        ),
        (
            ("      - network: 10.0.0.0/24\n        options", "      - options"),
            "      - options: [rw, sync, no_subtree_check]",
            "exports.images.clients.0.network",
        ),
        (
            ("      max_downtime: 300ms\n", "      downtime_steps:\n        - after: 1m\n"),
            "        - after: 1m",
            "domains.web.migration.downtime_steps.0.max_downtime",
        ),
    ],
)
def test_missing_field_points_at_its_parent(
    make_spec: MakeSpec, edit: tuple[str, str], parent: str, field: str
) -> None:
    text = make_spec(edit)
    (p,) = problems(text)
    assert p.field == field
    assert p.message == "required field is missing"
    assert p.line == line_no(text, parent)


@pytest.mark.parametrize(
    ("edit", "marker", "field"),
    [
        (("    vcpus: 2\n", "    vcpus: 0\n"), "    vcpus: 0", "domains.web.vcpus"),
        (
            (
                "    hosts: [kvm-1, kvm-2]\n    mountpoint",
                "    hosts: [kvm-1, 'a;b']\n    mountpoint",
            ),
            "    hosts: [kvm-1, 'a;b']",
            "mounts.images.hosts.1",
        ),
        (
            (
                "        options: [rw, sync, no_subtree_check]\n",
                "        options:\n          - rw\n          - 'a b'\n",
            ),
            "          - 'a b'",
            "exports.images.clients.0.options.1",
        ),
        (("  kvm-2:\n", "  'kvm 2':\n"), "  'kvm 2':", "hosts.kvm 2"),
    ],
)
def test_an_existing_field_points_at_its_own_line(
    make_spec: MakeSpec, edit: tuple[str, str], marker: str, field: str
) -> None:
    text = make_spec(edit)
    got = problems(text)
    p = next(p for p in got if p.field == field)
    assert p.line == line_no(text, marker)


def test_flow_style_mapping_errors_have_lines() -> None:
    text = "version: 1\nhosts: {h: {address: 10.0.0.1}, 'bad name': {address: x}}\n"
    (p,) = problems(text)
    assert (p.line, p.field) == (2, "hosts.bad name")


def test_every_problem_of_the_corpus_has_a_line() -> None:
    corpus = sorted((Path(__file__).parent / "corpus").glob("*.yaml"))
    assert corpus
    for path in corpus:
        try:
            load_spec(path)
        except SpecError as e:
            assert all(p.line is not None for p in e.problems), path.name


# --- hostile bytes and hostile YAML ------------------------------------------------------------


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b"])
def test_raw_control_character_reports_its_line(char: str) -> None:
    text = f"version: 1\nhosts:\n  h:\n    address: 10.0.0.1{char}\n"
    (p,) = problems(text)
    assert p.line == 4
    assert "\n" not in p.message
    assert "<unicode string>" not in p.message


def test_raw_control_character_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "nul.yaml"
    f.write_bytes(b"version: 1\nhosts:\n  h:\n    address: 10.0.0.1\x00\n")
    with pytest.raises(SpecError) as info:
        load_spec(f)
    assert str(info.value).startswith(str(f))
    assert "character '\\x00' is not allowed" in str(info.value)


def _alias_bomb(levels: int) -> str:
    text = "version: 1\nhosts:\n  h:\n    address: 10.0.0.1\n"
    text += "x-0: &a0 [l, o, l, o, l, o, l, o, l, o]\n"
    for i in range(1, levels + 1):
        text += f"x-{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n"
    return text


def test_small_alias_use_is_handled() -> None:
    got = problems(_alias_bomb(2))
    assert {p.field for p in got} == {"x-0", "x-1", "x-2"}


@pytest.mark.timeout(5)
def test_alias_bomb_is_refused_quickly() -> None:
    start = time.monotonic()
    with pytest.raises(SpecError):
        parse_spec_text(_alias_bomb(6), "bomb.yaml")
    assert time.monotonic() - start < 3


# --- files -------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: no such file"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("version: 1\nhosts:\n  caf\xe9:\n".encode("latin-1"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: cannot read")


def test_a_directory(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: cannot read")


def test_load_spec_keeps_the_path_as_given(make_spec: MakeSpec, tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(make_spec(), encoding="utf-8")
    loaded = load_spec(str(path))
    assert loaded.path == str(path)
    assert loaded.line_of(("domains", "web", "memory")) == line_no(make_spec(), "    memory: 1GiB")
    # an unknown deeper loc falls back to the deepest known prefix
    assert loaded.line_of(("domains", "web", "nothing", 3)) == line_no(make_spec(), "  web:")
