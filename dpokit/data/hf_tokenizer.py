"""Tokenizers of real checkpoints, as tiktoken `Encoding`s.

- `llama3_tokenizer(path)`: Meta's `original/tokenizer.model` (tiktoken's own format: one
  "base64(token) rank" per line) with Llama 3's 256 special tokens and pre-tokenizer regex.
- `tokenizer_json_encoding(path)`: a byte-level BPE `tokenizer.json` (Qwen2.5, SmolLM2, Pythia,
  phi-2, the HF export of Llama 3, anything GPT-2-like) converted exactly; what cannot be converted
  exactly is refused with a `TokenizerError` naming the field.
- `hf_tokenizer(checkpoint_dir)`: picks the file and the chat template (from tokenizer_config.json's
  Jinja template) of a checkpoint directory. A tokenizer.json the conversion refuses (SentencePiece-
  style BPE with byte fallback: Gemma, Mistral 7B, Llama 2, Phi-3) is run by HF `tokenizers` instead
  (`dpokit.data.hf_backend`), the refusal kept as the reason.

Why the conversion is exact (when the checks pass): tiktoken splits text with one regex and then
repeatedly merges the adjacent pair whose concatenation has the lowest rank; HF BPE merges the
adjacent pair with the lowest merge index. With rank = token id, the two agree when ids grow with
the merge index and every multi-byte token is the result of one merge (or, for files converted
from tiktoken ranks, of all its splits, with `ignore_merges`): checked in `_check_merges`. Bytes
the vocabulary lacks are dropped before merging, as HF does (`Tokenizer.missing_bytes`).
HF's `Split(regex, Isolated)` keeps the text between matches as pieces
while tiktoken drops it, so a pattern P becomes `P|(?:(?!P)[\\s\\S])+`, which yields exactly those
gaps. Non-special added tokens are matched inside ordinary text, leftmost-longest, as HF does.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import tiktoken

from dpokit.data.hf_backend import TokenizersTokenizer, read_tokenizer_config
from dpokit.data.jinja_template import match_template, read_jinja_template
from dpokit.data.tokenizer import LLAMA3_TEMPLATE, TEMPLATES, ChatTemplate, Tokenizer
from dpokit.errors import DpokitError


class TokenizerError(DpokitError):
    """A tokenizer file we cannot reproduce exactly."""


# Meta's Llama 3 pre-tokenizer regex (tiktoken syntax).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
# GPT-2's, used by a ByteLevel pre-tokenizer with use_regex=true.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# GPT-2's applied after splitting off every digit (a Digits(individual_digits) pre-tokenizer
# first, as SmolLM2 does): a digit is its own piece, and "end of piece" before a digit is what
# `(?!\S)` saw inside the digit-free piece.
DIGITS_THEN_GPT2_PATTERN = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"

LLAMA3_NUM_SPECIAL = 256
LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)


def llama3_special_tokens(first_id: int) -> dict[str, int]:
    """Llama 3.1+'s special tokens (3.0 names ids 128004/128008/128010 reserved_special_token_2/4/5;
    the ids used by the template and padding are the same)."""
    names = list(LLAMA3_NAMED_SPECIALS)
    names += [f"<|reserved_special_token_{3 + i}|>" for i in range(LLAMA3_NUM_SPECIAL - len(names))]
    return {name: first_id + i for i, name in enumerate(names)}


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerError(f"{path}:{lineno}: expected 'base64-token rank'") from None
    return ranks


def llama3_tokenizer(path: str | Path, template: ChatTemplate = LLAMA3_TEMPLATE) -> Tokenizer:
    """Meta's Llama 3 `tokenizer.model` (tiktoken format) -> Tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer file not found")
    ranks = _read_tiktoken_ranks(path)
    encoding = tiktoken.Encoding(
        name="llama3",
        pat_str=LLAMA3_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=llama3_special_tokens(len(ranks)),
    )
    return Tokenizer(encoding, template, pad_token="<|finetune_right_pad_id|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _pattern(pre_tokenizer: dict | None, source: str) -> str:
    def byte_level(node: dict, use_regex_expected: bool | None) -> None:
        if node.get("add_prefix_space"):
            raise TokenizerError(f"{source}: pre_tokenizer ByteLevel add_prefix_space=true is not supported")
        if use_regex_expected is not None and bool(node.get("use_regex", True)) != use_regex_expected:
            raise TokenizerError(
                f"{source}: pre_tokenizer ByteLevel use_regex={node.get('use_regex')} "
                "cannot be combined with the preceding split exactly"
            )

    if pre_tokenizer is None:
        raise TokenizerError(f"{source}: no pre_tokenizer: not a byte-level BPE tokenizer")
    kind = pre_tokenizer.get("type")
    if kind == "ByteLevel":
        byte_level(pre_tokenizer, None)
        if not pre_tokenizer.get("use_regex", True):
            raise TokenizerError(f"{source}: ByteLevel without a regex (whole text as one piece) is not supported")
        return GPT2_PATTERN
    if kind == "Sequence":
        steps = pre_tokenizer.get("pretokenizers", [])
        kinds = [s.get("type") for s in steps]
        if kinds == ["Split", "ByteLevel"]:
            split, level = steps
            regex = split.get("pattern", {}).get("Regex")
            if regex is None or split.get("behavior") != "Isolated" or split.get("invert"):
                raise TokenizerError(
                    f"{source}: pre_tokenizer Split must be a Regex with behavior Isolated, "
                    f"got {split.get('pattern')} / {split.get('behavior')} / invert={split.get('invert')}"
                )
            byte_level(level, False)
            return f"(?:{regex})|(?:(?!(?:{regex}))[\\s\\S])+"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
            byte_level(steps[1], True)
            return DIGITS_THEN_GPT2_PATTERN
        raise TokenizerError(f"{source}: pre_tokenizer sequence {kinds} is not supported")
    raise TokenizerError(f"{source}: pre_tokenizer {kind!r} is not supported")


def tokenizer_json_encoding(path: str | Path) -> tuple[tiktoken.Encoding, dict]:
    """A byte-level BPE tokenizer.json -> (tiktoken Encoding, info) where info has
    `text_tokens` (non-special added tokens) and `normalizer` ("NFC" or None)."""
    path = Path(path)
    source = str(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TokenizerError(f"{path}: tokenizer.json not found") from None
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"{source}: model type {model.get('type')!r}: only BPE can be converted")
    for name, ok in (
        ("byte_fallback", not model.get("byte_fallback")),
        ("dropout", model.get("dropout") is None),
        ("continuing_subword_prefix", not model.get("continuing_subword_prefix")),
        ("end_of_word_suffix", not model.get("end_of_word_suffix")),
    ):
        if not ok:
            raise TokenizerError(f"{source}: model.{name}={model.get(name)!r} is not supported")
    normalizer = data.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise TokenizerError(f"{source}: normalizer {normalizer.get('type')!r} is not supported (only NFC)")
    decoder = data.get("decoder")
    if decoder is None or decoder.get("type") != "ByteLevel":
        raise TokenizerError(f"{source}: decoder {decoder and decoder.get('type')!r}: only ByteLevel is supported")
    pattern = _pattern(data.get("pre_tokenizer"), source)

    byte_of = {c: b for b, c in _bytes_to_unicode().items()}

    def to_bytes(token: str) -> bytes:
        try:
            return bytes(byte_of[c] for c in token)
        except KeyError:
            raise TokenizerError(f"{source}: vocab token {token!r} is not byte-level encoded") from None

    added = data.get("added_tokens") or []
    for token in added:
        for flag in ("lstrip", "rstrip", "single_word"):
            if token.get(flag):
                raise TokenizerError(f"{source}: added token {token['content']!r} has {flag}=true (not supported)")
    added_ids = {t["id"] for t in added}
    vocab = {to_bytes(tok): i for tok, i in model["vocab"].items() if i not in added_ids}
    # A byte with no token is dropped by HF BPE (no unk token, no byte fallback): Tokenizer does the same.
    missing_bytes = frozenset(b for b in range(256) if bytes([b]) not in vocab)
    _check_merges(model, vocab, to_bytes, source)
    specials = {t["content"]: t["id"] for t in added}
    encoding = tiktoken.Encoding(
        name=path.parent.name or "tokenizer", pat_str=pattern, mergeable_ranks=vocab, special_tokens=specials
    )
    info = {
        "text_tokens": frozenset(t["content"] for t in added if not t.get("special")),
        "normalizer": "NFC" if normalizer is not None else None,
        "missing_bytes": missing_bytes,
    }
    return encoding, info


def _check_merges(model: dict, vocab: dict[bytes, int], to_bytes, source: str) -> None:
    """Refuse merge lists that tiktoken's "merge the pair whose result has the lowest rank" with
    rank = token id would not reproduce.

    Two kinds of file pass. Trained BPE (GPT-2, Qwen2, SmolLM2): one merge per multi-byte token,
    ids growing with the merge index. Files converted from tiktoken ranks (the HF export of Llama
    3): every split of a token into two tokens is a merge, sorted by the result's id, and
    `ignore_merges` set so a piece that is a whole token is taken as it is, as tiktoken does.
    """
    merged, last_id, several = set(), -1, False
    for index, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        result = to_bytes(left) + to_bytes(right)
        token_id = vocab.get(result)
        if token_id is None:
            raise TokenizerError(f"{source}: merge {index} ({left!r} {right!r}) produces a token not in the vocab")
        repeated = token_id == last_id
        several |= repeated
        if token_id < last_id or (result in merged and not repeated):
            raise TokenizerError(
                f"{source}: merge {index} ({left!r} {right!r}): token ids do not follow the merge "
                "order, so tiktoken ranks cannot reproduce it"
            )
        merged.add(result)
        last_id = token_id
    if several and not model.get("ignore_merges"):
        raise TokenizerError(
            f"{source}: some tokens come from several merges and model.ignore_merges is false: "
            "HF may split a whole-token piece that tiktoken keeps, so ids could differ"
        )
    unreachable = [t for t in vocab if len(t) > 1 and t not in merged]
    if unreachable:
        raise TokenizerError(
            f"{source}: {len(unreachable)} vocab token(s) are not produced by any merge (e.g. {unreachable[0]!r})"
        )


def tokenizer_from_json(path: str | Path, template: ChatTemplate | str, *, pad_token: str | None = None) -> Tokenizer:
    """A tokenizer.json -> Tokenizer: tiktoken when the conversion is exact, else the `tokenizers`
    backend (`dpokit.data.hf_backend`), the conversion's refusal kept as its `reason`. The folder's
    tokenizer_config.json, when there is one, gives the BOS / EOS handling and the pad token."""
    template = TEMPLATES[template] if isinstance(template, str) else template
    path = Path(path)
    try:
        encoding, info = tokenizer_json_encoding(path)
    except TokenizerError as refusal:
        if not path.is_file():
            raise
        config = read_tokenizer_config(path.parent)
        reason = f"tiktoken cannot reproduce it: {refusal}"
        return TokenizersTokenizer(path, template, reason=reason, config=config, pad_token=pad_token)
    return Tokenizer(encoding, template, pad_token=pad_token, **info)


def _likely_first(text: str) -> list[str]:
    """Built-in template names, the one the Jinja text hints at first (a 3.2 folder could render
    as 3.1 too: with the date fixed both lay out the same text)."""
    hint = None
    if "<|start_header_id|>" in text:
        hint = ("llama3_2" if "strftime_now" in text else "llama3_1") if "Cutting Knowledge Date" in text else "llama3"
    elif "<|im_sep|>" in text:
        hint = "phi4"
    elif "[INST]" in text:
        hint = "mistral"
    elif "<|user|>" in text:
        hint = "phi3"
    elif "<start_of_turn>" in text:
        hint = "gemma3" if "first_user_prefix" in text else "gemma"
    elif "<|im_start|>" in text:
        hint = (
            "qwen2_5"
            if "You are Qwen" in text
            else "smollm2"
            if "named SmolLM" in text
            else "qwen3"
            if "<think>" in text
            else "chatml"
        )
    return ([hint] if hint else []) + [name for name in TEMPLATES if name != hint]


def detect_template(checkpoint_dir: str | Path) -> ChatTemplate:
    """The built-in chat template that renders exactly as the folder's own Jinja template
    (`dpokit.data.jinja_template`); refused when none does."""
    found = read_jinja_template(checkpoint_dir)
    if found is None:
        raise TokenizerError(
            f"{Path(checkpoint_dir)}: no chat template (tokenizer_config.json chat_template or "
            f"chat_template.jinja); pass template= one of {sorted(TEMPLATES)}"
        )
    text, config, where = found
    names = _likely_first(text)
    template, difference = match_template(text, config, [TEMPLATES[name] for name in names])
    if template is None:
        raise TokenizerError(
            f"{where}: the chat template renders differently from every built-in template "
            f"({names[0]}: {difference}); pass template= one of {sorted(TEMPLATES)} "
            "to use one anyway"
        )
    return template


def check_template(checkpoint_dir: str | Path, template: ChatTemplate) -> str | None:
    """A warning when an explicitly chosen template renders differently from the folder's own."""
    found = read_jinja_template(checkpoint_dir)
    if found is None:
        return None
    text, config, where = found
    matched, difference = match_template(text, config, [template])
    if matched is not None:
        return None
    return f"warning: chat template {template.name!r} renders differently from {where} ({difference})"


def hf_tokenizer(checkpoint_dir: str | Path, template: str | None = None) -> Tokenizer:
    """The tokenizer of an HF checkpoint directory: `original/tokenizer.model` (Llama 3) if present,
    else `tokenizer.json`. template: a name in `TEMPLATES`, or None to detect it."""
    if checkpoint_dir is None:
        raise TokenizerError("checkpoint_dir is not set: pass checkpoint_dir=/path/to/a/hugging-face/model")
    if template is not None and template not in TEMPLATES:
        raise TokenizerError(f"unknown chat template {template!r}; choose from {sorted(TEMPLATES)}")
    directory = Path(checkpoint_dir)
    if template:
        chosen = TEMPLATES[template]
        warning = check_template(directory, chosen)
        if warning:
            print(warning, file=sys.stderr)
    else:
        chosen = detect_template(directory)
    if (directory / "original" / "tokenizer.model").is_file() and chosen.name.startswith("llama3"):
        return llama3_tokenizer(directory / "original" / "tokenizer.model", chosen)
    tokenizer_json = directory / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise TokenizerError(f"{directory}: no tokenizer.json or original/tokenizer.model")
    try:
        encoding, info = tokenizer_json_encoding(tokenizer_json)
    except TokenizerError:
        return tokenizer_from_json(tokenizer_json, chosen)
    pads = ("<|finetune_right_pad_id|>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>")
    pad = next((p for p in pads if p in encoding._special_tokens), None)
    return Tokenizer(encoding, chosen, pad_token=pad, **info)
