"""Schemas: what we emit validates; hand-broken documents are rejected naming the offending field's path."""

from __future__ import annotations

import copy
import json

import pytest

from pipeline.convert.converter import convert
from pipeline.convert.registry import MappingArgs
from pipeline.convert.sources import open_source
from pipeline.errors import PipelineError
from pipeline.schemas import SCHEMA_DIR, load_schema, schema_errors, validate


@pytest.mark.parametrize("name", sorted(p.name.split(".")[0] for p in SCHEMA_DIR.glob("*.schema.json")))
def test_schemas_are_valid_draft_2020_12(name):
    import jsonschema

    schema = load_schema(name)
    assert schema["$schema"].endswith("2020-12/schema")
    jsonschema.Draft202012Validator.check_schema(schema)


@pytest.fixture(scope="module")
def emitted_config(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    convert(open_source("hf", tiny_models["qwen2_bias"]), out, "float16", MappingArgs(2, 1), progress=False)
    return json.loads((out / "config.json").read_text())


def test_emitted_config_validates(emitted_config):
    assert schema_errors(emitted_config, "checkpoint_config") == []


BREAKAGES = [
    (lambda c: c.update(dtype="float64"), "$.dtype"),
    (lambda c: c["mapping"].update(rank=0), "$.mapping"),
    (lambda c: c["mapping"].pop("world_size"), "$.mapping"),
    (lambda c: c["quantization"].update(quant_algo="INT8"), "$.quantization.quant_algo"),
    (lambda c: c.update(architecture="LLaMAForCausalLM"), "$.architecture"),
    (lambda c: c.update(num_attention_heads=0), "$.num_attention_heads"),
    (lambda c: c.update(position_embedding_type="rope"), "$.position_embedding_type"),
    (lambda c: c.pop("qwen_type"), "$"),
    (lambda c: c.update(rotary_scaling={"factor": 2.0}), "$.rotary_scaling"),
]


@pytest.mark.parametrize("breakage,path", BREAKAGES, ids=[p + str(i) for i, (_, p) in enumerate(BREAKAGES)])
def test_broken_config_rejected_with_path(emitted_config, breakage, path):
    broken = copy.deepcopy(emitted_config)
    breakage(broken)
    with pytest.raises(PipelineError) as err:
        validate(broken, "checkpoint_config", what="config.json")
    assert f"{path}:" in str(err.value) or f"{path}." in str(err.value), str(err.value)
