"""Real published Hugging Face metadata files (`../shared/hf-real`, see its SOURCES.md): configs,
tokenizers and chat templates as users' folders carry them. Skipped where the folder is absent
(a user's clone has no ../shared)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from dpokit.data.hf_tokenizer import (  # noqa: E402
    LLAMA3_PATTERN,
    TokenizerError,
    detect_template,
    hf_tokenizer,
    llama3_special_tokens,
    tokenizer_json_encoding,
)
from dpokit.data.tokenizer import ChatTemplate, Tokenizer  # noqa: E402
from dpokit.models import CheckpointError, model_from_hf_config  # noqa: E402

SHARED = Path(__file__).resolve().parents[3] / "shared"
HF_REAL = SHARED / "hf-real"
HH = SHARED / "data" / "hh_rlhf_harmless_base_test.jsonl.gz"
pytestmark = pytest.mark.skipif(not HF_REAL.is_dir(), reason="../shared/hf-real is not here")

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma2", "gemma3"}
FOLDERS = sorted(p.name for p in HF_REAL.iterdir() if (p / "config.json").is_file()) if HF_REAL.is_dir() else []

HARD_TEXTS = [
    "a\x04b",
    "x\x06\x13\x14y",
    "ab\x04ab\x04ab",
    "héllo\x7fwörld",
    "ababababab",
    " " * 40 + "x",
    "\t\t\t\t\t  \n\n\n   \t",
    "line\r\nbreaks\r\n\r\n",
    "1234567890 3.14159 1e-9",
    "don't I'LL we'Re",
    "Ünïcödé 漢字 العربية हिन्दी 🙂🙂",
    "e\u0301 \u212b",
    "  leading",
    "trailing   ",
    "def f(x):\n\treturn x",
]


def texts() -> list[str]:
    found = list(HARD_TEXTS)
    if HH.is_file():
        with gzip.open(HH, "rt") as f:
            for i, line in zip(range(150), f):
                record = json.loads(line)
                found += [record["chosen"], record["rejected"]]
    return found


@pytest.mark.parametrize("name", FOLDERS)
def test_published_configs_build_the_published_parameter_count_or_are_refused_by_name(name):
    folder = HF_REAL / name
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    if model_type not in SUPPORTED:
        with pytest.raises(CheckpointError, match=f"model_type '{model_type}' is not supported"):
            model_from_hf_config(folder)
        return
    with torch.device("meta"):
        ours = model_from_hf_config(folder)
        config = transformers.AutoConfig.from_pretrained(folder)
        # a multimodal checkpoint (Gemma 3 4B-27B): we build its text decoder only
        config = getattr(config, "text_config", None) or config
        theirs = transformers.AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()), name


def tokenizer_files(tmp_path: Path) -> dict[str, Path]:
    """name -> a tokenizer.json as the folder's model ships it: the file itself, a Llama 3 export
    made from original/tokenizer.model as HF's is (TikTokenConverter), or Qwen2.5's rebuilt from
    its vocab.json + merges.txt by transformers."""
    files = {}
    for folder in sorted(HF_REAL.iterdir()):
        if (folder / "tokenizer.json").is_file():
            files[folder.name] = folder / "tokenizer.json"
        elif (folder / "original" / "tokenizer.model").is_file():
            from transformers.convert_slow_tokenizer import TikTokenConverter

            converter = TikTokenConverter(
                vocab_file=str(folder / "original" / "tokenizer.model"),
                pattern=LLAMA3_PATTERN,
                extra_special_tokens=list(llama3_special_tokens(128000)),
            )
            files[folder.name] = tmp_path / f"{folder.name}.json"
            converter.converted().save(str(files[folder.name]))
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            rebuilt = tmp_path / folder.name
            rebuilt.mkdir()
            for file in ("vocab.json", "merges.txt", "tokenizer_config.json"):
                shutil.copyfile(folder / file, rebuilt / file)
            transformers.AutoTokenizer.from_pretrained(rebuilt).save_pretrained(rebuilt)
            files[folder.name] = rebuilt / "tokenizer.json"
    return files


def test_real_tokenizers_give_the_ids_of_tokenizers_or_are_refused_with_the_reason(tmp_path):
    outcomes = {}
    corpus = texts()
    for name, path in tokenizer_files(tmp_path).items():
        reference = tokenizers.Tokenizer.from_file(str(path))
        try:
            encoding, info = tokenizer_json_encoding(path)
        except TokenizerError as error:
            assert str(error).startswith(str(path)) and "\n" not in str(error)
            outcomes[name] = "refused"
            continue
        # Any template will do for plain text; its end-of-turn must be one of the file's specials.
        template = ChatTemplate(
            name="plain", begin="", header_format="", end_of_turn=next(iter(encoding._special_tokens))
        )
        ours = Tokenizer(encoding, template, **info)
        differ = [t for t in corpus if ours.encode(t) != reference.encode(t, add_special_tokens=False).ids]
        assert not differ, (name, differ[:2])
        outcomes[name] = f"{len(info['missing_bytes'])} missing bytes"
    # The byte-level BPE files load (SmolLM2 and Pythia lack some byte tokens); the Metaspace /
    # byte-fallback ones (Mistral, Phi-3) are refused, not approximated.
    assert outcomes["SmolLM2-135M-Instruct"] == "21 missing bytes"
    assert outcomes["pythia-160m"] != "refused" and outcomes["phi-2"] == "0 missing bytes"
    for name in ("Llama-3.2-3B-Instruct", "Meta-Llama-3-8B-Instruct", "Qwen2.5-0.5B-Instruct"):
        assert outcomes[name] == "0 missing bytes", name
    assert outcomes["Mistral-7B-Instruct-v0.2"] == "refused" and outcomes["Phi-3-mini-128k-instruct"] == "refused"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("SmolLM2-135M-Instruct", "smollm2"),
        ("Qwen2.5-0.5B-Instruct", "qwen2_5"),
        ("Qwen2.5-1.5B-Instruct", "qwen2_5"),
        ("Llama-3.2-3B-Instruct", "llama3_2"),
        ("Meta-Llama-3-8B-Instruct", "llama3"),
        ("SmolLM3-3B", None),
        ("Qwen3-8B", "qwen3"),
        ("Mistral-7B-Instruct-v0.2", "mistral"),
        ("Phi-3-mini-128k-instruct", "phi3"),
        ("gemma-2-2b-it", "gemma"),
    ],
)
def test_real_chat_templates_are_detected_only_when_a_built_in_renders_them_exactly(name, expected):
    if expected is None:
        with pytest.raises(TokenizerError, match="renders differently from every built-in template"):
            detect_template(HF_REAL / name)
    else:
        assert detect_template(HF_REAL / name).name == expected


def test_a_real_folder_tokenizes_conversations_as_transformers_apply_chat_template(tmp_path):
    folder = tmp_path / "SmolLM2-135M-Instruct"
    shutil.copytree(HF_REAL / "SmolLM2-135M-Instruct", folder)
    ours = hf_tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    conversations = [
        [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4, of course."}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "  Hi\n there "},
            {"role": "assistant", "content": "Hello!\n\n How are you?"},
        ],
    ]
    for messages in conversations:
        expected = theirs.apply_chat_template(messages, tokenize=True, return_dict=False)
        expected = expected["input_ids"] if isinstance(expected, dict) else list(expected)
        assert ours.tokenize_messages(messages)[0] == expected


@pytest.mark.parametrize("name, preset", [("phi-4", "phi4"), ("Phi-3-mini-128k-instruct", "phi3_mini_128k")])
def test_real_phi_configs_build_their_preset_and_export_what_transformers_reads(name, preset):
    """phi-4 (default RoPE, no window) and Phi-3-mini-128k (longrope, window 262,144 > context,
    remote-code auto_map): the folder builds the preset's architecture, and our config.json of it
    gives transformers the same RoPE parameters, window and lengths as the published file."""
    from dpokit.models import ARCHITECTURES, hf_config_from_model, llama

    folder = HF_REAL / name
    with torch.device("meta"):
        ours = model_from_hf_config(folder)
        assert ours.args == llama(**ARCHITECTURES[preset]).args
    theirs = transformers.AutoConfig.from_pretrained(folder)
    again = transformers.AutoConfig.for_model(**hf_config_from_model(ours, torch.bfloat16))
    assert type(again) is type(theirs) and again.architectures == ["Phi3ForCausalLM"]
    for field in ("rope_parameters", "sliding_window", "max_position_embeddings", "original_max_position_embeddings"):
        assert getattr(again, field) == getattr(theirs, field), field


def test_the_published_gemma_configs_are_our_presets():
    """The gemma-2-2b-it and gemma-3-27b-it configs build exactly the presets' architectures; the
    27B's vision tower and projector are what the preset's published count leaves out."""
    from test_presets import GEMMA3_VISION_TOWER

    from dpokit.models import ARCHITECTURES, llama

    with torch.device("meta"):
        assert model_from_hf_config(HF_REAL / "gemma-2-2b-it").args == llama(**ARCHITECTURES["gemma2_2b"]).args
        ours = model_from_hf_config(HF_REAL / "gemma-3-27b-it")
        assert ours.args == llama(**ARCHITECTURES["gemma3_27b"]).args
        full = transformers.AutoModelForImageTextToText.from_config(
            transformers.AutoConfig.from_pretrained(HF_REAL / "gemma-3-27b-it")
        )
    total = sum(p.numel() for p in full.parameters())
    assert total == 27_432_406_640  # the Hub's safetensors total of google/gemma-3-27b-it
    vision = sum(p.numel() for n, p in full.named_parameters() if "language_model" not in n)
    assert vision == GEMMA3_VISION_TOWER + 1152 * 5376 + 1152
    assert sum(p.numel() for p in ours.parameters()) == total - vision
