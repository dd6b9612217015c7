"""Our decoder == transformers, and HF directories survive dpokit -> HF round trips exactly."""

import json

import pytest
import torch

from dpokit.models import CheckpointError, adapter_params, model_from_hf_config
from dpokit.models.hf_checkpoint import (
    iter_hf_weights,
    load_hf_checkpoint,
    load_peft_adapter,
    save_hf_checkpoint,
    save_peft_adapter,
)
from hf_fixtures import FAMILIES, hf_logits, hf_model, write_hf_checkpoint

transformers = pytest.importorskip("transformers")
TOKENS = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_full_config_of_a_loaded_model_is_accepted(name, tmp_path):
    """`model.config.to_dict()` of a transformers-loaded model carries every PretrainedConfig field
    (_name_or_path, id2label, problem_type, chunk_size_feed_forward, ...): none changes the
    arithmetic, so the folder loads and gives the same logits."""
    write_hf_checkpoint(name, tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    full = loaded.config.to_dict()
    assert {"_name_or_path", "id2label", "problem_type", "chunk_size_feed_forward"} <= set(full)
    (tmp_path / "config.json").write_text(json.dumps(full))
    ours = load_hf_checkpoint(tmp_path).eval()
    with torch.no_grad():
        assert (ours(TOKENS) - hf_logits(loaded, TOKENS)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_match_transformers(name, tmp_path):
    reference = write_hf_checkpoint(name, tmp_path)
    ours = load_hf_checkpoint(tmp_path).eval()
    with torch.no_grad():
        diff = (ours(TOKENS) - hf_logits(reference, TOKENS)).abs().max().item()
    assert diff <= 1e-5, f"{name}: max abs logit diff {diff}"


@pytest.mark.parametrize(
    "name",
    [
        "llama3_1_rope_scaling",
        "qwen2_5_tied_bias",
        "qwen3_tied_head_dim",
        "mistral_gqa",
        "gemma2_softcap_windows",
        "gemma3_text_local_global",
    ],
)
def test_hf_to_dpokit_to_hf_is_exact_and_loads_without_warnings(name, tmp_path):
    reference = write_hf_checkpoint(name, tmp_path / "in")
    (tmp_path / "in" / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    ours = load_hf_checkpoint(tmp_path / "in")
    # A small shard limit forces the sharded layout (several files + index).
    save_hf_checkpoint(ours, tmp_path / "out", source_dir=tmp_path / "in", max_shard_bytes=40_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"model_max_length": 128}\n'
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert reloaded.config.to_dict()["rope_parameters"] == reference.config.to_dict()["rope_parameters"]
    assert type(reloaded) is type(reference)  # the family is kept (a Mistral is not saved as a Llama)
    assert getattr(reloaded.config, "sliding_window", None) == getattr(reference.config, "sliding_window", None)
    for (k, a), (_, b) in zip(sorted(reloaded.state_dict().items()), sorted(reference.state_dict().items())):
        assert torch.equal(a, b), k
    assert torch.equal(hf_logits(reloaded.float().eval(), TOKENS), hf_logits(reference, TOKENS))
    # and back into dpokit from the sharded layout
    again = load_hf_checkpoint(tmp_path / "out")
    for (k, a), (_, b) in zip(sorted(ours.state_dict().items()), sorted(again.state_dict().items())):
        assert torch.equal(a, b), k


def test_iter_hf_weights_yields_every_parameter_once_with_our_names(tmp_path):
    write_hf_checkpoint("qwen2_5_tied_bias", tmp_path, max_shard_size="40KB")
    ours = load_hf_checkpoint(tmp_path)
    seen = {}
    for key, tensor in iter_hf_weights(tmp_path, dtype=torch.bfloat16):
        assert key not in seen and tensor.dtype == torch.bfloat16
        seen[key] = tensor
    assert set(seen) == set(ours.state_dict())
    for key, tensor in seen.items():
        assert torch.equal(tensor, ours.state_dict()[key].to(torch.bfloat16)), key


@pytest.mark.parametrize(
    "name",
    [
        "llama3_2_tied_head_dim",
        "qwen2_5_untied_bias",
        "qwen3_untied",
        "gemma2_softcap_windows",
        "gemma3_text_local_global",
    ],
)
def test_peft_loads_our_adapter_and_matches_our_outputs(name, tmp_path):
    peft = pytest.importorskip("peft")
    reference = write_hf_checkpoint(name, tmp_path / "base")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ours = load_hf_checkpoint(tmp_path / "base", lora={"lora_targets": targets, "lora_rank": 4, "lora_alpha": 8.0})
    with torch.no_grad():
        for p in adapter_params(ours).values():
            p.normal_(0, 0.1)
    ours.eval()
    save_peft_adapter(ours, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = ours(TOKENS)
        diff = (peft_model(input_ids=TOKENS).logits - expected).abs().max().item()
    assert diff <= 1e-5, diff
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"] == sorted(targets)

    # the merged model, saved in HF format, is the adapted model
    save_hf_checkpoint(ours, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
    assert (hf_logits(merged, TOKENS) - expected).abs().max().item() <= 1e-5

    # and the adapter loads back into a fresh LoRA model
    fresh = load_hf_checkpoint(tmp_path / "base", lora={"lora_targets": targets, "lora_rank": 4, "lora_alpha": 8.0})
    load_peft_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(TOKENS), expected)


def test_hf_model_fixture_differs_between_families():
    # guards the parametrised tests above against comparing a model with itself
    a, b = hf_model("qwen2_5_tied_bias"), hf_model("llama3_gqa")
    assert not torch.allclose(hf_logits(a, TOKENS), hf_logits(b, TOKENS))


@pytest.mark.parametrize("window, refused", [(16, True), (None, False), (128, False)])
def test_a_mistral_sliding_window_shorter_than_the_context_is_refused(window, refused, tmp_path):
    class_name, kwargs = FAMILIES["mistral_gqa"]
    config = getattr(transformers, class_name)(**{**kwargs, "sliding_window": window})
    config.save_pretrained(tmp_path)
    if refused:
        with pytest.raises(CheckpointError, match=r"sliding_window=16 < max_position_embeddings=128: sliding-window"):
            model_from_hf_config(tmp_path)
    else:
        model_from_hf_config(tmp_path)


@pytest.mark.parametrize("name", ["gemma2_softcap_windows", "gemma3_text_local_global"])
def test_gemma_export_keeps_the_fields_transformers_computes_with(name, tmp_path):
    """Windows per layer, score scale, soft-caps and both RoPE tables survive dpokit -> HF."""
    reference = write_hf_checkpoint(name, tmp_path / "in")
    save_hf_checkpoint(load_hf_checkpoint(tmp_path / "in"), tmp_path / "out", source_dir=tmp_path / "in")
    exported = transformers.AutoConfig.from_pretrained(tmp_path / "out").to_dict()
    expected = reference.config.to_dict()
    for key in (
        "layer_types",
        "sliding_window",
        "query_pre_attn_scalar",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "rope_parameters",
        "head_dim",
        "hidden_activation",
        "tie_word_embeddings",
    ):
        assert exported[key] == expected[key], key


def test_gemma_published_config_form_gives_the_same_logits(tmp_path):
    """Published Gemma configs use the legacy fields: Gemma 2 without layer_types (layer 0 slides,
    then every other layer), rope_theta and hidden_act; Gemma 3 with rope_theta / rope_scaling for
    the global layers, rope_local_base_freq and sliding_window_pattern. transformers 5 reads them
    as we do."""
    legacy = {
        "gemma2_softcap_windows": dict(
            rope_theta=10_000.0, hidden_act="gelu_pytorch_tanh", cache_implementation="hybrid"
        ),
        "gemma3_text_local_global": dict(
            rope_theta=50_000.0,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
            rope_local_base_freq=100.0,
            sliding_window_pattern=2,
            _sliding_window_pattern=2,
        ),
    }
    for name, fields in legacy.items():
        folder = tmp_path / name
        write_hf_checkpoint(name, folder)
        config = json.loads((folder / "config.json").read_text())
        for key in ("rope_parameters", "layer_types", "_sliding_window_pattern", "sliding_window_pattern"):
            config.pop(key, None)
        (folder / "config.json").write_text(json.dumps({**config, **fields}))
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").float().eval()
        assert "sliding_attention" in theirs.config.layer_types and "full_attention" in theirs.config.layer_types
        ours = load_hf_checkpoint(folder).eval()
        assert ours.args["layer_types"] == tuple(theirs.config.layer_types)
        with torch.no_grad():
            assert (ours(TOKENS) - hf_logits(theirs, TOKENS)).abs().max().item() <= 1e-5, name


def test_a_gemma3_multimodal_checkpoint_builds_its_text_decoder_and_refuses_its_weights(tmp_path):
    text = FAMILIES["gemma3_text_local_global"][1]
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=dict(
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        mm_tokens_per_image=4,
    )
    transformers.Gemma3ForConditionalGeneration(config).save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_config(transformers.Gemma3TextConfig(**text))
    with torch.device("meta"):
        ours = model_from_hf_config(tmp_path)
    assert ours.args["local_rope_theta"] == 100.0 and ours.args["qk_norm"] == "head"
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    with pytest.raises(CheckpointError, match=r"Gemma3ForConditionalGeneration checkpoint \(text decoder \+ vision"):
        load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("gemma2_softcap_windows", {"hidden_activation": "gelu"}, r"hidden_activation='gelu' is not supported"),
        ("gemma2_softcap_windows", {"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
        ("gemma2_softcap_windows", {"use_bidirectional_attention": True}, r"use_bidirectional_attention=True"),
        ("gemma2_softcap_windows", {"sliding_window": None}, r"sliding_window=None: sliding_attention layers"),
        ("gemma2_softcap_windows", {"layer_types": ["full_attention"]}, r"layer_types must name 2 layers"),
        ("gemma2_softcap_windows", {"final_logit_softcapping": -1}, r"final_logit_softcapping=-1"),
        (
            "gemma3_text_local_global",
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1.0}},
            r"rope_parameters must be per layer type",
        ),
        (
            "gemma3_text_local_global",
            {"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1.0}}},
            r"rope scaling of the sliding layers is not implemented",
        ),
        (
            "gemma3_text_local_global",
            {"layer_types": None, "sliding_window_pattern": None, "_sliding_window_pattern": 2},
            r"_sliding_window_pattern=2 without layer_types",
        ),
        (
            "gemma3_text_local_global",
            {"altup_num_inputs": 4},
            r"config field\(s\) \['altup_num_inputs'\] not understood",
        ),
    ],
)
def test_gemma_configs_we_would_not_reproduce_are_refused_in_one_line(name, change, message, tmp_path):
    write_hf_checkpoint(name, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None or k in ("sliding_window",)}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message) as error:
        model_from_hf_config(tmp_path)
    assert str(error.value).startswith(str(tmp_path)) and "\n" not in str(error.value)
