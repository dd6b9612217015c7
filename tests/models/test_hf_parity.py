"""Our decoder == transformers, and HF directories survive dpokit -> HF round trips exactly."""

import json

import pytest
import torch

from dpokit.models import CheckpointError, adapter_params, hf_config_from_model, model_from_hf_config
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
        "phi3_gqa_window",
        "phi3_longrope",
        "qwen3_moe",
        "olmo2_gqa_tied",
        "mistral_window",
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
    assert getattr(reloaded.config, "layer_types", None) == getattr(reference.config, "layer_types", None)
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


# LoRA targets per family layout (default: the separate Llama projections).
PEFT_TARGETS = {
    "phi3_no_window": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],  # PEFT: one A/B per fused matrix
    "phi3_longrope": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


@pytest.mark.parametrize(
    "name",
    [
        "llama3_2_tied_head_dim",
        "qwen2_5_untied_bias",
        "qwen3_untied",
        "phi3_no_window",
        "phi3_longrope",
        "olmo2_mha",
        "mistral_window",
        "qwen3_window",
        "gemma2_softcap_windows",
        "gemma3_text_local_global",
    ],
)
def test_peft_loads_our_adapter_and_matches_our_outputs(name, tmp_path):
    peft = pytest.importorskip("peft")
    reference = write_hf_checkpoint(name, tmp_path / "base")
    targets = PEFT_TARGETS.get(name, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
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

    # the merged model, saved in HF format, is the adapted model (Phi-3's folder keeps the base's
    # token ids: Phi3Config's default pad id 32000 does not fit the tiny vocabulary)
    save_hf_checkpoint(ours, tmp_path / "merged", source_dir=tmp_path / "base" if name in PEFT_TARGETS else None)
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


@pytest.mark.parametrize("window", [8, None, 128, "absent"])
def test_a_mistral_sliding_window_loads_and_is_written_back(window, tmp_path):
    """sliding_window is taken as given (absent = MistralConfig's default) and exported explicitly,
    so transformers reads the same window back; a window shorter than the 40 tokens masks (the
    mistral_window fixture checks the logits)."""
    class_name, kwargs = FAMILIES["mistral_gqa"]
    kwargs = {k: v for k, v in kwargs.items() if k != "sliding_window"}
    config = getattr(transformers, class_name)(**kwargs, **({} if window == "absent" else {"sliding_window": window}))
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    if window == "absent":
        del written["sliding_window"]
        (tmp_path / "config.json").write_text(json.dumps(written))
    expected = transformers.AutoConfig.from_pretrained(tmp_path).sliding_window
    assert expected == (4096 if window == "absent" else window)
    model = model_from_hf_config(tmp_path)
    assert model.args["sliding_window"] == expected
    assert model.windows == [expected] * 2
    exported = hf_config_from_model(model, torch.float32, base=written)
    assert exported["model_type"] == "mistral" and exported["sliding_window"] == expected
    assert transformers.AutoConfig.for_model(**exported).sliding_window == expected


def test_a_window_narrower_than_the_sequence_changes_the_logits(tmp_path):
    # guards the mistral_window parity test: its window really masks at 40 tokens
    write_hf_checkpoint("mistral_window", tmp_path)
    windowed = load_hf_checkpoint(tmp_path).eval()
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, sliding_window=None)))
    full = load_hf_checkpoint(tmp_path).eval()
    with torch.no_grad():
        a, b = windowed(TOKENS), full(TOKENS)
    assert torch.equal(a[:, :8], b[:, :8]) and not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("window", [0, -4, 2.5, True])
def test_a_mistral_window_that_is_not_a_positive_integer_is_refused(window):
    config = dict(model_type="mistral", vocab_size=64, hidden_size=32, intermediate_size=48)
    config.update(num_hidden_layers=1, num_attention_heads=4, sliding_window=window)
    with pytest.raises(
        CheckpointError, match=rf"config: sliding_window must be a positive integer or null, got {window}"
    ):
        model_from_hf_config(config)


def test_a_model_with_windows_on_some_layers_only_is_not_exported_as_mistral():
    from dpokit.models import llama

    model = llama(
        vocab_size=64,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=48,
        max_seq_len=64,
        sliding_window=8,
        layer_types=("sliding_attention", "full_attention"),
    )
    with pytest.raises(CheckpointError, match="no Hugging Face family lays out this model"):
        hf_config_from_model(model, torch.float32, base={"model_type": "mistral"})


@pytest.mark.parametrize("name, expected", [("qwen2_5_window", (None, 8)), ("qwen3_window", (8, None))])
def test_qwen_windows_land_on_the_layers_transformers_puts_them_on(name, expected, tmp_path):
    reference = write_hf_checkpoint(name, tmp_path)
    ours = load_hf_checkpoint(tmp_path)
    assert tuple(ours.windows) == expected
    assert tuple(layer.self_attn.sliding_window for layer in reference.model.layers) == expected


# ------------------------------------------------------------------------------- Phi-3 / Phi-4


