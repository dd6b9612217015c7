"""Presets against the published checkpoints: parameter counts from the model cards / safetensors
metadata of each Hugging Face repository, and config.json round trips through transformers."""

from functools import partial

import pytest
import torch

import dpokit.models as models
from dpokit.models import ARCHITECTURES, hf_config_from_model, model_from_hf_config

# SigLIP-So400m at 896 px (27 layers), the vision tower of every multimodal Gemma 3; checked against
# transformers' count of the real 27B config in test_hf_real_files.py.
GEMMA3_VISION_TOWER = 416_866_032

# Parameter counts as published for each checkpoint (safetensors total on the Hub).
PUBLISHED_PARAMETERS = {
    "llama3_8b": 8_030_261_248,
    "llama3_70b": 70_553_706_496,
    "llama3_1_8b": 8_030_261_248,
    "llama3_1_70b": 70_553_706_496,
    "llama3_1_405b": 405_853_388_800,
    "llama3_2_1b": 1_235_814_400,
    "llama3_2_3b": 3_212_749_824,
    "qwen2_5_0_5b": 494_032_768,
    "qwen2_5_1_5b": 1_543_714_304,
    "qwen2_5_3b": 3_085_938_688,
    "qwen2_5_7b": 7_615_616_512,
    "qwen2_5_14b": 14_770_033_664,
    "qwen2_5_32b": 32_763_876_352,
    "qwen2_5_72b": 72_706_203_648,
    # Qwen3 model cards: 0.6B (0.44B non-embedding), 1.7B (1.4B), 4.0B (3.6B), 8.2B (6.95B), 14.8B (13.2B), 32.8B (31.2B)
    "qwen3_0_6b": 596_049_920,
    "qwen3_1_7b": 1_720_574_976,
    "qwen3_4b": 4_022_468_096,
    "qwen3_8b": 8_190_735_360,
    "qwen3_14b": 14_768_307_200,
    "qwen3_32b": 32_762_123_264,
    "smollm2_135m": 134_515_008,
    "smollm2_360m": 361_821_120,
    "smollm2_1_7b": 1_711_376_384,
    # Phi model cards: Phi-3-mini 3.8B, Phi-3-medium 14B, Phi-4 14.7B (safetensors totals)
    "phi3_mini_4k": 3_821_079_552,
    "phi3_mini_128k": 3_821_079_552,
    "phi3_medium_4k": 13_960_238_080,
    "phi4": 14_659_507_200,
    # Qwen3 MoE model cards: 30.5B total / 3.3B activated, 235B total / 22B activated
    "qwen3_30b_a3b": 30_532_122_624,
    "qwen3_235b_a22b": 235_093_634_560,
    # OLMo 2: exact counts of the published configs' shapes (transformers' Olmo2ForCausalLM agrees,
    # see the config test); the Hub pages round them to 1.48B, 7.3B, 13.7B and 32.2B
    "olmo2_1b": 1_484_916_736,
    "olmo2_7b": 7_298_617_344,
    "olmo2_13b": 13_716_198_400,
    "olmo2_32b": 32_234_279_936,
    # Gemma 2 and Gemma 3 1B: the Hub's safetensors totals.
    "gemma2_2b": 2_614_341_888,
    "gemma2_9b": 9_241_705_984,
    "gemma2_27b": 27_227_128_320,
    "gemma3_1b": 999_885_952,
    # Gemma 3 4B / 12B / 27B are multimodal: the published totals (4,300,079,472 / 12,187,325,040 /
    # 27,432,406,640) less the SigLIP vision tower and the projector (1152 x hidden + 1152), which
    # these text decoders do not build.
    "gemma3_4b": 4_300_079_472 - GEMMA3_VISION_TOWER - (1152 * 2560 + 1152),
    "gemma3_12b": 12_187_325_040 - GEMMA3_VISION_TOWER - (1152 * 3840 + 1152),
    "gemma3_27b": 27_432_406_640 - GEMMA3_VISION_TOWER - (1152 * 5376 + 1152),
}


def meta_build(name, **kwargs):
    with torch.device("meta"):
        return getattr(models, name)(**kwargs)


def with_layers(arch: dict, n_layers: int) -> dict:
    """`arch` cut to its first `n_layers` layers (per-layer attention kinds included)."""
    cut = {**arch, "n_layers": n_layers}
    if arch.get("layer_types") is not None:
        cut["layer_types"] = arch["layer_types"][:n_layers]
    return cut


