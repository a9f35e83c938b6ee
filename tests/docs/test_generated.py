"""Generated docs are fresh, and the JSON Schema accepts every checked-in spec."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from kvmstate import docgen

ROOT = Path(__file__).resolve().parents[2]


def test_spec_reference_is_fresh() -> None:
    committed = (ROOT / "docs" / "spec-reference.md").read_text()
    assert committed == docgen.spec_reference(), "run: python -m kvmstate.docgen"


def test_json_schema_is_fresh() -> None:
    committed = (ROOT / "docs" / "kvmstate.schema.json").read_text()
    assert committed == docgen.json_schema(), "run: python -m kvmstate.docgen"


@pytest.mark.parametrize("path", sorted((ROOT / "specs").glob("*.yaml")), ids=lambda p: p.name)
def test_schema_validates_checked_in_specs(path: Path) -> None:
    schema = json.loads((ROOT / "docs" / "kvmstate.schema.json").read_text())
    jsonschema.validate(yaml.safe_load(path.read_text()), schema)


def test_schema_rejects_unknown_fields() -> None:
    schema = json.loads(docgen.json_schema())
    spec = yaml.safe_load((ROOT / "specs" / "seed.yaml").read_text())
    spec["domains"]["nested-ubuntu18.04"]["memroy"] = "2GiB"
    with pytest.raises(jsonschema.ValidationError, match="memroy"):
        jsonschema.validate(spec, schema)
