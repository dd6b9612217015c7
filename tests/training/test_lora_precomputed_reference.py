"""The LoRA recipes' precomputed reference: log-probs of the base (adapters off) computed once,
equal to the adapters-off forward on every layout, and loaded from the cache by a later run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_packing_logps import random_pairs, tiny_lora_model

from dpokit.data import collate_preference_pairs, pack_preference_dataset
from dpokit.distributed.sampler import training_sampler
from dpokit.models import disable_adapter
from dpokit.training import AdapterOffReference, precomputed_references, weights_fingerprint


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix_shared"])
def test_precomputed_equals_adapters_off_on_every_layout(tmp_path, layout):
    model = tiny_lora_model("llama")  # adapters non-zero: adapters on would differ
    pairs, validation = random_pairs(23, seed=4), {None: random_pairs(7, seed=5)}
    collate = lambda items: collate_preference_pairs(items, pad_id=0)  # noqa: E731
    with disable_adapter(model):
        reference, validation_refs, note = precomputed_references(
            model, pairs, validation, collate, weights=weights_fingerprint(model), cache_dir=tmp_path,
            batch_size=4, device=torch.device("cpu"), dtype="fp32",
        )  # fmt: skip
    assert "precomputed" in note
    dataset = pairs
    if layout != "padded":
        dataset = pack_preference_dataset(pairs, pack_size=64, prefix_sharing=layout == "prefix_shared")
    sampler = training_sampler(
        dataset, pad_id=0, batch_size=2, gradient_accumulation_steps=1, rank=0, world_size=1, seed=0
    )
    adapters_off = AdapterOffReference(model)
    for _ in range(sampler.steps_per_epoch):
        for batch in sampler.next_step():
            want, got = adapters_off.logps(batch), reference.logps(batch)
            torch.testing.assert_close(
                got.chosen, want.chosen, rtol=1e-6, atol=1e-6
            )  # sums of ~40: 1e-6 relative is a few fp32 ulps
            torch.testing.assert_close(
                got.rejected, want.rejected, rtol=1e-6, atol=1e-6
            )  # sums of ~40: 1e-6 relative is a few fp32 ulps
    # A second run with the same base weights and data reads the tables: no forward at all.
    forward = model.forward
    model.forward = model.hidden_states = lambda *a, **k: pytest.fail("the cached reference ran a forward")
    try:
        again, _, note = precomputed_references(
            model, pairs, validation, collate, weights=weights_fingerprint(model), cache_dir=tmp_path,
            batch_size=4, device=torch.device("cpu"), dtype="fp32",
        )  # fmt: skip
    finally:
        model.forward = forward
        del model.hidden_states
    assert "loaded from cache" in note and torch.equal(again.chosen, reference.chosen)
    # Other base weights are another key: computed again, not read.
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight.add_(1e-3)
    assert weights_fingerprint(model) != weights_fingerprint(tiny_lora_model("llama"))


def lora_run(out, *overrides):
    command = [
        sys.executable, "-m", "dpokit.cli", "run", "dpo_lora_single_device", "--config", "tiny", "device=cpu",
        f"output_dir={out}", "max_steps=4", "eval_every=2", *overrides,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


@pytest.mark.subprocess
def test_a_sweep_pays_the_reference_once_and_trains_as_adapter_off(tmp_path):
    cache = f"reference.cache_dir={tmp_path / 'cache'}"
    runs = {}
    for name, extra in [
        ("adapter_off", []),
        ("first", ["reference.strategy=precomputed", cache]),
        ("second", ["reference.strategy=precomputed", cache, "optimizer.lr=0.001"]),
    ]:
        result = lora_run(tmp_path / name, *extra)
        assert result.returncode == 0, result.stderr
        runs[name] = (
            result.stdout + result.stderr,
            [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").open()],
        )
    assert "reference log-probs precomputed" in runs["first"][0]
    assert "reference log-probs loaded from cache" in runs["second"][0]  # another lr, same base and data
    base = [r for r in runs["adapter_off"][1] if r["split"] in ("train", "validation")]
    pre = [r for r in runs["first"][1] if r["split"] in ("train", "validation")]
    assert [r["step"] for r in pre] == [r["step"] for r in base]
    for a, b in zip(base, pre):
        for key in ("loss", "acc", "reward_margin", "rewards_chosen_mean", "rewards_rejected_mean", "logps_chosen"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    # A table lookup, not a forward: the reference phase is a small fraction of the policy's.
    train = [r for r in runs["second"][1] if r["split"] == "train"]
    assert train and all(r["reference_s"] < 0.2 * r["policy_s"] for r in train)


def test_the_same_weights_in_another_architecture_are_another_key(tmp_path):
    """The weights' fingerprint does not see RoPE theta, windows or soft-caps: the key must."""
    from dpokit.models import lora_llama

    model = tiny_lora_model("llama")
    other = lora_llama(**{**model.args, "rope_theta": 1234.0}, lora_targets=["q_proj", "v_proj"], lora_rank=4)
    other.load_state_dict(model.state_dict(), strict=False)
    assert weights_fingerprint(other) == weights_fingerprint(model)
    pairs, validation = random_pairs(5, seed=6), {None: random_pairs(3, seed=7)}
    collate = lambda items: collate_preference_pairs(items, pad_id=0)  # noqa: E731
    notes = []
    for m in (model, other):
        _, _, note = precomputed_references(
            m, pairs, validation, collate, weights=weights_fingerprint(m), cache_dir=tmp_path,
            batch_size=4, device=torch.device("cpu"), dtype="fp32",
        )  # fmt: skip
        notes.append(note)
    assert all("precomputed" in n for n in notes)  # the second did not read the first's table


def test_longrope_data_past_the_switch_is_refused_for_a_precomputed_reference(tmp_path):
    from dpokit.errors import DpokitError
    from dpokit.models import lora_llama
    from dpokit.models.transformer import LongRopeScaling

    model = lora_llama(
        vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64,
        fused_projections=True, lora_targets=["qkv_proj"], lora_rank=4,
        rope_scaling=LongRopeScaling((1.0, 1.5, 2.0, 3.0), (2.0, 4.0, 8.0, 16.0), 12, attention_factor=1.1),
    )  # fmt: skip
    pairs = random_pairs(6, seed=8)  # up to 24 tokens: past the 12 of the switch
    collate = lambda items: collate_preference_pairs(items, pad_id=0)  # noqa: E731
    with pytest.raises(DpokitError, match="LongRoPE switches factors for its whole batch"):
        precomputed_references(
            model, pairs, {None: pairs}, collate, weights="w", cache_dir=tmp_path, batch_size=4,
            device=torch.device("cpu"), dtype="fp32",
        )  # fmt: skip
