"""What we cannot load exactly is refused with one clear line naming the file and the field/key."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dpokit.errors import DpokitError
from dpokit.models import CheckpointError, load_hf_checkpoint, model_from_hf_config

LLAMA = dict(
    model_type="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rope_theta=10_000.0,
)
QWEN = dict(LLAMA, model_type="qwen2", use_sliding_window=False, sliding_window=4096, max_window_layers=28)


def test_published_style_configs_are_accepted():
    smollm = dict(
        LLAMA,
        architectures=["LlamaForCausalLM"],
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
        head_dim=8,
        hidden_act="silu",
        initializer_range=0.04,
        is_llama_config=True,
        mlp_bias=False,
        pretraining_tp=1,
        rms_norm_eps=1e-5,
        rope_interleaved=False,
        rope_scaling=None,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
        transformers_version="4.42.3",
        use_cache=True,
    )
    model = model_from_hf_config(smollm)
    assert model.lm_head is None and model.args["norm_eps"] == 1e-5
    qwen = model_from_hf_config(dict(QWEN, tie_word_embeddings=True, use_mrope=False))
    assert qwen.layers[0].self_attn.q_proj.bias is not None and qwen.layers[0].self_attn.o_proj.bias is None


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="gpt_neox"), "model_type 'gpt_neox' is not supported"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling type 'yarn' is not implemented"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope scaling type 'linear'"),
        (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "'dynamic'"),
        (dict(attention_bias=True), "attention_bias=True is not supported"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "missing"),
        (dict(hidden_size="32"), "hidden_size must be an integer"),
    ],
)
def test_unsupported_llama_configs_are_refused(change, message):
    with pytest.raises(CheckpointError, match=message):
        model_from_hf_config(dict(LLAMA, **change))


def test_qwen_sliding_windows_load_as_transformers_reads_them():
    on = model_from_hf_config(dict(QWEN, use_sliding_window=True, sliding_window=16, max_window_layers=0))
    assert on.windows == [16]
    assert model_from_hf_config(dict(QWEN, use_sliding_window=True, max_window_layers=1)).windows == [None]
    assert model_from_hf_config(dict(QWEN, use_sliding_window=True, sliding_window=None)).windows == [None]
    # without use_sliding_window transformers gives "sliding_attention" layers no window: refused
    with pytest.raises(CheckpointError, match=r"config: layer_types \['sliding_attention'\]: only"):
        model_from_hf_config(dict(QWEN, layer_types=["sliding_attention"]))
    with pytest.raises(CheckpointError, match="layer_types names 2 layers"):
        model_from_hf_config(dict(QWEN, use_sliding_window=True, layer_types=["sliding_attention"] * 2))
    with pytest.raises(CheckpointError, match="sliding_window must be a positive integer"):
        model_from_hf_config(dict(QWEN, use_sliding_window=True, sliding_window=0, max_window_layers=0))


def _write(tmp_path, config=LLAMA):
    model = model_from_hf_config(config)
    from dpokit.models import save_hf_checkpoint

    save_hf_checkpoint(model, tmp_path)
    return model


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    _write(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.0.mlp.up_proj.weight"]
    weights["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_hf_checkpoint(tmp_path)
    text = str(error.value)
    assert "missing ['model.layers.0.mlp.up_proj.weight']" in text
    assert "unexpected ['model.layers.0.mlp.extra.weight']" in text
    assert "\n" not in text and isinstance(error.value, DpokitError)


def test_shape_mismatch_and_missing_files_are_refused(tmp_path):
    _write(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, intermediate_size=40)))
    with pytest.raises(CheckpointError, match="shape"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_checkpoint(tmp_path / "nowhere")


def test_load_builds_on_meta_and_fills_everything(tmp_path):
    saved = _write(tmp_path)
    loaded = load_hf_checkpoint(tmp_path, lora={"lora_targets": ["q_proj", "down_proj"], "lora_rank": 2})
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    torch.testing.assert_close(loaded.inv_freq, saved.inv_freq, rtol=0, atol=0)
    tokens = torch.randint(0, 64, (2, 8))
    assert torch.equal(loaded(tokens), saved(tokens))  # fresh adapters: B = 0
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n in dict(loaded.named_parameters()) if ".lora_" in n
    }


OLMO2 = dict(LLAMA, model_type="olmo2", rms_norm_eps=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(clip_qkv=8.0), r"config: clip_qkv=8.0 is not supported \(only null\)"),
        (dict(attention_bias=True), "attention_bias=True is not supported"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(use_sliding_window=True), r"config field\(s\) \['use_sliding_window'\] not understood"),
    ],
)
def test_unsupported_olmo2_configs_are_refused(change, message):
    with pytest.raises(CheckpointError, match=message):
        model_from_hf_config(dict(OLMO2, **change))


def test_olmo2_config_builds_post_norm_blocks_with_projection_qk_norms():
    model = model_from_hf_config(dict(OLMO2, clip_qkv=None, attention_bias=False))
    block = model.layers[0]
    assert not hasattr(block, "input_layernorm") and hasattr(block, "post_feedforward_layernorm")
    assert block.self_attn.q_norm.weight.shape == (32,) and block.self_attn.k_norm.weight.shape == (16,)
