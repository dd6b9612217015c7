"""tokenizer.json -> tiktoken conversion and chat templates, against `tokenizers`/`transformers`."""

import base64
import json
import unicodedata

import pytest

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

from dpokit.data import PreferenceDataset  # noqa: E402
from dpokit.data.hf_tokenizer import (  # noqa: E402
    LLAMA3_PATTERN,
    TokenizerError,
    hf_tokenizer,
    llama3_tokenizer,
    tokenizer_from_json,
    tokenizer_json_encoding,
)
from dpokit.data.tokenizer import llama3_1_template, llama3_2_template  # noqa: E402
from hf_fixtures import (  # noqa: E402
    LLAMA3_1_JINJA,
    LLAMA3_2_JINJA,
    LLAMA3_JINJA,
    QWEN2_5_JINJA,
    QWEN3_JINJA,
    SMOLLM2_JINJA,
)

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog 1234567890 times.",
    "def f(x):\n    return x ** 2  # square\n\n\tif x > 10:\n\t\tprint('big')\r\n",
    "Ünïcödé façade naïve café — “quotes” ‘single’ … ½ ² ³ ٣ ߁",
    "日本語のテキストと中文文本，还有한국어 텍스트.",
    "emoji 🙂🙃👍🏽 👨‍👩‍👧‍👦 🇫🇷 and symbols ∑∫√∞ ≠ ≤",
    "     leading spaces, trailing spaces     \n\n\n   mixed \t tabs\t\t and newlines\r\n\r\n",
    "numbers: 3.14159, 2,718, 1e-10, 0x1F, 007, 12345678901234567890",
    "don't won't it's I'm we'll they'd you've SHOUTING'S",
    '<|im_start|>user\nhi<|im_end|> and <tool_call>{"a": 1}</tool_call>',
    "café vs cafe\u0301 (NFC matters)",
]
EVAL_TEXTS = CORPUS + [
    "Completely unseen text: zebras quizzically vex jumpy fowl 98765 !!! ???",
    "  x  \n  y  \n\n\n",
    "a1b22c333 d 4 5  6   7",
    "mixed<|endoftext|>specials<|eot_id|>inside",
    "",
    " ",
    "\n",
    "🙂" * 5 + "x" * 40,
]


def train(pre_tokenizer, normalizer=None, vocab_size=700):
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.add_tokens(["<tool_call>", "</tool_call>"])  # added, not special: matched inside text
    return tok


