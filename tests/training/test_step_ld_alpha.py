"""`ld_alpha` (LD-DPO) in the distributed recipes reaches the policy forward and every reference.

The recipes' own `main` runs in one gloo process on a 2-layer model. Step 1 runs before any
update, so the policy is its reference: the logged step-1 log-probs must equal LD-DPO's weighted
sums computed directly (float64, from the seed's weights and the sampler's first global batch),
and the rewards must be 0, which holds only if the reference used the same `ld_alpha` (a plain-sum
reference would put every reward at beta * (LD sum - plain sum)). From step 2 on the loss differs
from the run without `ld_alpha`."""

from __future__ import annotations

import importlib
import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from _distributed_helpers import spawn
from dpokit.config import instantiate, load_config
from dpokit.data import collate_preference_pairs
from dpokit.data.synthetic import case_following_pairs
from dpokit.distributed.sampler import GlobalBatchSampler

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"
SMALL = {
    "vocab_size": 272,
    "dim": 32,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "hidden_dim": 64,
    "max_seq_len": 128,
    "rope_theta": 10000.0,
}
ALPHA = 0.5


def _unequal_lengths(pairs: list[dict]) -> list[dict]:
    """The task's responses have equal lengths (only their case differs), where LD-DPO changes
    nothing: lengthen the rejected response of even pairs and the chosen one of odd pairs."""
    for i, pair in enumerate(pairs):
        pair["rejected" if i % 2 == 0 else "chosen"] += " and then some more words"
    return pairs


def _config(tmp_path: Path, recipe: str) -> Path:
    cfg = OmegaConf.load(CONFIGS / recipe / "tiny.yaml")
    if recipe == "dpo_lora_distributed":
        cfg.model = {
            "_component_": "dpokit.models.lora_llama",
            "lora_targets": ["q_proj", "v_proj"],
            "lora_rank": 4,
            "lora_alpha": 8.0,
            **SMALL,
        }
    else:
        cfg.model = {"_component_": "dpokit.models.llama", **SMALL}
    for name, n, seed in (("train_dataset", 16, 0), ("validation_dataset", 4, 1)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in _unequal_lengths(case_following_pairs(n, seed))))
        cfg[name] = {"_component_": "dpokit.data.PreferenceDataset", "path": str(path), "max_seq_len": 128}
    cfg.batch_size, cfg.gradient_accumulation_steps, cfg.max_steps = 2, 2, 2
    cfg.eval_every, cfg.eval_batch_size, cfg.checkpoint.every = 100, 8, 0
    cfg.lr_scheduler.warmup_steps = 0
    path = tmp_path / f"{recipe}.yaml"
    OmegaConf.save(cfg, path)
    return path


def _worker(rank, runs, error_run):
    from dpokit.errors import DpokitError

    for recipe, config, overrides in runs:
        importlib.import_module(f"dpokit.recipes.{recipe}").main(load_config(config, overrides))
    recipe, config, overrides, error_file = error_run
    try:
        importlib.import_module(f"dpokit.recipes.{recipe}").main(load_config(config, overrides))
    except DpokitError as e:
        Path(error_file).write_text(str(e))


def _train_records(output_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == "train"}


def _direct_step1_logps(config: Path, ld_alpha: float | None) -> tuple[float, float]:
    """Mean chosen / rejected sequence log-probs of the first global batch under the recipe's
    initial weights, in float64: response tokens up to the shorter response of the pair count
    fully, the rest with weight `ld_alpha` (1 without)."""
    cfg = load_config(config)
    torch.manual_seed(cfg.seed)  # the recipe's random init (no checkpoint_dir)
    model = instantiate(cfg.model).double().eval()
    tokenizer = instantiate(cfg.tokenizer)
    train_set = instantiate(cfg.train_dataset, tokenizer=tokenizer)
    sampler = GlobalBatchSampler(
        train_set,
        partial(collate_preference_pairs, pad_id=tokenizer.pad_id),
        batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        rank=0,
        world_size=1,
        seed=cfg.seed,
    )
    tail_weight = 1.0 if ld_alpha is None else ld_alpha
    chosen, rejected = [], []
    with torch.no_grad():
        for batch in sampler.next_step():
            log_probs = torch.log_softmax(model(batch.input_ids), dim=-1)
            labels, pairs = batch.labels, batch.num_pairs
            responses = [
                log_probs[row, labels[row] != -100].gather(-1, labels[row, labels[row] != -100, None])[:, 0]
                for row in range(2 * pairs)
            ]
            for i in range(pairs):
                shared = min(len(responses[i]), len(responses[pairs + i]))
                for values, out in ((responses[i], chosen), (responses[pairs + i], rejected)):
                    out.append(values[:shared].sum().item() + tail_weight * values[shared:].sum().item())
    return sum(chosen) / len(chosen), sum(rejected) / len(rejected)


