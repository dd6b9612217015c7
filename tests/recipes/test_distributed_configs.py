"""Every packaged config of the distributed recipes names exactly the keys its recipe reads, and
its model builds (on the meta device: shapes only) with the expected size."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from dpokit.config import check_keys, instantiate, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"
# Parameter counts of the published checkpoints (embeddings included).
EXPECTED = {
    "llama3_8b": 8.03e9,
    "llama3_1_8b": 8.03e9,
    "llama3_2_1b": 1.24e9,
    "llama3_2_3b": 3.21e9,
    "qwen2_5_7b": 7.62e9,
}


@pytest.mark.parametrize(
    "path", sorted(CONFIGS.glob("dpo_*_distributed/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}"
)
def test_distributed_configs_load_and_build(path):
    recipe = importlib.import_module(f"dpokit.recipes.{path.parent.name}")
    cfg = load_config(path)
    check_keys(cfg, recipe.CONFIG_KEYS)
    with torch.device("meta"):
        model = instantiate(cfg.model)
    params = sum(p.numel() for p in model.parameters())
    if path.stem in EXPECTED:
        assert params == pytest.approx(EXPECTED[path.stem], rel=0.01)
        assert cfg.reference.strategy in ("swap", "frozen", "precomputed", "none")
        module, _, name = cfg.tokenizer._component_.rpartition(".")
        assert callable(getattr(importlib.import_module(module), name))
