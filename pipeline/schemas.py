"""JSON Schema validation of everything the pipeline writes (schemas live in the top-level `schemas/` folder)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from pipeline.errors import PipelineError

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict[str, Any]:
    path = SCHEMA_DIR / f"{name}.schema.json"
    if not path.is_file():
        raise PipelineError(f"schema {path} is missing; is the package installed from a full source tree (pip install -e .)?")
    # Checked against the draft 2020-12 meta-schema by the test suite (tests/unit/test_schemas.py), not on every
    # run: that check walks every schema and costs more than all the validations of a cached run together.
    return json.loads(path.read_text())


@lru_cache(maxsize=None)
def _registry() -> Registry:
    """Every schema under its $id, so one schema can $ref another (the engine config embeds the checkpoint's)."""
    resources = []
    for path in sorted(SCHEMA_DIR.glob("*.schema.json")):
        schema = load_schema(path.name[: -len(".schema.json")])
        resources.append((schema["$id"], Resource.from_contents(schema, default_specification=DRAFT202012)))
    return Registry().with_resources(resources)


@lru_cache(maxsize=None)
def _validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_schema(name), registry=_registry())


def schema_errors(instance: Any, name: str) -> list[str]:
    """Every violation as 'json.path: message', best match first."""
    validator = _validator(name)
    errors = sorted(validator.iter_errors(instance), key=jsonschema.exceptions.relevance)
    return [f"{e.json_path}: {e.message}" for e in errors]


def validate(instance: Any, name: str, what: str) -> None:
    """Raise a PipelineError naming the JSON path of the first (most relevant) violation."""
    errors = schema_errors(instance, name)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise PipelineError(f"{what} violates schema {name}: {errors[0]}{more}")
