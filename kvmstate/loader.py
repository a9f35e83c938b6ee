"""Load a spec file: YAML with line numbers -> validated ``Spec``, or ``SpecError`` listing
every problem as ``file:line: field.path: message``."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from kvmstate.errors import Problem, SpecError, line_of
from kvmstate.spec import Spec

if TYPE_CHECKING:
    from kvmstate.checks import Finding

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class LoadedSpec:
    spec: Spec
    path: str
    lines: dict[Loc, int] = field(default_factory=dict)
    warnings: tuple[Problem, ...] = ()

    def line_of(self, loc: Loc) -> int | None:
        return line_of(self.lines, loc)


class _YamlProblem(Exception):
    def __init__(self, line: int | None, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.loc = loc
        self.message = message


MAX_NODES = 100_000  # a spec for hundreds of hosts is far below; an alias bomb is far above
_PLAIN_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}


def _compose(text: str, lines: dict[Loc, int]) -> Any:
    """Parse YAML keeping the line of every key; duplicate keys are errors, not overwrites.

    Aliases are expanded with a budget (an 'alias bomb' is refused, a recursive alias too) and
    explicit tags on mappings and sequences are refused, not silently dropped.
    """
    # libyaml's parser when present (4x faster on a 200-host spec), same nodes and marks; on
    # a syntax error, the pure-Python parser again for its clearer message ("found '\t'").
    try:
        node = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is None:
        return None
    constructor = yaml.SafeLoader("")
    budget = [MAX_NODES]
    active: set[int] = set()

    def build(n: yaml.Node, loc: Loc) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise _YamlProblem(
                n.start_mark.line + 1,
                loc,
                f"the spec expands to more than {MAX_NODES} values (YAML aliases?)",
            )
        if isinstance(n, yaml.MappingNode | yaml.SequenceNode):
            if n.tag not in _PLAIN_TAGS:
                raise _YamlProblem(n.start_mark.line + 1, loc, f"YAML tag {n.tag!r} is not allowed")
            if id(n) in active:
                raise _YamlProblem(n.start_mark.line + 1, loc, "recursive YAML alias")
            active.add(id(n))
            try:
                return build_collection(n, loc)
            finally:
                active.discard(id(n))
        return constructor.construct_object(n, deep=True)

    def build_collection(n: yaml.Node, loc: Loc) -> Any:
        if isinstance(n, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in n.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise _YamlProblem(
                        key_node.start_mark.line + 1, loc, "YAML merge keys (<<) are not supported"
                    )
                key = constructor.construct_object(key_node, deep=True)
                if not isinstance(key, str | int):
                    raise _YamlProblem(key_node.start_mark.line + 1, loc, "keys must be strings")
                if isinstance(key, int):
                    key = str(key)
                if key in out:
                    first = lines.get((*loc, key))
                    raise _YamlProblem(
                        key_node.start_mark.line + 1,
                        (*loc, key),
                        f"duplicate key {key!r} (first defined on line {first})",
                    )
                lines[(*loc, key)] = key_node.start_mark.line + 1
                out[key] = build(value_node, (*loc, key))
            return out
        if isinstance(n, yaml.SequenceNode):
            items = []
            for i, item in enumerate(n.value):
                lines[(*loc, i)] = item.start_mark.line + 1
                items.append(build(item, (*loc, i)))
            return items
        raise AssertionError(n)

    lines[()] = node.start_mark.line + 1
    return build(node, ())


def _unwrap(tp: Any) -> list[Any]:
    """The concrete types inside Annotated / Optional / unions."""
    origin = get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(get_args(tp)[0])
    if origin in (Union, types.UnionType):
        out: list[Any] = []
        for arg in get_args(tp):
            if arg is not type(None):
                out.extend(_unwrap(arg))
        return out
    return [tp]


def _model_at(loc: Loc, model: type[BaseModel] = Spec) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at ``loc`` (for 'did you mean')."""
    candidates: list[Any] = [model]
    for part in loc:
        nxt: list[Any] = []
        for tp in candidates:
            for t in _unwrap(tp):
                origin = get_origin(t)
                if isinstance(t, type) and issubclass(t, BaseModel) and isinstance(part, str):
                    f = t.model_fields.get(part)
                    if f is not None:
                        nxt.append(f.annotation)
                elif origin is dict:
                    nxt.append(get_args(t)[1])
                elif origin is list and isinstance(part, int):
                    nxt.append(get_args(t)[0])
        candidates = nxt
    for tp in candidates:
        for t in _unwrap(tp):
            if isinstance(t, type) and issubclass(t, BaseModel):
                return t
    return None


def _message(err: Any, spec_model: type[BaseModel] = Spec) -> str:
    kind = err["type"]
    loc = tuple(err["loc"])
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1], spec_model)
        name = str(loc[-1])
        if model is not None:
            import difflib  # a spec error's "did you mean": not on a valid spec's path

            allowed = list(model.model_fields)
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"unknown field {name!r}{hint} (allowed: {', '.join(allowed)})"
        return f"unknown field {name!r}"
    if kind == "missing":
        return "required field is missing"
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if kind in ("literal_error", "enum"):
        msg = f"{msg} (got {err.get('input')!r})"
    return msg


