"""Tokenizers on tiktoken, with chat templates that also say which tokens are trained on.

A `Tokenizer` = a tiktoken `Encoding` (ordinary text) + a `ChatTemplate` that lays out messages with
special tokens. Only assistant content and its end-of-turn token are trained on. Files tiktoken
cannot reproduce run on HF `tokenizers` behind the same interface (`dpokit.data.hf_backend`); the
layout (`chat_segments`) and the masking are shared.
Tool calls are not rendered by any template here: messages that carry them are refused.

Special-token text typed inside a message (a user writing "<|im_end|>") is encoded as plain text,
never as the control token: the template alone decides where turns begin and end, so data cannot
forge a turn boundary. (HF `tokenizers` maps such text to the special id; `dpokit validate` and the
datasets count and name the records where this happens, see `Tokenizer.special_token_text`.)

Vocabularies that lack some byte tokens (SmolLM2 and Pythia have no token for some control bytes
and for bytes that never occur in UTF-8) encode as HF `tokenizers` does: such a byte is dropped and
the bytes around it are merged as if it were not there. `Tokenizer.dropped_bytes` says how many.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, replace
from typing import Sequence

import regex
import tiktoken

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
ROLES = ("system", "user", "assistant")
# Message fields of tool-calling conversations (OpenAI / HF chat format). The families' Jinja
# templates render these in their own ways; ours render text turns only, so they are refused.
TOOL_CALL_FIELDS = ("tool_calls", "function_call", "tool_call_id")


@dataclass(frozen=True)
class ChatTemplate:
    """How a message list becomes text around special tokens.

    A message renders as  header(role) + content + end_of_turn + trailer,  where header may contain
    special tokens written as "<|name|>" inside `header_format` (filled with {role}).

    System turn: with `system_preamble` set, every conversation opens with a system turn whose
    content is the preamble followed by the (trimmed) system message, or the preamble alone when
    there is none (Llama 3.1 / 3.2). Otherwise `default_system_prompt`, when set, is the system
    message of conversations that have none (Qwen2.5, SmolLM2).
    """

    name: str
    begin: str  # once, before the first message ("" for none)
    header_format: str
    end_of_turn: str  # a special token, trained on for assistant messages
    trailer: str = ""  # untrained text after end_of_turn (chatml's newline)
    default_system_prompt: str | None = None
    trim_content: bool = False  # strip surrounding whitespace of each message (Llama 3's `| trim`)
    system_preamble: str | None = None  # text that opens an always-present system turn (Llama 3.1+)
    # Text that opens the answer: the final assistant turn (whose leading newlines are dropped) and
    # the generation prompt. Qwen3's empty think block, its non-thinking mode (enable_thinking=False).
    answer_prefix: str = ""
    # What a turn's header calls a role ((role, name) pairs: Gemma's assistant is "model").
    role_names: tuple[tuple[str, str], ...] = ()
    # Headers that do not follow header_format ((role, header) pairs: Mistral's "[INST] ").
    role_headers: tuple[tuple[str, str], ...] = ()
    # Plain text that closes a non-assistant turn instead of end_of_turn + trailer ((role, text)
    # pairs: Mistral's " [/INST]").
    turn_ends: tuple[tuple[str, str], ...] = ()
    # The system message: "turn" (a turn of its own), "refuse" (the family's template raises on it:
    # Mistral v0.2, Gemma 2) or "fold" (prepended to the first user message with fold_separator:
    # Gemma 3).
    system_role: str = "turn"
    fold_separator: str = "\n\n"
    alternate: bool = False  # user / assistant / user / ... from the first turn, else refused
    closing: str = ""  # after the last turn when there is no generation prompt (Phi-3's eos)

    def header(self, role: str) -> str:
        """The text that opens a `role` turn."""
        headers = dict(self.role_headers)
        if role in headers:
            return headers[role]
        return self.header_format.format(role=dict(self.role_names).get(role, role))

    def turn_end(self, role: str) -> str | None:
        """The plain text closing a `role` turn, or None for end_of_turn + trailer."""
        return None if role == "assistant" else dict(self.turn_ends).get(role)


LLAMA3_TEMPLATE = ChatTemplate(
    name="llama3",
    begin="<|begin_of_text|>",
    header_format="<|start_header_id|>{role}<|end_header_id|>\n\n",
    end_of_turn="<|eot_id|>",
    trim_content=True,
)

CHATML_TEMPLATE = ChatTemplate(
    name="chatml",
    begin="",
    header_format="<|im_start|>{role}\n",
    end_of_turn="<|im_end|>",
    trailer="\n",
)

# The chatml families differ only in the system prompt their own Jinja template inserts when the
# conversation has none.
QWEN2_5_TEMPLATE = replace(
    CHATML_TEMPLATE,
    name="qwen2_5",
    default_system_prompt="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
)
SMOLLM2_TEMPLATE = replace(
    CHATML_TEMPLATE,
    name="smollm2",
    default_system_prompt="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
)
# Qwen3 in non-thinking mode: chatml, no default system prompt, the answer opened by an empty think
# block (as its template renders the last assistant turn, and the generation prompt with
# enable_thinking=False). Reasoning in earlier assistant turns is refused (`chat_turns`).
QWEN3_TEMPLATE = replace(CHATML_TEMPLATE, name="qwen3", answer_prefix="<think>\n\n</think>\n\n")

# Mistral-7B-Instruct v0.2's template: "[INST] user [/INST]answer</s>", no system role (its
# template raises on one, so a system message is refused), user and assistant alternating.
MISTRAL_TEMPLATE = ChatTemplate(
    name="mistral",
    begin="<s>",
    header_format="",
    end_of_turn="</s>",
    role_headers=(("user", "[INST] "),),
    turn_ends=(("user", " [/INST]"),),
    system_role="refuse",
    alternate=True,
)
# Phi-3 (mini / small / medium Instruct): "<|role|>\n" turns closed by "<|end|>\n", and the eos
# token after a conversation that does not end with a generation prompt.
PHI3_TEMPLATE = ChatTemplate(
    name="phi3",
    begin="",
    header_format="<|{role}|>\n",
    end_of_turn="<|end|>",
    trailer="\n",
    closing="<|endoftext|>",
)
# Phi-4: chatml markers with <|im_sep|> after the role and nothing between turns.
PHI4_TEMPLATE = ChatTemplate(
    name="phi4", begin="", header_format="<|im_start|>{role}<|im_sep|>", end_of_turn="<|im_end|>"
)
# Gemma 2 Instruct: "<start_of_turn>user\n" / "<start_of_turn>model\n" turns of trimmed content,
# no system role (its template raises on one), user and model alternating.
GEMMA_TEMPLATE = ChatTemplate(
    name="gemma",
    begin="<bos>",
    header_format="<start_of_turn>{role}\n",
    end_of_turn="<end_of_turn>",
    trailer="\n",
    trim_content=True,
    role_names=(("assistant", "model"),),
    system_role="refuse",
    alternate=True,
)
# Gemma 3 Instruct: as Gemma 2, with a first system message folded into the first user turn
# (system text + "\n\n" + the trimmed user text; the system text itself is not trimmed).
GEMMA3_TEMPLATE = replace(GEMMA_TEMPLATE, name="gemma3", system_role="fold")

LLAMA3_DEFAULT_DATE = "26 Jul 2024"


def llama3_1_template(date_string: str = LLAMA3_DEFAULT_DATE) -> ChatTemplate:
    """Llama 3.1 Instruct's template (also used by Llama 3.3) for system / user / assistant turns.

    Every conversation opens with a system turn "Cutting Knowledge Date: December 2023\\nToday Date:
    <date_string>\\n\\n" + the trimmed system message (if any); then turns as in Llama 3.
    `date_string` is the value Meta's Jinja template takes as the `date_string` variable. It is
    fixed ("26 Jul 2024", 3.1's own default) rather than today's date so that tokenized training
    data does not depend on the day it was tokenized (a reference cache or a packed file made
    yesterday must still match). Tool calls are not rendered: messages with them are refused.
    """
    return replace(
        LLAMA3_TEMPLATE,
        name="llama3_1",
        system_preamble=f"Cutting Knowledge Date: December 2023\nToday Date: {date_string}\n\n",
    )


def llama3_2_template(date_string: str = LLAMA3_DEFAULT_DATE) -> ChatTemplate:
    """Llama 3.2 Instruct's (1B / 3B) template: for system / user / assistant turns it renders
    exactly as Llama 3.1's (see `llama3_1_template`). The difference is the date: Meta's 3.2
    template puts *today's* date (`strftime_now`) in the system turn unless `date_string` is given;
    dpokit always passes an explicit one, "26 Jul 2024" by default, so that tokenization is
    deterministic and training data does not depend on the day it was tokenized.
    """
    return replace(llama3_1_template(date_string), name="llama3_2")


TEMPLATES = {
    t.name: t
    for t in (
        LLAMA3_TEMPLATE,
        llama3_1_template(),
        llama3_2_template(),
        CHATML_TEMPLATE,
        QWEN2_5_TEMPLATE,
        SMOLLM2_TEMPLATE,
        QWEN3_TEMPLATE,
        MISTRAL_TEMPLATE,
        PHI3_TEMPLATE,
        PHI4_TEMPLATE,
        GEMMA_TEMPLATE,
        GEMMA3_TEMPLATE,
    )
}


class Tokenizer:
    """tiktoken `Encoding` + chat template.

    text_tokens: added tokens that are matched inside ordinary text (HF "added, non-special"
    tokens), longest first at the leftmost position as HF does; normalizer: "NFC" for tokenizers
    whose tokenizer.json normalises (Qwen2); missing_bytes: byte values the vocabulary has no
    token for (dropped from the text, as HF `tokenizers` drops them).
    """

    def __init__(
        self,
        encoding: tiktoken.Encoding,
        template: ChatTemplate,
        *,
        pad_token: str | None = None,
        text_tokens: frozenset[str] = frozenset(),
        normalizer: str | None = None,
        missing_bytes: frozenset[int] = frozenset(),
    ):
        self.encoding = encoding
        self.template = template
        self.text_tokens = frozenset(text_tokens)
        self.normalizer = normalizer
        self.missing_bytes = frozenset(missing_bytes)
        self.special_tokens = dict(encoding._special_tokens)
        for token in template_markers(template):
            if token not in self.special_tokens:
                raise ValueError(f"chat template {template.name!r} needs special token {token!r}")
        self.eot_id = self.special_tokens[template.end_of_turn]
        self.pad_id = self.special_tokens[pad_token] if pad_token else self.eot_id
        # Leftmost-longest matching of the text tokens (a regex alternation takes the first
        # alternative that matches, so longer tokens go first).
        by_length = sorted(self.text_tokens, key=lambda t: (-len(t), t))
        self._text_token_re = re.compile("|".join(map(re.escape, by_length))) if by_length else None
        self._missing = bytes(sorted(self.missing_bytes))
        self._pieces_re = regex.compile(encoding._pat_str) if self.missing_bytes else None
        specials = sorted(self.special_tokens, key=lambda t: (-len(t), t))
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None

    backend = "tiktoken"

    @property
    def name(self) -> str:
        """The vocabulary's name (the folder the tokenizer file came from)."""
        return self.encoding.name

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, backend={self.backend!r}, template={self.template.name!r})"

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ordinary text -> ids. "<|eot_id|>" typed by a user stays text, not a control token.
        add_special_tokens: accepted for the `tokenizers` backend's sake; tiktoken files add none."""
        if self.normalizer:
            text = unicodedata.normalize(self.normalizer, text)
        if self._text_token_re is None:
            return self._encode_ordinary(text)
        ids, start = [], 0
        for match in self._text_token_re.finditer(text):
            ids += self._encode_ordinary(text[start : match.start()])
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        return ids + self._encode_ordinary(text[start:])

    def _encode_ordinary(self, text: str) -> list[int]:
        if not self._missing or self._count_missing(text) == 0:
            return self.encoding.encode_ordinary(text)
        # Rare slow path: split into pieces with the pre-tokenizer regex on the text as written,
        # drop the bytes that have no token, and merge what is left of each piece.
        ids = []
        for piece in self._pieces_re.findall(text):
            data = piece.encode("utf-8").translate(None, self._missing)
            if data:
                ids += self.encoding._encode_single_piece(data)
        return ids

    def _count_missing(self, text: str) -> int:
        data = text.encode("utf-8")
        return len(data) - len(data.translate(None, self._missing))

    def dropped_bytes(self, text: str) -> int:
        """How many UTF-8 bytes of `text` have no token in the vocabulary (and are dropped)."""
        if not self._missing:
            return 0
        if self.normalizer:
            text = unicodedata.normalize(self.normalizer, text)
        return self._count_missing(text)

    def special_token_text(self, text: str) -> str | None:
        """The first special-token string written inside `text` (encoded as plain text), or None."""
        if self._special_re is None:
            return None
        for match in self._special_re.finditer(text):
            if match.group() not in self.text_tokens:
                return match.group()
        return None

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids))

    def _template_pieces(self, segments: Sequence[Segment]) -> list[tuple[str, bool, bool]]:
        """(text, is_special_token, trained) pieces: template text split at its special tokens."""
        pieces = []
        for segment in segments:
            if segment.content or self._special_re is None:
                pieces.append((segment.text, False, segment.trained))
                continue
            start = 0
            for match in self._special_re.finditer(segment.text):
                if match.group() in self.text_tokens:  # matched inside text by `encode`
                    continue
                if match.start() > start:
                    pieces.append((segment.text[start : match.start()], False, segment.trained))
                pieces.append((match.group(), True, segment.trained))
                start = match.end()
            if start < len(segment.text):
                pieces.append((segment.text[start:], False, segment.trained))
        return pieces

    def _encode_run(
        self, parts: Sequence[tuple[str, bool]], before: str | None, after: str | None
    ) -> tuple[list[int], list[bool]]:
        """The text between two special tokens (`before` / `after`, None at the ends), given as
        (text, trained) parts, encoded as one text as HF encodes the rendered conversation
        ("user\n" + "  hi" splits differently from the two apart). A token is trained when it
        starts inside a trained part (one spanning the seam from untrained text is not)."""
        text = "".join(t for t, _ in parts)
        ids = self.encode(text)
        norm = (lambda t: unicodedata.normalize(self.normalizer, t)) if self.normalizer else (lambda t: t)
        bounds, offset = [], 0
        for part, trained in parts:
            offset += len(part)
            bounds.append((len(norm(text[:offset]).encode("utf-8")), trained))
        mask, position, k = [], 0, 0
        for token in ids:
            while k < len(bounds) - 1 and position >= bounds[k][0]:
                k += 1
            mask.append(bounds[k][1])
            position += len(self.encoding.decode_single_token_bytes(token))
        return ids, mask

    def _encode_segments(self, segments: Sequence[Segment]) -> tuple[list[int], list[bool]]:
        pieces = self._template_pieces(segments)
        ids, mask, run, before = [], [], [], None

        def flush(after: str | None) -> None:
            if run:
                run_ids, run_mask = self._encode_run(run, before, after)
                ids.extend(run_ids)
                mask.extend(run_mask)
                run.clear()

        for text, special, trained in pieces:
            if special:
                flush(text)
                ids.append(self.special_tokens[text])
                mask.append(trained)
                before = text
            else:
                run.append((text, trained))
        flush(None)
        return ids, mask

    def tokenize_messages(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """messages -> (ids, trained_mask): True only for assistant content + its end-of-turn.

        Text between two special tokens is encoded as one piece, as HF tokenizes the rendered
        template (a header's trailing newline and the content that follows share tokens)."""
        return self._encode_segments(chat_segments(self.template, messages, add_generation_prompt))

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        """The prompt of a preference pair, ending with the assistant header."""
        ids, _ = self.tokenize_messages(messages, add_generation_prompt=True)
        return ids

    def encode_response(self, content: str) -> list[int]:
        """One assistant reply as it follows `encode_prompt`: content + end-of-turn (all trained)."""
        if self.template.trim_content:
            content = content.strip()
        if self.template.answer_prefix:
            content = content.lstrip("\n")
        return self.encode(content) + [self.eot_id]


# Special-token spellings: "<|name|>", "<name>", "</name>" (Mistral's "[INST]" is plain text).
MARKER_RE = re.compile(r"</?\|?[A-Za-z_][A-Za-z0-9_]*\|?>")


def template_markers(template: ChatTemplate) -> list[str]:
    """The special tokens a template writes around turns (its begin, headers, end of turn and
    closing): a tokenizer must have each of them as a special token."""
    texts = [template.begin, template.end_of_turn, template.closing]
    texts += [template.header(role) for role in ROLES] + [t for _, t in template.turn_ends]
    found = []
    for text in texts:
        found += [m for m in MARKER_RE.findall(text) if m not in found]
    if template.end_of_turn and template.end_of_turn not in found:
        found.append(template.end_of_turn)
    return found


def answer(template: ChatTemplate, header_text: str, content: str) -> tuple[str, str]:
    """The final assistant turn's (header text, content): the answer prefix joins the header (it is
    not trained on), and the content loses its leading newlines when there is a prefix."""
    if not template.answer_prefix:
        return header_text, content
    return header_text + template.answer_prefix, content.lstrip("\n")


def chat_turns(template: ChatTemplate, messages: Sequence[Message]) -> list[tuple[str, str]]:
    """(role, content) of every turn `template` renders, system turn rules applied."""
    turns = []
    for i, message in enumerate(messages):
        role = message["role"]
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; expected one of {ROLES}")
        # A null / empty field (OpenAI exports write "tool_calls": null) carries no call.
        tool_field = next((field for field in TOOL_CALL_FIELDS if message.get(field)), None)
        if tool_field:
            raise ValueError(
                f"message {i}: has {tool_field!r}; chat template {template.name!r} renders "
                "text turns only (tool calls are not supported)"
            )
        content = message["content"]
        if template.answer_prefix and role == "assistant" and "</think>" in content:
            raise ValueError(
                f"message {i}: an assistant turn with reasoning (</think>); chat template {template.name!r} "
                "renders non-thinking conversations only"
            )
        turns.append((role, content.strip() if template.trim_content else content))
    has_system = bool(turns) and turns[0][0] == "system"
    if template.system_role == "refuse":
        where = next((i for i, (role, _) in enumerate(turns) if role == "system"), None)
        if where is not None:
            raise ValueError(
                f"message {where}: chat template {template.name!r} has no system role (the family's "
                "published template refuses one); put the instructions in the first user message"
            )
    elif template.system_role == "fold" and has_system:
        system = messages[0]["content"]  # untrimmed: Gemma 3 prepends it as written
        turns.pop(0)
        if not turns:  # the published template would drop it silently
            raise ValueError(
                f"message 0: chat template {template.name!r} folds the system message into the first "
                "user message, and there is none"
            )
        if turns[0][0] == "user":
            turns[0] = ("user", system + template.fold_separator + turns[0][1])
    if template.alternate:
        first = 1 if has_system and template.system_role == "fold" else 0
        for i, (role, _) in enumerate(turns):
            if role != ("user" if i % 2 == 0 else "assistant"):
                raise ValueError(
                    f"message {i + first}: role {role!r}: chat template {template.name!r} needs roles that "
                    "alternate user / assistant / user / ... (the family's published template refuses others)"
                )
    if template.system_preamble is not None:
        system = turns.pop(0)[1] if has_system else ""
        turns.insert(0, ("system", template.system_preamble + system))
    elif template.default_system_prompt is not None and not has_system:
        turns.insert(0, ("system", template.default_system_prompt))
    return turns


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation: template text (which may hold special tokens) or message
    content (never read as special tokens); trained marks assistant content and its end-of-turn."""

    text: str
    content: bool = False
    trained: bool = False


def chat_segments(template: ChatTemplate, messages: Sequence[Message], add_generation_prompt: bool) -> list[Segment]:
    """The conversation as `template` lays it out, in order (joined, the text HF's template renders)."""
    segments = []

    def add(text: str, content: bool = False, trained: bool = False) -> None:
        if text:
            segments.append(Segment(text, content, trained))

    add(template.begin)
    turns = chat_turns(template, messages)
    for i, (role, content) in enumerate(turns):
        header, assistant = template.header(role), role == "assistant"
        if assistant and i == len(turns) - 1:
            header, content = answer(template, header, content)
        add(header)
        add(content, content=True, trained=assistant)
        end = template.turn_end(role)
        if end is None:
            add(template.end_of_turn, trained=assistant)
            add(template.trailer)
        else:
            add(end)
    if add_generation_prompt:
        add(template.header("assistant") + template.answer_prefix)
    else:
        add(template.closing)
    return segments


BYTE_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
)
BYTE_VOCAB_SIZE = 272  # 256 bytes + 16 special slots (the rest reserved)


def byte_tokenizer(template: ChatTemplate = LLAMA3_TEMPLATE) -> Tokenizer:
    """A byte-level tokenizer built in code: one token per UTF-8 byte, no merges, no file.

    Ids 0..255 are bytes, 256.. special tokens (llama3 and chatml markers, then the markers of
    `template` that are not among them, then reserved slots).
    """
    ranks = {bytes([i]): i for i in range(256)}
    names = list(BYTE_SPECIAL_TOKENS)
    names += [m for m in template_markers(template) if m not in names]
    names += [f"<|reserved_special_token_{i}|>" for i in range(BYTE_VOCAB_SIZE - 256 - len(names))]
    specials = {name: 256 + i for i, name in enumerate(names)}
    # Pre-tokenisation only splits text into pieces before BPE; with no merges any split is exact.
    encoding = tiktoken.Encoding(
        name="dpokit_bytes", pat_str=r"\s*\S+|\s+", mergeable_ranks=ranks, special_tokens=specials
    )
    return Tokenizer(encoding, template, pad_token="<|end_of_text|>")