VARIANTS = {
    "qwen2_split_nfc": lambda: train(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
        normalizers.NFC(),
    ),
    "llama3_split": lambda: train(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    ),
    "gpt2_bytelevel": lambda: train(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)),
    "smollm2_digits": lambda: train(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    ),
    "gaps_split": lambda: train(
        pre_tokenizers.Sequence(
            [  # a pattern that leaves text between matches
                pre_tokenizers.Split(Regex(r"\p{L}+"), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_converted_tokenizer_json_matches_tokenizers_exactly(variant, tmp_path):
    reference = VARIANTS[variant]()
    reference.save(str(tmp_path / "tokenizer.json"))
    tok = hf_tokenizer(tmp_path, template="chatml")
    for text in EVAL_TEXTS:
        expected = reference.encode(text, add_special_tokens=False).ids
        # the raw encoding with every special allowed is what `tokenizers` does with any text
        raw = unicodedata.normalize(tok.normalizer, text) if tok.normalizer else text
        assert tok.encoding.encode(raw, allowed_special="all") == expected, (variant, text)
        if not any(s in text for s in SPECIALS):
            assert tok.encode(text) == expected, (variant, text)
        assert tok.decode(tok.encode(text)) == (
            text
            if "NFC" not in variant and "nfc" not in variant
            else reference.decode(expected, skip_special_tokens=False)
        )
    # user-typed special-token text stays text in dpokit (unlike the raw encoding)
    assert tok.eot_id not in tok.encode("<|im_end|>")
    assert tok.encode("<tool_call>") == [reference.token_to_id("<tool_call>")]


def test_unconvertible_tokenizers_are_refused(tmp_path):
    reference = VARIANTS["llama3_split"]()
    data = json.loads(reference.to_str())
    cases = {
        "byte_fallback": lambda d: d["model"].update(byte_fallback=True),
        "normalizer": lambda d: d.update(normalizer={"type": "NFKC"}),
        "model type": lambda d: d["model"].update(type="Unigram"),
        "add_prefix_space": lambda d: d["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True),
        "behavior": lambda d: d["pre_tokenizer"]["pretokenizers"][0].update(behavior="Removed"),
        "lstrip": lambda d: d["added_tokens"][-1].update(lstrip=True),
        "not produced by any merge": lambda d: d["model"]["merges"].pop(),
    }
    for message, mutate in cases.items():
        broken = json.loads(json.dumps(data))
        mutate(broken)
        (tmp_path / "tokenizer.json").write_text(json.dumps(broken))
        with pytest.raises(TokenizerError, match=message):
            tokenizer_json_encoding(tmp_path / "tokenizer.json")


def test_llama3_tiktoken_model_file(tmp_path):
    # a tokenizer.model in Meta's format, written from a trained BPE (ranks = ids, bytes only)
    reference = VARIANTS["llama3_split"]()
    encoding, _ = tokenizer_json_encoding(_save(reference, tmp_path))
    ranks = encoding._mergeable_ranks
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda x: x[1])]
    # Meta's file holds ranks 0..N-1; renumber densely and compare on texts without specials
    dense = {token: i for i, (token, _) in enumerate(sorted(ranks.items(), key=lambda x: x[1]))}
    lines = [f"{base64.b64encode(token).decode()} {i}" for token, i in dense.items()]
    (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    tok = llama3_tokenizer(tmp_path / "tokenizer.model")
    n = len(dense)
    assert tok.special_tokens["<|begin_of_text|>"] == n and tok.eot_id == n + 9
    assert tok.special_tokens["<|reserved_special_token_247|>"] == n + 255 and tok.vocab_size == n + 256
    to_dense = {rank: dense[token] for token, rank in ranks.items()}
    for text in EVAL_TEXTS:
        if any(s in text for s in SPECIALS) or "<tool_call>" in text:
            continue
        expected = [to_dense[i] for i in reference.encode(text, add_special_tokens=False).ids]
        assert tok.encode(text) == expected, text
        assert tok.decode(tok.encode(text)) == text


def _save(reference, tmp_path):
    reference.save(str(tmp_path / "tokenizer.json"))
    return tmp_path / "tokenizer.json"


# --------------------------------------------------------------------------- chat templates

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4, of course. 🙂"}],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "  Hello\n there  "},
        {"role": "assistant", "content": "Bonjour !\n\n  ça va ?"},
        {"role": "user", "content": "x=1;\ty = 22"},
    ],
]


@pytest.mark.parametrize(
    "jinja, expected_template", [(LLAMA3_JINJA, "llama3"), (QWEN2_5_JINJA, "qwen2_5"), (SMOLLM2_JINJA, "smollm2")]
)
def test_chat_template_ids_equal_transformers_apply_chat_template(jinja, expected_template, tmp_path):
    transformers = pytest.importorskip("transformers")
    reference = VARIANTS["qwen2_split_nfc"]()
    reference.save(str(tmp_path / "tokenizer.json"))
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=reference, bos_token="<|begin_of_text|>", eos_token="<|endoftext|>", chat_template=jinja
    )
    hf.save_pretrained(tmp_path)
    tok = hf_tokenizer(tmp_path)  # the template is detected from tokenizer_config.json
    assert tok.template.name == expected_template
    for messages in CONVERSATIONS:
        for generation_prompt in (False, True):
            expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
            if isinstance(expected, dict) or hasattr(expected, "keys"):
                expected = expected["input_ids"]
            ids, mask = tok.tokenize_messages(messages, add_generation_prompt=generation_prompt)
            assert ids == list(expected), (expected_template, messages)
        # the training mask covers exactly the assistant contents and their end-of-turn tokens
        trained = tok.decode([i for i, m in zip(ids, mask) if m])
        end = tok.template.end_of_turn
        replies = [
            m["content"].strip() if tok.template.trim_content else m["content"]
            for m in messages
            if m["role"] == "assistant"
        ]
        assert trained == "".join(r + end for r in replies)


def _qwen3_tokenizers(tmp_path):
    """dpokit's and transformers' tokenizer over one tokenizer.json with Qwen3's think tokens (added,
    not special, as Qwen3 ships them) and Qwen3's published chat template."""
    transformers = pytest.importorskip("transformers")
    reference = VARIANTS["qwen2_split_nfc"]()
    reference.add_tokens(["<think>", "</think>"])
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=reference, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN3_JINJA
    )
    hf.save_pretrained(tmp_path)
    return hf_tokenizer(tmp_path), hf


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded)