def _user_loc(raw: tuple[str | int, ...], data: Any) -> Loc:
    """pydantic puts markers such as ``function-after[...]`` or ``[key]`` in error locations;
    keep only the parts that name something in the user's data (plus a final missing or
    unknown field)."""
    out: list[str | int] = []
    cur = data
    for i, part in enumerate(raw):
        in_dict = isinstance(cur, dict) and part in cur
        in_list = isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur)
        if in_dict or in_list:
            out.append(part)
            cur = cur[part]
        elif i == len(raw) - 1 and isinstance(part, str) and isinstance(cur, dict | None):
            if part != "[key]":
                out.append(part)
        elif isinstance(part, int):
            out.append(part)
    return tuple(out)


def problems_from_validation(
    exc: ValidationError,
    path: str,
    lines: dict[Loc, int],
    data: Any = None,
    model: type[BaseModel] = Spec,
) -> list[Problem]:
    out = []
    for err in exc.errors():
        loc = _user_loc(tuple(err["loc"]), data)
        out.append(Problem(path, line_of(lines, loc), loc, _message(err, model)))
    return out


Checks = Callable[[Any], Iterable["Finding"]]


def sections_of(model: type[BaseModel]) -> tuple[str, ...]:
    """The top-level fields of ``model`` that are maps of named entries (hosts, pools...)."""
    return tuple(
        name
        for name, f in model.model_fields.items()
        if any(get_origin(t) is dict for t in _unwrap(f.annotation))
    )


def _references_despite(
    exc: ValidationError,
    data: dict[str, Any],
    path: str,
    lines: dict[Loc, int],
    model: type[Spec] = Spec,
    checks: Checks | None = None,
) -> list[Problem]:
    """The reference errors of a spec that also has shape errors, so that one run reports
    both: the entries with shape errors are left out, the rest is validated and checked, and
    a reference error that names a left-out entry is dropped (it is not really dangling)."""
    from kvmstate.checks import check_spec

    sections = sections_of(model)
    pruned = dict(data)
    dropped: set[str] = set()
    kinds: set[str] = set()  # "volume" when a volume was left out: its list is incomplete
    for err in exc.errors():
        loc = tuple(err["loc"])
        if not loc:
            return []
        top = loc[0]
        section = pruned.get(top) if isinstance(top, str) else None
        if top in sections and len(loc) > 1 and isinstance(section, dict):
            if loc[1] in section:
                pruned[top] = {k: v for k, v in section.items() if k != loc[1]}
                dropped.add(str(loc[1]))
                kinds.add(top.removesuffix("s"))
        elif isinstance(top, str) and top not in sections:
            pruned.pop(top, None)  # version, ssh, migration: their defaults
        else:
            return []  # a whole section is malformed: nothing sensible to check
    try:
        spec = model.model_validate(pruned)
    except ValidationError:
        return []
    out = []
    for loc, msg, severity in [*check_spec(spec), *(checks(spec) if checks else ())]:
        named = msg.split(" (defined:")[0]
        if (
            severity != "error"
            or any(repr(n) in named for n in dropped)
            or any(named.startswith(f"unknown {k} ") for k in kinds)
        ):
            continue
        out.append(Problem(path, line_of(lines, loc), loc, msg, severity))
    return out


def parse_spec_text(
    text: str, path: str = "<spec>", model: type[Spec] = Spec, checks: Checks | None = None
) -> LoadedSpec:
    """Validate spec text against ``model`` (the Spec of the registered kinds), then the
    cross-reference checks and ``checks`` (the kinds' own). Raises SpecError with every
    problem found."""
    from kvmstate.checks import check_spec  # local: checks imports spec models only

    lines: dict[Loc, int] = {}
    try:
        data = _compose(text, lines)
    except _YamlProblem as e:
        raise SpecError([Problem(path, e.line, e.loc, e.message)]) from None
    except yaml.reader.ReaderError as e:
        line = text[: e.position].count("\n") + 1
        char = chr(e.character) if isinstance(e.character, int) else str(e.character)
        raise SpecError(
            [Problem(path, line, (), f"YAML error: character {char!r} is not allowed in a spec")]
        ) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        mline = mark.line + 1 if mark else None
        what = e.problem or str(e)
        ctx = f" ({e.context})" if e.context else ""
        raise SpecError([Problem(path, mline, (), f"YAML syntax error: {what}{ctx}")]) from None
    except yaml.YAMLError as e:
        raise SpecError([Problem(path, None, (), f"YAML error: {e}")]) from None
    if data is None:
        raise SpecError([Problem(path, 1, (), "the spec is empty")])
    if not isinstance(data, dict):
        raise SpecError([Problem(path, lines.get(()), (), "the spec must be a mapping")])
    try:
        spec = model.model_validate(data)
    except ValidationError as e:
        shape = problems_from_validation(e, path, lines, data, model)
        refs = _references_despite(e, data, path, lines, model, checks)
        raise SpecError(sorted(shape + refs, key=lambda p: p.line or 0)) from None
    found = [
        Problem(path, line_of(lines, loc), loc, msg, severity)
        for loc, msg, severity in [*check_spec(spec), *(checks(spec) if checks else ())]
    ]
    errors = [p for p in found if p.severity == "error"]
    if errors:
        raise SpecError(errors)
    warnings = tuple(p for p in found if p.severity == "warning")
    return LoadedSpec(spec=spec, path=path, lines=lines, warnings=warnings)


def load_spec(
    path: str | Path, model: type[Spec] = Spec, checks: Checks | None = None
) -> LoadedSpec:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([Problem(str(path), None, (), "no such file")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError([Problem(str(path), None, (), f"cannot read: {e}")]) from None
    return parse_spec_text(text, str(path), model, checks)
