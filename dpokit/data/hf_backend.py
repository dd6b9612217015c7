"""The `tokenizers` backend: tokenizer.json files tiktoken cannot reproduce, run by HF's own library.

tiktoken is one regex split + byte-level BPE by rank. SentencePiece-style BPE (Gemma, Mistral 7B,
Llama 2, Phi-3: "▁" for spaces, a normalizer that prepends "▁" to each text between special
tokens, `<0xNN>` byte-fallback tokens for characters outside the vocabulary) is not that, so
`hf_tokenizer` loads such files here instead: the file is run by the `tokenizers` library itself,
the code transformers' AutoTokenizer runs, so ordinary text encodes and decodes as HF does. The
reason tiktoken was not used is kept (`TokenizersTokenizer.reason`, shown in the repr).

What dpokit adds on top is the chat layout, as in the tiktoken backend: template text and message
content are laid out by a `ChatTemplate`, special-token text inside a message stays text, and the
text between two special tokens is encoded as one piece. Two things HF does at a special token are
reproduced there: a token with `rstrip` / `lstrip` swallows the whitespace after / before it
(Phi-3's `<|end|>\\n`), and each piece is normalised on its own (the prepended "▁").
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from dpokit.data.tokenizer import ChatTemplate, Tokenizer, chat_segments, template_markers
from dpokit.errors import DpokitError


class BackendError(DpokitError):
    """A tokenizer.json (or its tokenizer_config.json) the tokenizers backend cannot reproduce."""


# Rust's char::is_whitespace (Unicode White_Space), what `tokenizers` strips for lstrip / rstrip;
# Python's str.isspace also takes the \x1c-\x1f separators.
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
_BYTE_TOKEN = "<0x{:02X}>"


class TokenizersTokenizer(Tokenizer):
    """A `Tokenizer` whose ordinary text goes through HF `tokenizers` (one tokenizer.json file).

    reason: why tiktoken was not used (the conversion's refusal). config: the folder's
    tokenizer_config.json (its pad_token is the padding id). What `encode(text,
    add_special_tokens=True)` adds (Mistral's and Gemma's BOS) is the file's post-processor, as in
    transformers 5, which ignores tokenizer_config.json's add_bos_token / add_eos_token when the
    folder has a tokenizer.json.
    """

    backend = "tokenizers"

    def __init__(
        self,
        path: str | Path,
        template: ChatTemplate,
        *,
        reason: str = "",
        config: dict | None = None,
        pad_token: str | None = None,
    ):
        import tokenizers

        path = Path(path)
        source, config = str(path), config or {}
        try:
            text = path.read_text()
            data = json.loads(text)
        except FileNotFoundError:
            raise BackendError(f"{path}: tokenizer.json not found") from None
        except json.JSONDecodeError as e:
            raise BackendError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
        model = data.get("model") or {}
        if model.get("dropout") not in (None, 0, 0.0):
            raise BackendError(f"{source}: model.dropout={model['dropout']!r}: BPE dropout is random, ids would vary")
        if config.get("split_special_tokens"):
            raise BackendError(
                f"{source}: tokenizer_config.json split_special_tokens=true (templates would not get their special tokens)"
            )
        try:
            self._full = tokenizers.Tokenizer.from_str(text)
            self._plain = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the library's own parse error: one line
            raise BackendError(f"{source}: the tokenizers library cannot load it ({e})") from None
        # Message text: special tokens written in it stay text (added non-special tokens still match).
        self._plain.encode_special_tokens = True
        self.path, self.reason, self.template = path, reason, template
        added = data.get("added_tokens") or []
        self.special_tokens = {t["content"]: t["id"] for t in added}
        self.text_tokens = frozenset(t["content"] for t in added if not t.get("special"))
        self._strip = {t["content"]: (bool(t.get("lstrip")), bool(t.get("rstrip"))) for t in added}
        self.normalizer, self.missing_bytes = None, frozenset()
        for token in template_markers(template):
            if token not in self.special_tokens:
                raise ValueError(f"chat template {template.name!r} needs special token {token!r}")
            if next(t for t in added if t["content"] == token).get("single_word"):
                raise BackendError(f"{source}: added token {token!r} has single_word=true (not supported)")
        self.eot_id = self.special_tokens[template.end_of_turn]
        pads = (pad_token, _token_text(config.get("pad_token")), "<pad>", "<|endoftext|>")
        self.pad_id = next((self.special_tokens[p] for p in pads if p in self.special_tokens), self.eot_id)
        specials = sorted(self.special_tokens, key=lambda t: (-len(t), t))
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None

    @property
    def name(self) -> str:
        return self.path.parent.name or "tokenizer"

    def __repr__(self) -> str:
        return (
            f"TokenizersTokenizer({self.name!r}, backend='tokenizers', template={self.template.name!r}, "
            f"reason={self.reason!r})"
        )

    @property
    def vocab_size(self) -> int:
        return self._full.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ordinary text -> ids as HF encodes it; special-token text stays text. With
        `add_special_tokens`, what the file's post-processor adds (a BOS) is added."""
        return self._plain.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._full.decode(list(ids), skip_special_tokens=False)

    def dropped_bytes(self, text: str) -> int:
        """0: such files have byte fallback or an unknown token; nothing is dropped."""
        return 0

    def _run_tokens(
        self, parts: Sequence[tuple[str, bool]], before: str | None, after: str | None
    ) -> tuple[list[int], list[bool], int | None]:
        """(ids, trained mask, where a token that starts in untrained text and ends in trained
        text ends, or None) of the text between special tokens `before` and `after`."""
        text = "".join(t for t, _ in parts)
        lead = len(text) - len(text.lstrip(_WHITESPACE)) if before and self._strip[before][1] else 0
        end = len(text.rstrip(_WHITESPACE)) if after and self._strip[after][0] else len(text)
        end = max(end, lead)
        encoding = self._plain.encode(text[lead:end], add_special_tokens=False)
        bounds, offset = [], 0
        for part, trained in parts:
            offset += len(part)
            bounds.append((offset, trained))
        ids, mask, crossing = list(encoding.ids), [], None
        for start, stop in encoding.offsets:
            start, stop = start + lead, stop + lead
            k = next(k for k, (bound, _) in enumerate(bounds) if start < bound or k == len(bounds) - 1)
            mask.append(bounds[k][1])
            if not bounds[k][1] and stop > bounds[k][0] and k + 1 < len(bounds) and bounds[k + 1][1]:
                crossing = stop
        return ids, mask, crossing

    def _encode_run(self, parts, before, after):
        ids, mask, _ = self._run_tokens(parts, before, after)
        return ids, mask

    def encode_response(self, content: str) -> list[int]:
        """One assistant reply as it follows `encode_prompt`: content + end-of-turn.

        The reply is encoded after the text the template writes before an answer (Phi-3's
        "<|assistant|>\n", whose newline the marker swallows with the reply's leading whitespace;
        Gemma's "model\n"; Mistral's " [/INST]"), as HF encodes the rendered conversation, and the
        tokens of that text dropped. A token spanning the seam (Mistral's "]," for a reply that
        starts with a comma) cannot be split: the reply's part of it is written as byte tokens, so
        the pair still decodes to the rendered text."""
        if self.template.trim_content:
            content = content.strip()
        if self.template.answer_prefix:
            content = content.lstrip("\n")
        # a one-message prompt: the text after its last special token ends with the fixed text
        # before an answer (the user's message in it shares no token with that text: a space or
        # special token comes between)
        prompt = [{"role": "user", "content": "?"}]
        pieces = self._template_pieces(chat_segments(self.template, prompt, add_generation_prompt=True))
        last = max((i for i, (_, special, _) in enumerate(pieces) if special), default=-1)
        before = pieces[last][0] if last >= 0 else None
        anchor = "".join(text for text, _, _ in pieces[last + 1 :])
        ids, mask, crossing = self._run_tokens([(anchor, False), (content, True)], before, self.template.end_of_turn)
        reply = [token for token, trained in zip(ids, mask) if trained]
        if crossing is not None:
            reply = self._byte_tokens(content[: crossing - len(anchor)]) + reply
        return reply + [self.eot_id]

    def _byte_tokens(self, text: str) -> list[int]:
        ids = [self._full.token_to_id(_BYTE_TOKEN.format(b)) for b in text.encode("utf-8")]
        if None in ids:
            raise ValueError(
                f"{self.path}: the reply's first characters {text!r} merge with the prompt's last one and "
                "the vocabulary has no byte tokens to write them on their own"
            )
        return ids


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def read_tokenizer_config(directory: Path) -> dict:
    """tokenizer_config.json of a folder ({} when absent)."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BackendError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(config, dict):
        raise BackendError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config