def test_qwen3_template_is_detected_and_equals_apply_chat_template_in_non_thinking_mode(tmp_path):
    tok, hf = _qwen3_tokenizers(tmp_path)
    assert tok.template.name == "qwen3"
    conversations = [
        *CONVERSATIONS,
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\n\nHello there"}],  # newlines dropped
    ]
    for messages in conversations:
        for generation_prompt in (False, True):
            expected = hf.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=generation_prompt, enable_thinking=False
            )
            ids, mask = tok.tokenize_messages(messages, add_generation_prompt=generation_prompt)
            assert ids == _ids(expected), messages
        if messages[-1]["role"] == "assistant":
            # a DPO pair: the prompt (generation prompt with the empty think block) + the answer is
            # exactly the rendered conversation, and only the answer and its <|im_end|> are trained
            prompt, reply = messages[:-1], messages[-1]["content"]
            pair = tok.encode_prompt(prompt) + tok.encode_response(reply)
            full = _ids(hf.apply_chat_template(messages, tokenize=True, enable_thinking=False))
            assert pair + tok.encode(tok.template.trailer) == full  # chatml's untrained newline after the pair
            ids, mask = tok.tokenize_messages(messages)
            last = tok.decode([i for i, m in zip(ids, mask) if m]).split("<|im_end|>")[-2]
            assert last == reply.lstrip("\n")


def test_qwen3_refuses_reasoning_in_earlier_turns(tmp_path):
    tok, _ = _qwen3_tokenizers(tmp_path)
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>hm</think>b"},
        {"role": "user", "content": "c"},
    ]
    with pytest.raises(ValueError, match=r"message 1: an assistant turn with reasoning \(</think>\)"):
        tok.encode_prompt(messages)


# --------------------------------------------------------------------------- Llama 3.1 / 3.2 Instruct

# Meta's published chat templates (tokenizer_config.json of Llama-3.1-8B-Instruct and
# Llama-3.2-1B-Instruct), tool branches included, written out as data files.
# (prompt messages, chosen, rejected): no system, a system with surrounding whitespace, a
# whitespace-only system, multi-turn prompts (an earlier assistant turn, a later system turn).
LLAMA_PAIRS = [
    ([{"role": "user", "content": "What is 2 + 2?"}], "4, of course. 🙂", "5"),
    (
        [{"role": "system", "content": "  Answer in French.\n"}, {"role": "user", "content": "  Hello\n there  "}],
        "Bonjour !\n\n  ça va ?",
        "  Hello there.  ",
    ),
    ([{"role": "system", "content": " \n "}, {"role": "user", "content": "x=1;\ty = 22"}], "y - x = 21", "23"),
    (
        [
            {"role": "system", "content": "1) be brief\n2) be kind"},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": " Hello! "},
            {"role": "user", "content": "Count to 3"},
        ],
        "1 2 3",
        "1, 2, 4",
    ),
    (
        [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "system", "content": "Now shout."},
            {"role": "user", "content": "q2"},
        ],
        "A2!",
        "a2",
    ),
]


def _hf_ids(hf, messages, **kwargs):
    ids = hf.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


LLAMA_TEMPLATES = {"llama3_1": (LLAMA3_1_JINJA, llama3_1_template), "llama3_2": (LLAMA3_2_JINJA, llama3_2_template)}


@pytest.mark.parametrize("variant", ["llama3_split", "qwen2_split_nfc"])
@pytest.mark.parametrize("name", sorted(LLAMA_TEMPLATES))
def test_llama3_1_and_3_2_ids_equal_transformers_with_meta_templates(variant, name, tmp_path):
    transformers = pytest.importorskip("transformers")
    jinja, make_template = LLAMA_TEMPLATES[name]
    reference = VARIANTS[variant]()
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=reference, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=jinja
    )
    hf.save_pretrained(tmp_path)
    assert hf_tokenizer(tmp_path).template.name == name  # detected from tokenizer_config.json
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in LLAMA_PAIRS))
    for date in ("26 Jul 2024", "01 Jan 2025"):
        tok = (
            hf_tokenizer(tmp_path, template=name)
            if date == "26 Jul 2024"
            else tokenizer_from_json(tmp_path / "tokenizer.json", make_template(date_string=date))
        )
        dataset = PreferenceDataset(data, tok, max_seq_len=4096)
        for (prompt, chosen, rejected), item in zip(LLAMA_PAIRS, dataset):
            hf_prompt = _hf_ids(hf, prompt, add_generation_prompt=True, date_string=date)
            assert tok.encode_prompt(prompt) == item["prompt_ids"] == hf_prompt, (name, date, prompt)
            for reply, key in ((chosen, "chosen_ids"), (rejected, "rejected_ids")):
                messages = prompt + [{"role": "assistant", "content": reply}]
                hf_full = _hf_ids(hf, messages, date_string=date)
                # the dataset's prompt + response is the whole conversation, and the response ids
                # (the only trained tokens of a pair) are exactly what follows the generation prompt
                assert item["prompt_ids"] + item[key] == hf_full, (name, date, messages)
                ids, mask = tok.tokenize_messages(messages)
                assert ids == hf_full
                replies = [m["content"].strip() + "<|eot_id|>" for m in messages if m["role"] == "assistant"]
                assert tok.decode([i for i, m in zip(ids, mask) if m]) == "".join(replies)
    if name == "llama3_1":  # without date_string, Meta's 3.1 template uses dpokit's default date
        messages = LLAMA_PAIRS[1][0] + [{"role": "assistant", "content": LLAMA_PAIRS[1][1]}]
        assert _hf_ids(hf, messages) == hf_tokenizer(tmp_path).tokenize_messages(messages)[0]