@pytest.mark.multiprocess
def test_ld_alpha_reaches_policy_and_reference_in_both_distributed_recipes(tmp_path):
    full, lora = _config(tmp_path, "dpo_full_distributed"), _config(tmp_path, "dpo_lora_distributed")
    runs, outputs = [], {}
    for name, recipe, config, extra in (
        ("full_swap_off", "dpo_full_distributed", full, []),
        ("full_swap", "dpo_full_distributed", full, [f"ld_alpha={ALPHA}"]),
        ("full_frozen", "dpo_full_distributed", full, [f"ld_alpha={ALPHA}", "reference.strategy=frozen"]),
        ("full_precomputed", "dpo_full_distributed", full, [f"ld_alpha={ALPHA}", "reference.strategy=precomputed"]),
        ("lora_off", "dpo_lora_distributed", lora, []),
        ("lora", "dpo_lora_distributed", lora, [f"ld_alpha={ALPHA}"]),
    ):
        outputs[name] = tmp_path / name
        runs.append((recipe, config, [f"output_dir={outputs[name]}", *extra]))
    error_file = tmp_path / "error.txt"
    spawn(
        _worker, 1, runs, ("dpo_lora_distributed", lora, [f"output_dir={tmp_path / 'bad'}", "ld_alpha=1.5"], error_file)
    )

    direct = {(config, alpha): _direct_step1_logps(config, alpha) for config in (full, lora) for alpha in (None, ALPHA)}
    for name, config, alpha in (
        ("full_swap_off", full, None),
        ("full_swap", full, ALPHA),
        ("full_frozen", full, ALPHA),
        ("full_precomputed", full, ALPHA),
        ("lora_off", lora, None),
        ("lora", lora, ALPHA),
    ):
        first = _train_records(outputs[name])[1]
        chosen, rejected = direct[(config, alpha)]
        assert first["logps_chosen"] == pytest.approx(chosen, rel=1e-5), name
        assert first["logps_rejected"] == pytest.approx(rejected, rel=1e-5), name
        # The reference saw the same ld_alpha: policy == reference, rewards 0, loss ln 2.
        assert first["rewards_chosen_mean"] == pytest.approx(0.0, abs=1e-5), name
        assert first["rewards_rejected_mean"] == pytest.approx(0.0, abs=1e-5), name
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6), name

    # The settings change the numbers: LD sums differ from plain sums, and so does the step-2 loss.
    for off, on in (("full_swap_off", "full_swap"), ("lora_off", "lora")):
        plain, ld = _train_records(outputs[off]), _train_records(outputs[on])
        assert abs(plain[1]["logps_chosen"] - ld[1]["logps_chosen"]) > 1.0
        assert abs(plain[2]["loss"] - ld[2]["loss"]) > 1e-4
    # Every reference strategy gives the same LD-DPO trajectory.
    swap = _train_records(outputs["full_swap"])
    for name in ("full_frozen", "full_precomputed"):
        other = _train_records(outputs[name])
        assert other[2]["loss"] == pytest.approx(swap[2]["loss"], abs=1e-5), name
    assert error_file.read_text() == "ld_alpha: 1.5 is not a number in [0, 1] (null turns LD-DPO off)"
