"""Generate docs/spec-reference.md and docs/kvmstate.schema.json from the pydantic models.

``python -m kvmstate.docgen`` rewrites both; a test fails when the committed copies are stale.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

if TYPE_CHECKING:
    from kvmstate.resources.registry import Registry


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = get_args(tp)
        names = {getattr(m, "__name__", "") for m in meta}
        for m in meta:
            func = getattr(m, "func", None)
            if func is not None:
                names.add(getattr(func, "__name__", ""))
        if "parse_size" in names:
            return "size"
        if "parse_duration" in names:
            return "duration"
        return _type_name(base)
    if origin in (Union, types.UnionType):
        parts = [_type_name(a) for a in get_args(tp) if a is not type(None)]
        return " | ".join(parts)
    if origin is Literal:
        return " | ".join(f"`{a}`" for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is tuple:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"map of name → {_type_name(get_args(tp)[1])}"
    if isinstance(tp, type):
        if issubclass(tp, BaseModel):
            return tp.__name__
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            tp.__name__, tp.__name__
        )
    return str(tp)


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(defaults)"
        return f"`{json.dumps(value)}`" if value not in ({}, []) else "empty"
    if field.default is None or field.default is PydanticUndefined:
        return "unset"
    return f"`{json.dumps(field.default)}`"


def spec_reference(registry: Registry | None = None) -> str:
    out = [
        "# Spec reference",
        "",
        "Generated from the pydantic models by `python -m kvmstate.docgen`; do not edit by hand.",
        "Sizes are bytes or a number with a unit (`512MiB`, `2GiB`); durations are seconds",
        "or a number with a unit (`300ms`, `30s`, `10m`). Names are 1-63 letters, digits,",
        "`.`, `_`, `-`. Paths are absolute, without `..`, spaces or shell metacharacters.",
        "Unknown fields are errors.",
        "",
    ]
    from kvmstate.resources import REGISTRY

    for where, model, text in ((d.where, d.model, d.text) for d in (registry or REGISTRY).docs()):
        out += [f"## `{where}` — {model.__name__}", "", text, "", "| field | type | default | |"]
        out.append("|---|---|---|---|")
        for name, field in model.model_fields.items():
            desc = (field.description or "").replace("|", "\\|")
            out.append(
                f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {desc} |"
            )
        out.append("")
    return "\n".join(out)


def json_schema(registry: Registry | None = None) -> str:
    from kvmstate.resources import REGISTRY

    schema = (registry or REGISTRY).spec_model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "kvmstate spec"
    return json.dumps(schema, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    root = Path(argv[0] if argv else Path(__file__).resolve().parent.parent)
    (root / "docs").mkdir(exist_ok=True)
    (root / "docs" / "spec-reference.md").write_text(spec_reference())
    (root / "docs" / "kvmstate.schema.json").write_text(json_schema())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