TOOL_CALL = {"type": "function", "function": {"name": "f", "arguments": {}}}


@pytest.mark.parametrize(
    "message",
    [
        {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": "42"},
        {"role": "ipython", "content": "42"},
    ],
)
def test_llama3_1_template_refuses_tool_messages(message, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=VARIANTS["llama3_split"](), bos_token="<|begin_of_text|>", chat_template=LLAMA3_1_JINJA
    )
    messages = [{"role": "user", "content": "call f"}, message]
    # Meta's template renders these in its own tool layout; dpokit refuses rather than render them as text
    hf_text = hf.apply_chat_template(messages, tokenize=False)
    assert "ipython" in hf_text or '{"name": "f"' in hf_text
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tool calls are not supported|unknown role"):
        hf_tokenizer(tmp_path).tokenize_messages(messages)


def test_tokenizer_json_converted_from_tiktoken_ranks_loads_by_its_ranks(tmp_path):
    """The HF export of Llama 3 (no original/): transformers' TikTokenConverter turns Meta's ranks
    into a tokenizer.json with every split of a token as a merge and ignore_merges set."""
    convert = pytest.importorskip("transformers.convert_slow_tokenizer")
    reference = VARIANTS["llama3_split"]()
    encoding, _ = tokenizer_json_encoding(_save(reference, tmp_path))
    ordered = sorted(encoding._mergeable_ranks, key=encoding._mergeable_ranks.get)
    (tmp_path / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ordered))
    )
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    converted = convert.TikTokenConverter(
        vocab_file=str(tmp_path / "tokenizer.model"), pattern=LLAMA3_PATTERN, extra_special_tokens=specials
    ).converted()
    folder = tmp_path / "export"
    folder.mkdir()
    converted.save(str(folder / "tokenizer.json"))
    data = json.loads((folder / "tokenizer.json").read_text())
    assert data["model"]["ignore_merges"] and len(data["model"]["merges"]) > len(ordered) - 256  # several per token
    tok = hf_tokenizer(folder, template="llama3")
    from_model = llama3_tokenizer(tmp_path / "tokenizer.model")
    for text in EVAL_TEXTS:
        if any(s in text for s in SPECIALS) or "<tool_call>" in text:
            continue
        expected = converted.encode(text, add_special_tokens=False).ids
        assert tok.encode(text) == expected == from_model.encode(text), text
        assert tok.decode(expected) == text
    assert tok.eot_id == converted.token_to_id("<|eot_id|>")


def test_template_detection_refuses_a_folder_template_no_built_in_renders(tmp_path):
    """A SmolLM3-like template: ChatML markers (so chatml-family templates are tried first) with
    its own system block; no built-in renders it, so detection refuses rather than guesses, and an
    explicit choice warns."""
    from dpokit.data.hf_tokenizer import check_template, detect_template
    from dpokit.data.tokenizer import TEMPLATES

    smollm3_like = (
        "{{ '<|im_start|>system\\n## Metadata\\nKnowledge Cutoff Date: June 2025\\n<|im_end|>\\n' }}"
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ '<|im_start|>' + message['role'] + "
        "'\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    VARIANTS["gpt2_bytelevel"]().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": smollm3_like}))
    with pytest.raises(TokenizerError, match="renders differently from every built-in template"):
        detect_template(tmp_path)
    with pytest.raises(TokenizerError, match="renders differently"):
        hf_tokenizer(tmp_path)
    warning = check_template(tmp_path, TEMPLATES["smollm2"])
    assert warning.startswith("warning: chat template 'smollm2' renders differently from")
    # the same folder with SmolLM2's own template is detected as smollm2
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": SMOLLM2_JINJA}))
    assert detect_template(tmp_path).name == "smollm2" and check_template(tmp_path, TEMPLATES["smollm2"]) is None
