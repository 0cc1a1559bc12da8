"""Compose recipes the way the CLI does, for tests."""

from __future__ import annotations

from hydra import compose, initialize_config_dir

from pipeline.cli import RECIPES_DIR, resolved_config


def compose_recipe(overrides: list[str] | None = None, config_name: str = "pipeline") -> dict:
    with initialize_config_dir(RECIPES_DIR, version_base="1.3"):
        return resolved_config(compose(config_name, overrides=overrides or []))
