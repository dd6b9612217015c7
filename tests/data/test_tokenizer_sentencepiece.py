"""SentencePiece-style BPE (byte fallback, "▁" spaces) through the `tokenizers` backend, and the
Mistral / Phi-3 / Phi-4 / Gemma chat templates, against transformers' AutoTokenizer and
apply_chat_template on each family's published template (tests/fixtures/*_chat_template.jinja).

Gemma-style and Llama-style (Mistral, Phi-3) tokenizer.json files are built offline
(tests/sentencepiece_fixtures.py); the real Mistral-7B-Instruct-v0.2 and Phi-3-mini-128k-instruct
files in ../shared/hf-real are used as well when present.
"""

import json
from pathlib import Path

import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from dpokit.data import PreferenceDataset  # noqa: E402
from dpokit.data.hf_backend import BackendError, TokenizersTokenizer  # noqa: E402
from dpokit.data.hf_tokenizer import detect_template, hf_tokenizer  # noqa: E402
from dpokit.data.tokenizer import TEMPLATES  # noqa: E402
from sentencepiece_fixtures import sentencepiece_bpe  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
HF_REAL = Path(__file__).resolve().parents[3] / "shared" / "hf-real"
JINJA = {name: (FIXTURES / f"{name}_chat_template.jinja").read_text() for name in ("mistral_v0_2", "phi3", "phi4")}
JINJA |= {name: (FIXTURES / f"{name}_chat_template.jinja").read_text() for name in ("gemma2", "gemma3")}

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    " leading space",
    "   three leading, two trailing  ",
    "\nnewline first\n\nand blank lines\n",
    "tabs\tand\t\tmore",
    "Ünïcödé façade naïve café — “quotes” … ½",
    "emoji 🙂🙃👍🏽 👨‍👩‍👧‍👦 🇫🇷 and ∑∫√∞",
    "日本語のテキストと中文文本，还有한국어",
    "bytes outside the vocabulary: \x00\x01\x7f ☃ ⚡ 𝔘",  # byte fallback <0xNN>
    "[INST] not a marker here [/INST]",
    "",
    " ",
    "\n",
]

# Conversations with no system message (Mistral and Gemma 2 have no system role).
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4, of course. 🙂"}],
    [
        {"role": "user", "content": "  Hello\n there  "},
        {"role": "assistant", "content": " Bonjour !\n\n  ça va ? "},
        {"role": "user", "content": "x=1;\ty = 22 ☃"},
        {"role": "assistant", "content": "\nOK\x00done\n"},
    ],
    [
        {"role": "user", "content": "émoji 😀"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "  B  "},
    ],
]
WITH_SYSTEM = [
    [
        {"role": "system", "content": "  Be brief.\n"},
        {"role": "user", "content": " 2+2? "},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
    ],
]

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
PHI3_MARKERS = ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")

