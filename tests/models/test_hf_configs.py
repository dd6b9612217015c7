"""The real-model configs of dpo_lora_single_device load against a checkpoint folder: tiny fake
checkpoints of each family (written with transformers) stand in for the real ones."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from dpokit.config import check_keys, instantiate, load_config  # noqa: E402
from dpokit.models import LoRALinear, load_hf_checkpoint  # noqa: E402
from hf_fixtures import FIXTURES, LLAMA3_2_JINJA, QWEN2_5_JINJA, QWEN3_JINJA, SMOLLM2_JINJA, write_tokenizer  # noqa: E402
from sentencepiece_fixtures import sentencepiece_bpe  # noqa: E402

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "dpo_lora_single_device.py"
CONFIGS = RECIPE.parent / "configs" / "dpo_lora_single_device"
SMALL = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)
# config name -> (transformers config, the family's published chat template, the template it is)
FAKES = {
    "llama3_2_1b": (
        transformers.LlamaConfig(
            **SMALL,
            rope_theta=500_000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=32.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
        LLAMA3_2_JINJA,
        "llama3_2",
    ),
    "qwen2_5_0_5b": (transformers.Qwen2Config(**SMALL, rope_theta=1e6), QWEN2_5_JINJA, "qwen2_5"),
    "qwen3_0_6b": (transformers.Qwen3Config(**SMALL, rope_theta=1e6), QWEN3_JINJA, "qwen3"),
    "smollm2_135m": (transformers.LlamaConfig(**SMALL, rope_theta=1e5), SMOLLM2_JINJA, "smollm2"),
    "qwen3_30b_a3b": (
        transformers.Qwen3MoeConfig(
            **{**SMALL, "tie_word_embeddings": False},
            rope_theta=1e6,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
        ),
        QWEN3_JINJA,
        "qwen3",
    ),
    # SentencePiece-style tokenizers (byte fallback: the `tokenizers` backend), 900 tokens
    "mistral_7b": (
        transformers.MistralConfig(**{**SMALL, "vocab_size": 1024, "tie_word_embeddings": False}, sliding_window=None),
        (FIXTURES / "mistral_v0_2_chat_template.jinja").read_text(),
        "mistral",
    ),
    "gemma3_1b": (
        transformers.Gemma3TextConfig(
            **{**SMALL, "vocab_size": 1024}, head_dim=16, sliding_window=8, query_pre_attn_scalar=16
        ),
        (FIXTURES / "gemma3_chat_template.jinja").read_text(),
        "gemma3",
    ),
    "phi4": (
        transformers.Phi3Config(
            **{**SMALL, "tie_word_embeddings": False},
            rope_theta=250_000.0,
            sliding_window=None,
            original_max_position_embeddings=256,
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
        ),
        (FIXTURES / "phi4_chat_template.jinja").read_text(),
        "phi4",
    ),
}
# name -> how its tokenizer folder is written (default: `write_tokenizer`, byte-level BPE)
SENTENCEPIECE = {
    "mistral_7b": (
        lambda: sentencepiece_bpe("llama", ["<unk>", "<s>", "</s>"], bos="<s>"),
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    ),
    "gemma3_1b": (
        lambda: sentencepiece_bpe(
            "gemma", ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"], bos="<bos>"
        ),
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
    ),
}


def recipe_module():
    spec = importlib.util.spec_from_file_location("dpo_lora_recipe_under_test", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_checkpoint(name, directory):
    config, chat_template, _ = FAKES[name]
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    if name in SENTENCEPIECE:
        tokenizer_json, fields = SENTENCEPIECE[name]
        (directory / "tokenizer.json").write_text(tokenizer_json())
        (directory / "tokenizer_config.json").write_text(json.dumps({**fields, "chat_template": chat_template}))
        return directory
    bos = {"bos_token": "<|begin_of_text|>"} if name.startswith("llama") else {}
    extra = ("<|im_sep|>",) if name == "phi4" else ()
    if name == "phi4":
        bos = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}
    write_tokenizer(directory, chat_template, vocab_size=320, extra_specials=extra, **bos)
    return directory


def preference_file(path):
    rows = [
        {"prompt": f"Say {w} in UPPER case", "chosen": w.upper(), "rejected": w}
        for w in ("hello", "world", "case", "lower", "upper", "hello world")
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", sorted(FAKES))
def test_config_validates_and_builds_against_a_checkpoint(name, tmp_path, capsys):
    ckpt = fake_checkpoint(name, tmp_path / "ckpt")
    data = preference_file(tmp_path / "pairs.jsonl")
    cfg = load_config(
        CONFIGS / f"{name}.yaml",
        [f"checkpoint_dir={ckpt}", f"train_dataset.path={data}", f"validation_dataset.path={data}"],
    )
    check_keys(cfg, recipe_module().CONFIG_KEYS)
    tokenizer = instantiate(cfg.tokenizer)
    assert tokenizer.template.name == FAKES[name][2]
    assert "warning" not in capsys.readouterr().err  # the config's template renders as the folder's own
    model = instantiate(cfg.model)
    lora = [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert sorted(set(lora)) == sorted(cfg.model.lora.lora_targets)
    plain = load_hf_checkpoint(ckpt)
    tokens = torch.randint(0, 320, (1, 9))  # below every fake's vocabulary
    assert torch.equal(model(tokens), plain(tokens))  # weights loaded, adapters start at zero
    dataset = instantiate(cfg.train_dataset, tokenizer=tokenizer)
    assert len(dataset) == 6


def test_recipe_trains_on_a_checkpoint_and_writes_an_hf_folder(tmp_path):
    ckpt = fake_checkpoint("smollm2_135m", tmp_path / "ckpt")
    data = preference_file(tmp_path / "pairs.jsonl")
    module = recipe_module()
    from dpokit.config import recipe_main

    recipe_main(
        module.main,
        module.CONFIG_KEYS,
        [
            "--config",
            str(CONFIGS / "smollm2_135m.yaml"),
            f"checkpoint_dir={ckpt}",
            f"train_dataset.path={data}",
            f"validation_dataset.path={data}",
            f"output_dir={tmp_path / 'out'}",
            "device=cpu",
            "dtype=fp32",
            "batch_size=1",
            "gradient_accumulation_steps=1",
            "max_steps=2",
            "eval_every=2",
            "eval_batch_size=6",
            "train_dataset.max_seq_len=48",
            "train_dataset.max_prompt_len=32",
            "packing.pack_size=96",  # 2 packs
            "lr_scheduler.warmup_steps=1",
            "optimizer.lr=1e-2",
        ],
    )
    final = tmp_path / "out" / "final"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in final.iterdir()
    }
    assert {p.name for p in (final / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    merged = transformers.AutoModelForCausalLM.from_pretrained(final).float().eval()
    trained = load_hf_checkpoint(final)
    tokens = torch.randint(0, 320, (1, 9))  # below every fake's vocabulary
    with torch.no_grad():
        assert (merged(input_ids=tokens).logits - trained(tokens)).abs().max() <= 1e-5
        assert not torch.allclose(trained(tokens), load_hf_checkpoint(ckpt)(tokens))  # it trained


def test_missing_checkpoint_dir_is_one_clear_error():
    cfg = load_config(CONFIGS / "qwen2_5_0_5b.yaml")
    with pytest.raises(Exception, match="checkpoint_dir is not set"):
        instantiate(cfg.tokenizer)


def test_recipe_trains_an_moe_checkpoint_and_logs_the_router_aux_loss(tmp_path):
    ckpt = fake_checkpoint("qwen3_30b_a3b", tmp_path / "ckpt")
    data = preference_file(tmp_path / "pairs.jsonl")
    module = recipe_module()
    from dpokit.config import recipe_main

    recipe_main(
        module.main,
        module.CONFIG_KEYS,
        [
            "--config",
            str(CONFIGS / "qwen3_30b_a3b.yaml"),
            f"checkpoint_dir={ckpt}",
            f"train_dataset.path={data}",
            f"validation_dataset.path={data}",
            f"output_dir={tmp_path / 'out'}",
            "device=cpu",
            "dtype=fp32",
            "save_dtype=fp32",
            "batch_size=1",
            "gradient_accumulation_steps=1",
            "max_steps=2",
            "eval_every=2",
            "eval_batch_size=6",
            "train_dataset.max_seq_len=48",
            "train_dataset.max_prompt_len=32",
            "packing.pack_size=96",
            "lr_scheduler.warmup_steps=1",
            "optimizer.lr=1e-2",
        ],
    )
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    assert len(train) == 2 and all(r["router_aux_loss"] > 0 for r in train)
    final = tmp_path / "out" / "final"
    merged = transformers.AutoModelForCausalLM.from_pretrained(final).float().eval()
    trained = load_hf_checkpoint(final)
    tokens = torch.randint(0, 320, (1, 9))  # below every fake's vocabulary
    with torch.no_grad():
        assert (merged(input_ids=tokens).logits - trained(tokens)).abs().max() <= 1e-5
        assert not torch.allclose(trained(tokens), load_hf_checkpoint(ckpt)(tokens))  # it trained
