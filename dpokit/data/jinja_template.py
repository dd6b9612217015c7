"""Which built-in `ChatTemplate` renders exactly as a checkpoint's own Jinja chat template.

A checkpoint folder carries its chat template as Jinja (`tokenizer_config.json`'s `chat_template`,
or `chat_template.jinja`). Guessing the family from a phrase in it is not enough: SmolLM3's
template mentions SmolLM too but lays out the system turn differently. So the folder's template
is rendered the way transformers' `apply_chat_template` renders it (sandboxed Jinja, trim_blocks,
lstrip_blocks, `raise_exception`, `strftime_now`) on a few probe conversations, and a built-in
template is used only if it produces the same text for every probe.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Sequence

from dpokit.data.tokenizer import LLAMA3_DEFAULT_DATE, ChatTemplate, chat_segments
from dpokit.errors import DpokitError

# Conversations that tell the templates apart: system turn or not, several turns, content with
# surrounding whitespace (Llama 3 trims it, chatml keeps it).
PROBES = (
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": " And 3+3? "},
        {"role": "assistant", "content": " 6\n"},
    ],
    # the same without a system message: what templates with no system role (Mistral, Gemma 2) render
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": " And 3+3? "},
        {"role": "assistant", "content": " 6\n"},
    ],
)


def read_jinja_template(checkpoint_dir: str | Path) -> tuple[str, dict, Path] | None:
    """(template text, tokenizer_config, where it was read) of a folder, or None if it has none."""
    directory = Path(checkpoint_dir)
    config_path = directory / "tokenizer_config.json"
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise DpokitError(f"{config_path}: line {e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(config, dict):
            raise DpokitError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    text = config.get("chat_template") or ""
    if isinstance(text, list):  # several named templates: the default one
        text = next((t["template"] for t in text if t.get("name") == "default"), "")
    if text:
        return text, config, config_path
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(), config, jinja
    return None


def _token_text(value) -> str:
    return value.get("content", "") if isinstance(value, dict) else (value or "")


def render_probes(template_text: str, config: dict) -> list[tuple[list[dict], bool, str]]:
    """(messages, add_generation_prompt, text) for every probe, rendered as transformers renders
    the template, with the template's date fixed to dpokit's default. A probe the template refuses
    with `raise_exception` (e.g. a system message where it has no system role) has text None;
    other template errors raise."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Refused(TemplateError):
        pass

    def raise_exception(message):
        raise Refused(message)

    def strftime_now(fmt):
        return datetime.strptime(LLAMA3_DEFAULT_DATE, "%d %b %Y").strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii
    )
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    render = _renderer(env.from_string(template_text), config)
    rendered = []
    for messages in PROBES:
        for generation_prompt in (False, True):
            probe = messages[:-1] if generation_prompt else messages
            try:
                text = render(probe, generation_prompt)
            except Refused:
                text = None
            rendered.append((probe, generation_prompt, text))
    return rendered


def _renderer(compiled, config: dict):
    def render(probe, generation_prompt):
        return compiled.render(
            messages=list(probe),
            add_generation_prompt=generation_prompt,
            tools=None,
            documents=None,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
            date_string=LLAMA3_DEFAULT_DATE,
            enable_thinking=False,  # DPO pairs are answers, not reasoning traces (Qwen3, SmolLM3)
        )

    return render


def render_ours(template: ChatTemplate, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    """The text a built-in template lays out (what `Tokenizer.tokenize_messages` tokenizes)."""
    return "".join(segment.text for segment in chat_segments(template, messages, add_generation_prompt))


def first_difference(rendered: list[tuple[list[dict], bool, str | None]], template: ChatTemplate) -> str | None:
    """None if `template` lays out every probe as `render_probes` rendered it (and refuses the
    probes the folder's template refuses), else where they differ."""
    for probe, generation_prompt, theirs in rendered:
        try:
            ours = render_ours(template, probe, generation_prompt)
        except ValueError as error:
            ours, refusal = None, str(error)
        if theirs is None or ours is None:
            if theirs is None and ours is None:
                continue
            if theirs is None:
                return f"the folder's template refuses a conversation that {template.name} renders ({probe[0]['role']} first)"
            return f"{template.name} refuses a conversation the folder's template renders ({refusal})"
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            return f"at character {at}: {theirs[at : at + 40]!r} (folder) vs {ours[at : at + 40]!r} ({template.name})"
    return None


def match_template(
    template_text: str, config: dict, templates: Sequence[ChatTemplate]
) -> tuple[ChatTemplate | None, str]:
    """(the first of `templates` that lays out every probe as the Jinja template renders it, or
    None; where the first of `templates` differs, "" when it matches)."""
    try:
        rendered = render_probes(template_text, config)
    except Exception as error:  # any Jinja or template error: no built-in template can be shown equal
        return None, f"the folder's template fails on a probe conversation ({type(error).__name__}: {error})"
    first = None
    for template in templates:
        difference = first_difference(rendered, template)
        if difference is None:
            return template, first or ""
        first = first or difference
    return None, first or ""