# name -> (tokenizer.json text, tokenizer_config.json fields): offline files laid out as the family's
FOLDERS = {
    "gemma": lambda: (
        sentencepiece_bpe("gemma", GEMMA_SPECIALS, bos="<bos>"),
        {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
    ),
    "mistral": lambda: (
        sentencepiece_bpe("llama", ["<unk>", "<s>", "</s>"], bos="<s>"),
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    ),
    "phi3": lambda: (
        sentencepiece_bpe("llama", ["<unk>", "<s>", "</s>", *PHI3_MARKERS], rstrip=PHI3_MARKERS[1:]),
        {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"},
    ),
}
FAMILY_JINJA = {"gemma": "gemma2", "gemma3": "gemma3", "mistral": "mistral_v0_2", "phi3": "phi3"}
REAL = {"mistral": "Mistral-7B-Instruct-v0.2", "phi3": "Phi-3-mini-128k-instruct"}


def _folder(tmp_path, family, template=None):
    """(dpokit tokenizer, transformers AutoTokenizer) of an offline folder for `family`."""
    text, config = FOLDERS["gemma" if family == "gemma3" else family]()
    (tmp_path / "tokenizer.json").write_text(text)
    config = {**config, "chat_template": JINJA[template or FAMILY_JINJA[family]]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return hf_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)


def _real(family):
    if not HF_REAL.is_dir():
        pytest.skip("../shared/hf-real is not here")
    folder = HF_REAL / REAL[family]
    return hf_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


SOURCES = [("offline", f) for f in ("gemma", "mistral", "phi3")] + [("real", f) for f in REAL]


@pytest.fixture(params=SOURCES, ids=[f"{s}-{f}" for s, f in SOURCES])
def family_tokenizers(request, tmp_path):
    source, family = request.param
    tok, hf = _folder(tmp_path, family) if source == "offline" else _real(family)
    return family, tok, hf


def test_sentencepiece_files_run_on_tokenizers_with_the_reason_shown(family_tokenizers):
    family, tok, _ = family_tokenizers
    assert isinstance(tok, TokenizersTokenizer) and tok.backend == "tokenizers"
    assert tok.template.name == family  # detected from the folder's published template
    assert "byte_fallback=True is not supported" in tok.reason and tok.reason in repr(tok)


def test_byte_level_files_stay_on_tiktoken(tmp_path):
    """A file tiktoken reproduces exactly keeps the tiktoken backend (the Phi-4 layout here)."""
    tok, hf = _phi4(tmp_path)
    assert tok.backend == "tiktoken" and not isinstance(tok, TokenizersTokenizer)
    assert "backend='tiktoken'" in repr(tok)


def test_encode_decode_and_bos_equal_autotokenizer(family_tokenizers):
    _, tok, hf = family_tokenizers
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        # BOS as the file's post-processor adds it (Mistral and Gemma yes, Phi-3 no)
        assert tok.encode(text, add_special_tokens=True) == hf.encode(text), text
        assert tok.decode(ids) == hf.decode(ids), text
    assert tok.vocab_size == len(hf)
    bos_added = tok.encode("x", add_special_tokens=True)[: -len(tok.encode("x"))]
    assert bos_added == ([] if tok.template.name == "phi3" else [hf.bos_token_id])


def _check_conversation(tok, hf, messages, **kwargs):
    for generation_prompt in (False, True):
        shown = messages[:-1] if generation_prompt else messages
        expected = _ids(hf.apply_chat_template(shown, tokenize=True, add_generation_prompt=generation_prompt, **kwargs))
        ids, _ = tok.tokenize_messages(shown, add_generation_prompt=generation_prompt)
        assert ids == expected, (tok.template.name, shown, generation_prompt)
    # the training mask: exactly the assistant contents + end of turn (whitespace aside: Phi-3's
    # <|assistant|> swallows the whitespace a reply starts with, SentencePiece decoding drops a space)
    ids, mask = tok.tokenize_messages(messages)
    template = tok.template
    replies = [m["content"] + template.end_of_turn for m in messages if m["role"] == "assistant"]
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert "".join(trained.split()) == "".join("".join(replies).split())
    # a DPO pair: the prompt (with its generation prompt) + the answer is the rendered conversation,
    # followed only by what the template writes after the last turn
    prompt, reply = messages[:-1], messages[-1]["content"]
    pair = tok.encode_prompt(prompt) + tok.encode_response(reply)
    full = _ids(hf.apply_chat_template(messages, tokenize=True, **kwargs))
    assert pair == full[: len(pair)], (template.name, messages)
    rest = hf.decode(full[len(pair) :])
    assert rest.strip() == template.closing, rest  # Phi-3's eos (its "\n" is taken by <|end|>'s rstrip)


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_chat_ids_equal_apply_chat_template(family_tokenizers, messages):
    _, tok, hf = family_tokenizers
    _check_conversation(tok, hf, messages)


def test_system_messages_as_the_published_templates_render_or_refuse_them(family_tokenizers):
    family, tok, hf = family_tokenizers
    for messages in WITH_SYSTEM:
        if family == "phi3":  # a <|system|> turn of its own
            _check_conversation(tok, hf, messages)
            continue
        # Mistral v0.2 and Gemma 2 have no system role: their templates raise, dpokit refuses in one line
        with pytest.raises(Exception, match="roles|System role"):
            hf.apply_chat_template(messages, tokenize=False)
        with pytest.raises(ValueError, match=rf"message 0: chat template '{family}' has no system role"):
            tok.encode_prompt(messages[:-1])


def test_gemma3_folds_the_system_message_into_the_first_user_turn(tmp_path):
    tok, hf = _folder(tmp_path, "gemma3")
    assert tok.template.name == "gemma3"
    for messages in WITH_SYSTEM + CONVERSATIONS:
        _check_conversation(tok, hf, messages)
    text = hf.apply_chat_template(WITH_SYSTEM[0], tokenize=False)
    assert text.startswith("<bos><start_of_turn>user\n  Be brief.\n\n\n2+2?<end_of_turn>\n")


@pytest.mark.parametrize("family", ["gemma", "gemma3", "mistral"])
def test_roles_that_do_not_alternate_are_refused_as_the_templates_refuse_them(tmp_path, family):
    tok, hf = _folder(tmp_path, family)
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="alternate"):
        hf.apply_chat_template(messages, tokenize=False)
    with pytest.raises(ValueError, match="message 1: role 'user'.*alternate user / assistant"):
        tok.encode_prompt(messages)
    with pytest.raises(ValueError, match="message 0: role 'assistant'"):
        tok.encode_prompt([{"role": "assistant", "content": "a"}])


def test_mistral_reply_that_merges_with_inst_is_split_at_the_seam():
    """Mistral's answer follows "[/INST]" with no space, so "]," is one token of the rendered
    conversation: a prompt / reply split cannot reproduce it. The reply keeps its text (its first
    character as a byte token) and the pair decodes to the rendered conversation."""
    tok, hf = _real("mistral")
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": ", then."}]
    pair = tok.encode_prompt(messages[:1]) + tok.encode_response(messages[1]["content"])
    full = _ids(hf.apply_chat_template(messages, tokenize=True))
    assert pair != full and tok.decode(pair) == hf.decode(full)
    assert "]," in hf.convert_ids_to_tokens(full)


def test_preference_dataset_tokenizes_pairs_as_rendered(tmp_path):
    tok, hf = _folder(tmp_path, "phi3")
    rows = [
        {"prompt": [{"role": "user", "content": " Hi there\n"}], "chosen": "  Hello!", "rejected": "Go away 😀"},
        {"prompt": "2+2?", "chosen": "4", "rejected": "\n5"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = PreferenceDataset(path, tok, max_seq_len=512)
    for item, row in zip(dataset, rows):
        prompt = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        for key in ("chosen", "rejected"):
            full = _ids(hf.apply_chat_template(prompt + [{"role": "assistant", "content": row[key]}], tokenize=True))
            assert item["prompt_ids"] + item[f"{key}_ids"] == full[:-1]  # all but Phi-3's closing eos
            assert full[-1] == hf.convert_tokens_to_ids("<|endoftext|>")


def test_tokenizers_backend_refusals(tmp_path):
    text, config = FOLDERS["mistral"]()
    data = json.loads(text)
    data["model"]["dropout"] = 0.1
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": JINJA["mistral_v0_2"]}))
    with pytest.raises(BackendError, match=r"tokenizer.json: model.dropout=0.1: BPE dropout is random"):
        hf_tokenizer(tmp_path)
    # a template whose markers the vocabulary lacks
    (tmp_path / "tokenizer.json").write_text(text)
    with pytest.raises(ValueError, match="chat template 'phi3' needs special token '<|user|>'"):
        hf_tokenizer(tmp_path, template="phi3")


# --------------------------------------------------------------------------- Phi-4 (byte-level BPE, tiktoken)

PHI4_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"]


def _phi4(tmp_path):
    """Phi-4's layout: a GPT-4-style byte-level BPE (tiktoken reproduces it) with its chat markers,
    and phi-4's template as documented on its model card (only its config.json is in
    ../shared/hf-real, see tests/fixtures/phi4_chat_template.jinja)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=PHI4_SPECIALS,
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 20, trainer)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", chat_template=JINJA["phi4"]
    )
    hf.save_pretrained(tmp_path)
    return hf_tokenizer(tmp_path), hf


def test_phi4_template_is_detected_and_equals_apply_chat_template(tmp_path):
    tok, hf = _phi4(tmp_path)
    assert tok.template.name == "phi4"
    for messages in CONVERSATIONS + WITH_SYSTEM:
        _check_conversation(tok, hf, messages)


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "jinja, bos, eos, expected",
    [
        ("mistral_v0_2", "<s>", "</s>", "mistral"),
        ("phi3", "<s>", "<|endoftext|>", "phi3"),
        ("phi4", "<|endoftext|>", "<|im_end|>", "phi4"),
        ("gemma2", "<bos>", "<eos>", "gemma"),
        ("gemma3", "<bos>", "<eos>", "gemma3"),
    ],
)
def test_new_templates_are_detected_from_the_published_jinja(tmp_path, jinja, bos, eos, expected):
    config = {"chat_template": JINJA[jinja], "bos_token": bos, "eos_token": eos}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert detect_template(tmp_path) is TEMPLATES[expected]


def test_a_mistral_like_template_that_folds_the_system_message_is_refused(tmp_path):
    """Mistral's later templates put the system message inside the last [INST]: no built-in
    template renders that, so detection refuses in one line rather than guess."""
    folding = JINJA["mistral_v0_2"].replace(
        "{{ bos_token }}",
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set messages = messages[1:] %}{% endif %}",
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": folding, "bos_token": "<s>", "eos_token": "</s>"})
    )
    with pytest.raises(Exception, match="renders differently from every built-in template"):
        detect_template(tmp_path)


def test_gemma3_refuses_a_system_message_with_no_user_turn_to_fold_into(tmp_path):
    tok, hf = _folder(tmp_path, "gemma3")
    system = [{"role": "system", "content": "Be brief."}]
    # the published template drops it without a word; dpokit says so instead
    assert "Be brief" not in hf.apply_chat_template(system, tokenize=False, add_generation_prompt=True)
    with pytest.raises(ValueError, match="folds the system message into the first user message, and there is none"):
        tok.encode_prompt(system)