@pytest.mark.parametrize("length", [20, 32, 33, 40])
def test_phi3_longrope_picks_the_factor_set_transformers_picks(length, tmp_path):
    """original_max_position_embeddings is 32: up to 32 positions use the short factors, 33 and
    more the long ones (for every row of the batch); logits equal transformers' either side."""
    reference = write_hf_checkpoint("phi3_longrope", tmp_path)
    ours = load_hf_checkpoint(tmp_path).eval()
    tokens = TOKENS[:, :length]
    with torch.no_grad():
        assert (ours(tokens) - hf_logits(reference, tokens)).abs().max().item() <= 1e-5
        # the same first 20 tokens rotate differently once the batch is long: the switch is exercised
        switched = (ours(tokens)[:, :20] - ours(TOKENS[:, :20])).abs().max().item()
    assert (switched > 1e-3) == (length > 32), switched


def test_phi3_sliding_window_is_exercised_by_the_parity_test(tmp_path):
    # the window (16) cuts the 40 test tokens: without it the same weights give other logits
    reference = write_hf_checkpoint("phi3_gqa_window", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "sliding_window": None}))
    unwindowed = load_hf_checkpoint(tmp_path).eval()
    with torch.no_grad():
        assert (unwindowed(TOKENS) - hf_logits(reference, TOKENS)).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(resid_pdrop=0.1), "resid_pdrop=0.1 is not supported"),
        (dict(embd_pdrop=0.1), "embd_pdrop=0.1 is not supported"),
        (dict(attention_dropout=0.1), "attention_dropout=0.1 is not supported"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5 is not supported"),
        (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope scaling type 'dynamic' is not implemented"),
        (
            dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 8}),
            "longrope long_factor must be a list of 8",
        ),
        (
            dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 7}),
            "longrope long_factor must be a list of 8",
        ),
        (
            dict(
                rope_scaling={
                    "type": "longrope",
                    "short_factor": [1.0] * 8,
                    "long_factor": [2.0] * 8,
                    "original_max_position_embeddings": 64,
                }
            ),
            "rope original_max_position_embeddings=64 differs from the top-level 32",
        ),
        (dict(sliding_window=0), "sliding_window must be a positive integer or null"),
        (dict(layer_types=["full_attention"] * 2), r"config field\(s\) \['layer_types'\] not understood"),
    ],
)
def test_phi3_fields_we_do_not_reproduce_are_refused_by_name(change, message, tmp_path):
    write_hf_checkpoint("phi3_longrope", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters")
    config["rope_theta"] = 10_000.0
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message) as error:
        model_from_hf_config(tmp_path)
    assert str(error.value).startswith(str(tmp_path / "config.json")) and "\n" not in str(error.value)


def test_phi3_su_rope_and_explicit_attention_factor_load_as_transformers_reads_them(tmp_path):
    """Older Phi-3 configs say "su" (transformers reads it as longrope; version 5 only with the
    original length inside the dict, the remote code took the top-level one, as we do: both must
    agree); an explicit attention_factor replaces the derived one, and export writes it back."""
    reference = write_hf_checkpoint("phi3_longrope", tmp_path / "in")
    config = json.loads((tmp_path / "in" / "config.json").read_text())
    rope = {k: config["rope_parameters"][k] for k in ("short_factor", "long_factor")}
    config.pop("rope_parameters")
    config.update(rope_theta=10_000.0, rope_scaling={"type": "su", **rope, "attention_factor": 1.3})
    without_inner = model_from_hf_config(config).args
    config["rope_scaling"]["original_max_position_embeddings"] = 32
    assert model_from_hf_config(config).args == without_inner
    (tmp_path / "in" / "config.json").write_text(json.dumps(config))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "in", dtype=torch.float32).eval()
    assert theirs.model.rotary_emb.attention_scaling == 1.3
    ours = load_hf_checkpoint(tmp_path / "in").eval()
    with torch.no_grad():
        assert (ours(TOKENS) - hf_logits(theirs, TOKENS)).abs().max().item() <= 1e-5
        assert (ours(TOKENS) - hf_logits(reference, TOKENS)).abs().max().item() > 1e-3  # the factor matters
    save_hf_checkpoint(ours, tmp_path / "out", source_dir=tmp_path / "in")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["rope_scaling"]["attention_factor"] == 1.3
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert torch.equal(hf_logits(again, TOKENS), hf_logits(theirs, TOKENS))


def test_a_rope_scaling_or_layout_no_family_writes_is_refused_on_export():
    from dpokit.models import hf_config_from_model, llama
    from dpokit.models.transformer import LongRopeScaling

    tiny = dict(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=128)
    longrope = LongRopeScaling((1.0,) * 8, (2.0,) * 8, 32, attention_factor=1.1)
    with pytest.raises(CheckpointError, match="llama checkpoints cannot express this RoPE scaling"):
        hf_config_from_model(llama(**tiny, rope_scaling=longrope), torch.float32)
    mixed = llama(**tiny, fused_projections=True, sliding_window=8, layer_types=("sliding_attention", "full_attention"))
    with pytest.raises(CheckpointError, match="no Hugging Face family lays out this model"):
        hf_config_from_model(mixed, torch.float32)
    config = hf_config_from_model(llama(**tiny, fused_projections=True, rope_scaling=longrope), torch.float32)
    assert config["model_type"] == "phi3" and config["rope_scaling"]["attention_factor"] == 1.1
    assert model_from_hf_config(config).args["rope_scaling"] == longrope


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
