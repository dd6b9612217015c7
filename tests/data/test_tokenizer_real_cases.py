"""What real published tokenizer files carry: vocabularies lacking byte tokens (SmolLM2, Pythia),
overlapping non-special added tokens (phi-2's whitespace runs), special-token text in data."""

import json

import pytest

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from dpokit.data import PreferenceDataset  # noqa: E402
from dpokit.data.hf_tokenizer import hf_tokenizer  # noqa: E402
from dpokit.data.preference import DROPPED_BYTES, SPECIAL_TOKEN_TEXT  # noqa: E402

CORPUS = ["hello world, hello there", "ab ab abab  tabs\tand   spaces", "numbers 123 4567"] * 30
LACKING = [4, 6, 0x13, 0xC0, 0xFF]  # two control bytes and two that never occur in UTF-8
TEXTS = [
    "hel\x04lo world",
    "\x04",
    "a\x04b\x06ab",
    "x\x13 \x04 y",
    "ab\x04ab\x04ab",
    "héllo\x06wörld 12\x043",
    "plain text",
    " " * 9 + "x",
    "a" + " " * 17 + "b\t\t  c",
    "<|im_end|> inside",
]


def _tokenizer(tmp_path, added=()):
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    byte_char = pre_tokenizers.ByteLevel.alphabet()
    table = {b: c for b, c in zip(range(256), sorted(byte_char, key=lambda c: _byte_of(c)))}
    alphabet = [c for b, c in table.items() if b not in LACKING]
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=alphabet, special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    if added:
        tok.add_tokens(list(added))
    tok.save(str(tmp_path / "tokenizer.json"))
    return tok


def _byte_of(char):
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if ord(char) in printable:
        return ord(char)
    others = [b for b in range(256) if b not in printable]
    return others[ord(char) - 256]


def test_vocabulary_lacking_bytes_loads_and_drops_them_as_tokenizers_does(tmp_path):
    reference = _tokenizer(tmp_path)
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) < 256 + 400  # the bytes really are missing
    tok = hf_tokenizer(tmp_path, template="chatml")
    assert tok.missing_bytes == frozenset(LACKING)
    for text in TEXTS[:-1]:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids, text
    assert tok.dropped_bytes("a\x04b\x06") == 2 and tok.dropped_bytes("ab") == 0


def test_overlapping_added_tokens_match_leftmost_longest(tmp_path):
    runs = [" " * n for n in (2, 3, 4, 8, 16)] + ["\t\t"]
    reference = _tokenizer(tmp_path, added=runs)
    tok = hf_tokenizer(tmp_path, template="chatml")
    for text in TEXTS[:-1] + [" " * n + "z" for n in range(1, 40)]:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids, repr(text)


def test_datasets_count_and_name_records_with_missing_bytes_or_special_token_text(tmp_path):
    _tokenizer(tmp_path)
    tok = hf_tokenizer(tmp_path, template="chatml")
    rows = [
        {"prompt": "say hello", "chosen": "hello", "rejected": "world"},
        {"prompt": "say\x04 hello", "chosen": "hello", "rejected": "world"},
        {"prompt": "say <|im_end|> hello", "chosen": "hello", "rejected": "world"},
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = PreferenceDataset(data, tok, max_seq_len=256)
    assert len(dataset) == 3  # kept, not dropped
    assert dataset.stats.noted == {DROPPED_BYTES: [f"{data}:2"], SPECIAL_TOKEN_TEXT: [f"{data}:3"]}
    assert f"{data}:2" in dataset.stats.summary()
    # the typed <|im_end|> stayed plain text: no more end-of-turn ids than the template's own
    assert dataset[2]["prompt_ids"].count(tok.eot_id) == dataset[0]["prompt_ids"].count(tok.eot_id) == 1
