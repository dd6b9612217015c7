"""Starting LoRA DPO from an SFT adapter: a PEFT LoRA folder written by `peft` itself is merged
into the base as it loads. The merged model equals PEFT's base + adapter (logits), the DPO
adapters start at zero on top of it (policy == reference at step 0), and the final export is
base + SFT + DPO, as PEFT's merge of the two adapters in turn gives."""

from __future__ import annotations

import json

import pytest
import torch

from dpokit.models import load_hf_checkpoint
from dpokit.models.hf_checkpoint import plain_state_dict
from dpokit.models.hf_config import CheckpointError
from dpokit.models.lora import adapter_params, disable_adapter
from hf_fixtures import hf_logits, write_hf_checkpoint

peft = pytest.importorskip("peft")
TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
LORA = {"lora_targets": ["q_proj", "v_proj", "down_proj"], "lora_rank": 4, "lora_alpha": 8.0}


def _sft_adapter(base_model, out_dir, *, rslora=False, targets=("q_proj", "k_proj", "up_proj"), seed=1):
    """A trained-looking PEFT adapter: peft's own LoraConfig / save_pretrained, B made non-zero."""
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=list(targets), use_rslora=rslora, lora_dropout=0.0)
    model = peft.get_peft_model(base_model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out_dir)
    return model.eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_base_plus_sft_adapter_equals_peft_and_the_dpo_adapters_start_at_zero(tmp_path, rslora):
    base = write_hf_checkpoint("llama3_gqa", tmp_path / "base")
    sft = _sft_adapter(base, tmp_path / "sft", rslora=rslora)
    expected = hf_logits(sft, TOKENS)

    ours = load_hf_checkpoint(tmp_path / "base", lora=LORA, sft_adapter=tmp_path / "sft", dtype="fp32").eval()
    with torch.no_grad():
        policy = ours(TOKENS)
        with disable_adapter(ours):  # the DPO reference
            reference = ours(TOKENS)
    assert (policy - expected).abs().max().item() < 1e-5
    assert torch.equal(policy, reference)  # fresh DPO adapters are zero: policy == reference exactly
    plain = load_hf_checkpoint(tmp_path / "base", dtype="fp32").eval()
    with torch.no_grad():
        assert (plain(TOKENS) - expected).abs().max().item() > 1e-3  # the adapter changed the model


def test_the_export_is_base_plus_sft_plus_dpo_adapters(tmp_path):
    base = write_hf_checkpoint("llama3_gqa", tmp_path / "base")
    sft = _sft_adapter(base, tmp_path / "sft")
    merged_sft = sft.merge_and_unload()  # PEFT's base + SFT

    ours = load_hf_checkpoint(tmp_path / "base", lora=LORA, sft_adapter=tmp_path / "sft", dtype="fp32")
    torch.manual_seed(2)
    with torch.no_grad():
        for p in adapter_params(ours).values():
            p.normal_(0, 0.05)  # as if DPO trained them
        expected = ours(TOKENS)
    state = plain_state_dict(ours, torch.float32, source_dir=tmp_path / "base")
    exported = load_hf_checkpoint(tmp_path / "base", dtype="fp32")
    exported.load_state_dict(state)
    with torch.no_grad():
        assert (exported.eval()(TOKENS) - expected).abs().max().item() < 1e-5
        # untargeted by DPO but targeted by SFT: k_proj keeps the SFT update, not the stored base
        k = "layers.0.self_attn.k_proj.weight"
        assert torch.equal(state[k], merged_sft.model.layers[0].self_attn.k_proj.weight)


def test_adapters_a_plain_merge_would_get_wrong_are_refused(tmp_path):
    base = write_hf_checkpoint("llama3_gqa", tmp_path / "base")
    _sft_adapter(base, tmp_path / "sft")
    config_path = tmp_path / "sft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["use_dora"] = True
    config_path.write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"adapter_config.json: use_dora=True is not supported \(a plain LoRA merge\)$"
    ):
        load_hf_checkpoint(tmp_path / "base", lora=LORA, sft_adapter=tmp_path / "sft")
    with pytest.raises(
        CheckpointError, match=r"nowhere: no adapter_config.json \(expected a PEFT LoRA adapter folder\)$"
    ):
        load_hf_checkpoint(tmp_path / "base", lora=LORA, sft_adapter=tmp_path / "nowhere")


def test_an_adapter_for_another_model_is_refused(tmp_path):
    base = write_hf_checkpoint("llama3_gqa", tmp_path / "base")
    other = write_hf_checkpoint("llama3_gqa", tmp_path / "other")
    _sft_adapter(other, tmp_path / "sft")
    weights = tmp_path / "sft" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    tensors = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}  # a deeper model's layers
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=r"adapter weights for modules the model lacks: \['model.layers.7."):
        load_hf_checkpoint(tmp_path / "base", lora=LORA, sft_adapter=tmp_path / "sft")
    del base
