"""`evaluate_checkpoint` / `load_for_inference` on an HF base + PEFT adapter, against metrics
computed by hand: one pair at a time, full logits, plain log-softmax sums."""

import json

import pytest
import torch
import torch.nn.functional as F

from dpokit.data import PreferenceDataset, bundled_task_path, byte_tokenizer
from dpokit.errors import DpokitError
from dpokit.eval_checkpoint import EvalData, eval_table, evaluate_checkpoint
from dpokit.models import adapter_params, load_hf_checkpoint, save_hf_checkpoint, tiny
from dpokit.resolve import load_for_inference
from dpokit.training.export import save_lora_checkpoint

BETA = 0.1


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    save_hf_checkpoint(tiny(), root / "base")
    model = load_hf_checkpoint(root / "base", lora={"lora_targets": ["q_proj", "v_proj"], "lora_rank": 4})
    torch.manual_seed(1)
    with torch.no_grad():
        for param in adapter_params(model).values():
            param.normal_(0, 0.1)  # lora_b starts at zero: make the adapter change the model
    save_lora_checkpoint(model, root / "trained", source_dir=root / "base")
    lines = bundled_task_path("case_following", "validation").read_text().splitlines()[:12]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root, model


def response_logp(model, prompt, response):
    ids = torch.tensor([prompt + response])
    logprobs = F.log_softmax(model(ids)[0, :-1].double(), -1)
    targets = ids[0, 1:]
    return logprobs[torch.arange(len(targets)), targets][len(prompt) - 1 :].sum().item()


def by_hand(policy, reference, data_path):
    pairs = PreferenceDataset(data_path, byte_tokenizer(), max_seq_len=256)
    sums = dict.fromkeys(("acc", "reward_margin", "rewards_chosen_mean", "rewards_rejected_mean"), 0.0)
    sums.update(preference_loss=0.0, logps_chosen=0.0, logps_rejected=0.0)
    with torch.no_grad():
        for pair in pairs:
            logps = {k: response_logp(policy, pair["prompt_ids"], pair[f"{k}_ids"]) for k in ("chosen", "rejected")}
            ref = {k: response_logp(reference, pair["prompt_ids"], pair[f"{k}_ids"]) for k in ("chosen", "rejected")}
            chosen, rejected = BETA * (logps["chosen"] - ref["chosen"]), BETA * (logps["rejected"] - ref["rejected"])
            sums["acc"] += float(chosen > rejected)
            sums["reward_margin"] += chosen - rejected
            sums["rewards_chosen_mean"] += chosen
            sums["rewards_rejected_mean"] += rejected
            sums["preference_loss"] += -F.logsigmoid(torch.tensor(chosen - rejected, dtype=torch.float64)).item()
            sums["logps_chosen"] += logps["chosen"]
            sums["logps_rejected"] += logps["rejected"]
    return {k: v / len(pairs) for k, v in sums.items()}, len(pairs)


def test_adapter_and_merged_folder_match_metrics_by_hand(checkpoints):
    root, model = checkpoints
    data = EvalData(root / "data.jsonl")
    expected, pairs = by_hand(model.eval(), load_hf_checkpoint(root / "base").eval(), root / "data.jsonl")
    assert 0 < expected["acc"] < 1 and abs(expected["reward_margin"]) > 1e-3  # a real difference to find
    results = [
        evaluate_checkpoint(root / "trained" / "adapter", data, tokenizer="byte", batch_size=5),  # base: its config
        evaluate_checkpoint(root / "trained" / "adapter", data, base=root / "base", tokenizer="byte"),
        evaluate_checkpoint(root / "trained", data, reference=root / "base", tokenizer="byte", batch_size=3),
    ]
    for result in results:
        assert result.pairs == pairs
        for name, value in expected.items():
            tolerance = 1e-3 if name.startswith("logps") else 1e-5  # fp32 batched sums of ~100 tokens
            assert result.metrics[name] == pytest.approx(value, abs=tolerance), name
    assert results[0].reference.startswith("the base with adapters off") and str(root / "base") in results[0].reference
    assert results[2].reference == str(root / "base")
    table = eval_table(results, data.label())
    assert table.splitlines()[1].split() == ["metric", "[1]", "[2]", "[3]"]


def test_load_for_inference_adapter_runs_base_with_adapters_off(checkpoints):
    root, model = checkpoints
    from dpokit.models import disable_adapter

    loaded = load_for_inference(root / "trained" / "adapter")
    assert loaded.adapter == root / "trained" / "adapter" and loaded.run is None
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), model(ids))
        with disable_adapter(loaded.model):
            torch.testing.assert_close(loaded.model(ids), load_hf_checkpoint(root / "base")(ids))


def test_what_cannot_be_evaluated_is_one_clear_error(checkpoints, tmp_path):
    root, _ = checkpoints
    data = EvalData(root / "data.jsonl")
    with pytest.raises(DpokitError, match="no reference known .*--reference REF"):
        evaluate_checkpoint(root / "trained", data, tokenizer="byte")
    with pytest.raises(DpokitError, match="no tokenizer files"):
        evaluate_checkpoint(root / "trained", data, reference=root / "base")
    elsewhere = tmp_path / "adapter"
    elsewhere.mkdir()
    config = json.loads((root / "trained" / "adapter" / "adapter_config.json").read_text())
    (elsewhere / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/model"}))
    with pytest.raises(DpokitError, match="no adapter_model.safetensors"):
        load_for_inference(elsewhere)
    weights = "adapter_model.safetensors"
    (elsewhere / weights).write_bytes((root / "trained" / "adapter" / weights).read_bytes())
    with pytest.raises(DpokitError, match="'org/model', not a local HF folder: name the base"):
        load_for_inference(elsewhere)
    with pytest.raises(DpokitError, match="preference data file not found"):
        EvalData(tmp_path / "missing.jsonl")