def full_count(name: str, lora: bool = False) -> int:
    """Parameter count of the preset, from real 1- and 2-layer builds of its architecture
    (every layer is identical, so count = P(1) + (L - 1) (P(2) - P(1)); 126-layer modules are slow)."""
    arch = ARCHITECTURES[name]
    builder = models.lora_llama if lora else models.llama
    if lora and arch.get("fused_projections"):  # Phi-3 has qkv_proj, not q_proj / v_proj
        builder = partial(models.lora_llama, lora_targets=("qkv_proj",))

    def count(n_layers):
        with torch.device("meta"):
            model = builder(**with_layers(arch, n_layers))
        return sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n)

    one, two = count(1), count(2)
    return one + (arch["n_layers"] - 1) * (two - one)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_parameter_count_matches_published_checkpoint(name):
    assert full_count(name) == PUBLISHED_PARAMETERS[name]
    assert full_count(name, lora=True) == PUBLISHED_PARAMETERS[name]


def test_every_architecture_has_a_published_count_and_working_builders():
    assert set(ARCHITECTURES) - {"tiny"} == set(PUBLISHED_PARAMETERS)
    for name in ("smollm2_135m", "qwen2_5_0_5b", "llama3_2_1b"):  # the zero-argument functions themselves
        assert sum(p.numel() for p in meta_build(name).parameters()) == PUBLISHED_PARAMETERS[name]
        lora = meta_build(f"lora_{name}", lora_rank=4)
        assert all(p.requires_grad == (".lora_" in n) for n, p in lora.named_parameters())
        assert sum(p.numel() for n, p in lora.named_parameters() if ".lora_" not in n) == PUBLISHED_PARAMETERS[name]


@pytest.mark.parametrize(
    "name",
    [
        "llama3_1_8b",
        "llama3_2_1b",
        "qwen2_5_0_5b",
        "qwen2_5_7b",
        "qwen3_0_6b",
        "qwen3_8b",
        "smollm2_135m",
        "phi3_mini_4k",
        "phi3_mini_128k",
        "phi4",
        "olmo2_1b",
        "olmo2_32b",
        "gemma2_2b",
        "gemma2_27b",
        "gemma3_1b",
        "gemma3_27b",
    ],
)
def test_config_json_round_trips_and_transformers_agrees(name):
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):  # two layers: what is compared is the config translation
        model = models.llama(**with_layers(ARCHITECTURES[name], 2))
    config = hf_config_from_model(model, torch.bfloat16)
    with torch.device("meta"):
        again = model_from_hf_config(config)
    assert again.args == model.args
    hf_config = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config)
    ours = {n: p.shape for n, p in model.named_parameters()}
    theirs = {n.removeprefix("model."): p.shape for n, p in hf.named_parameters()}
    assert ours == theirs


def test_llama3_rope_scaling_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for name in ("llama3_1_8b", "llama3_2_1b", "llama3_2_3b"):
        with torch.device("meta"):
            model = models.llama(**{**ARCHITECTURES[name], "n_layers": 1})
        hf_config = transformers.AutoConfig.for_model(**hf_config_from_model(model, torch.bfloat16))
        expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
        from dpokit.models.transformer import rope_inverse_frequencies

        args = model.args
        ours = rope_inverse_frequencies(args["head_dim"], args["rope_theta"], args["rope_scaling"])
        assert torch.equal(ours, expected), name


def test_phi3_presets_lora_twins_adapt_the_fused_projections():
    lora = meta_build("lora_phi3_mini_4k", lora_rank=4)
    adapted = {n.split(".")[-3] for n, p in lora.named_parameters() if p.requires_grad}
    assert adapted == {"qkv_proj"}
    lora = meta_build("lora_phi4", lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
    assert {n.split(".")[-3] for n, p in lora.named_parameters() if p.requires_grad} == {
        "qkv_proj",
        "o_proj",
        "gate_up_proj",
        "down_proj",
    }
    with pytest.raises(ValueError, match=r"\['q_proj'\] are not projections of this model"):
        meta_build("lora_phi4", lora_targets=("q_proj",))


@pytest.mark.parametrize("long", [False, True])
def test_phi3_longrope_tables_match_transformers(long):
    """Phi-3-mini-128k: inv_freq with the short factors (up to 4,096 positions) and the long ones
    (beyond), and the cos/sin attention factor, bit for bit as transformers computes them."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from dpokit.models.transformer import rope_inverse_frequencies

    with torch.device("meta"):
        model = models.llama(**{**ARCHITECTURES["phi3_mini_128k"], "n_layers": 1})
    hf_config = transformers.AutoConfig.for_model(**hf_config_from_model(model, torch.bfloat16))
    expected, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](hf_config, "cpu", seq_len=4097 if long else None)
    args = model.args
    ours = rope_inverse_frequencies(args["head_dim"], args["rope_theta"], args["rope_scaling"], long=long)
    assert torch.equal(ours, expected)
    assert args["rope_scaling"].attention_factor == attention_factor
