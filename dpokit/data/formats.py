"""The on-disk shapes of preference data, each turned into one normalised record.

A normalised record is  {"prompt": [messages], "chosen": str, "rejected": str}  plus, when the
source has them, "chosen_reward" / "rejected_reward" (floats). The formats:

  "standard"      prompt / chosen / rejected; the prompt is a string (one user turn) or a message
                  list, a response a string or a one-assistant-message list (TRL, NeMo RL's
                  BinaryPreferenceDataset, conversational data with an explicit prompt).
  "nemo_aligner"  prompt / chosen_response / rejected_response.
  "nemo_rl"       context (message list) + completions: exactly two {rank, completion}; the
                  lower rank is preferred and a tie is an error. A completion is a string or a
                  one-assistant-message list.
  "hh_rlhf"       chosen / rejected are whole "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts;
                  the turns they share are the prompt, the last assistant turn the response.
  "conversational" chosen / rejected are whole message lists (OpenAI roles) with an implicit
                  prompt: the shared messages are the prompt, the last assistant message the response.
  "helpsteer3"    context (a string or message list) + response1 / response2 + overall_preference,
                  a number: negative means response1 is preferred, positive response2; 0 is a tie,
                  an error (NVIDIA HelpSteer3's preference subset rates -3 .. 3).

Every format but nemo_rl may carry "chosen_reward" / "rejected_reward" (finite, within float32;
both or neither; the RPO losses need them); a key one typo away from those is an error.

Key names are configurable: `keys={"prompt": "question", "chosen": "good", ...}` maps a canonical
field name to the one used in the file. Every error is one line naming file, line and field.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any, Callable, Mapping

from dpokit.data.tokenizer import ROLES, TOOL_CALL_FIELDS
from dpokit.errors import DpokitError

FORMATS = ("standard", "nemo_aligner", "nemo_rl", "hh_rlhf", "conversational", "helpsteer3")

# Canonical field name -> default key in the file.
DEFAULT_KEYS = {
    "prompt": "prompt",
    "chosen": "chosen",
    "rejected": "rejected",
    "chosen_response": "chosen_response",
    "rejected_response": "rejected_response",
    "chosen_reward": "chosen_reward",
    "rejected_reward": "rejected_reward",
    "context": "context",
    "completions": "completions",
    "rank": "rank",
    "completion": "completion",
    "response1": "response1",
    "response2": "response2",
    "overall_preference": "overall_preference",
}


class PreferenceDataError(DpokitError):
    """A malformed preference record; the message names file, line and field.

    `reason` is a short category ("empty response", "invalid JSON", ...) used to count skips.
    """

    def __init__(self, message: str, reason: str = "invalid record", **fix):
        super().__init__(message, **fix)
        self.reason = reason


def resolve_keys(keys: Mapping[str, str] | None) -> dict[str, str]:
    unknown = set(keys or {}) - set(DEFAULT_KEYS)
    if unknown:
        raise DpokitError(f"unknown preference field name(s) {sorted(unknown)} in keys; known: {sorted(DEFAULT_KEYS)}")
    return {**DEFAULT_KEYS, **(keys or {})}


def detect_format(record: Any, keys: Mapping[str, str] = DEFAULT_KEYS) -> str | None:
    """The format a record looks like, from its keys (None when it matches none)."""
    if not isinstance(record, dict):
        return None
    if keys["completions"] in record and keys["context"] in record:
        return "nemo_rl"
    if keys["overall_preference"] in record and keys["response1"] in record:
        return "helpsteer3"
    if keys["chosen_response"] in record:
        return "nemo_aligner"
    if keys["chosen"] in record:
        if keys["prompt"] in record:
            return "standard"
        return "conversational" if isinstance(record[keys["chosen"]], list) else "hh_rlhf"
    return None


# --- field helpers -------------------------------------------------------------------------------


def _field(record: dict, key: str, where: str) -> Any:
    if key not in record:
        raise PreferenceDataError(f"{where}: missing field {key!r}", "missing field")
    return record[key]


def _messages(value: Any, where: str) -> list[dict]:
    """A non-empty list of {"role", "content"} with known roles."""
    if not isinstance(value, list) or not value:
        raise PreferenceDataError(
            f"{where}: expected a non-empty list of messages, got {type(value).__name__}", "mistyped field"
        )
    out = []
    for i, message in enumerate(value):
        tool_field = next((f for f in TOOL_CALL_FIELDS if message.get(f)), None) if isinstance(message, dict) else None
        if tool_field:
            raise PreferenceDataError(
                f"{where}[{i}].{tool_field}: tool calls are not supported (the chat templates render text turns only)",
                "tool calls",
            )
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise PreferenceDataError(f"{where}[{i}]: expected {{'role': str, 'content': str}}", "mistyped field")
        if message.get("role") not in ROLES:
            raise PreferenceDataError(
                f"{where}[{i}].role: unknown role {message.get('role')!r} (expected one of {list(ROLES)})",
                "unknown role",
            )
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _prompt(value: Any, where: str) -> list[dict]:
    if isinstance(value, str):
        if not value:
            raise PreferenceDataError(f"{where}: empty prompt", "empty prompt")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise PreferenceDataError(
            f"{where}: expected a string or a list of messages, got {type(value).__name__}", "mistyped field"
        )
    return _messages(value, where)


def _response(value: Any, where: str) -> str:
    """A response: a string, or a list holding exactly one assistant message."""
    if isinstance(value, list):
        messages = _messages(value, where)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise PreferenceDataError(f"{where}: a response must be one assistant message", "mistyped field")
        value = messages[0]["content"]
    elif not isinstance(value, str):
        raise PreferenceDataError(
            f"{where}: expected a string or one assistant message, got {type(value).__name__}", "mistyped field"
        )
    if not value.strip():
        raise PreferenceDataError(f"{where}: empty response", "empty response")
    return value


FLOAT32_MAX = 3.4028234663852886e38  # rewards become float32 tensors


def _reward(record: dict, key: str, where: str) -> float | None:
    if key not in record or record[key] is None:
        return None
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PreferenceDataError(f"{where}: field {key!r}: expected a finite number, got {value!r}", "mistyped field")
    if abs(value) > FLOAT32_MAX:
        raise PreferenceDataError(
            f"{where}: field {key!r}: {value!r} does not fit in float32 (largest {FLOAT32_MAX:.4g})", "reward overflow"
        )
    return float(value)


def _rewards(record: dict, where: str, keys: Mapping[str, str]) -> dict:
    """The pair's ground-truth rewards, when the record has them (any pairwise format). A key
    one typo away from a reward key is an error, not an ignored field: a reward-aware loss would
    otherwise train on its defaults."""
    reward_keys = (keys["chosen_reward"], keys["rejected_reward"])
    known = set(keys.values())
    for key in record:
        if isinstance(key, str) and key not in known:
            close = difflib.get_close_matches(key, reward_keys, n=1, cutoff=0.8)
            if close:
                raise PreferenceDataError(
                    f"{where}: field {key!r} is not one dpokit reads; did you mean {close[0]!r}? "
                    f"(rename it, or name it in the dataset's keys)",
                    "misspelled reward",
                )
    chosen, rejected = (_reward(record, key, where) for key in reward_keys)
    if (chosen is None) != (rejected is None):
        missing = reward_keys[1] if rejected is None else reward_keys[0]
        raise PreferenceDataError(f"{where}: missing field {missing!r} (rewards come in pairs)", "missing field")
    return {} if chosen is None else {"chosen_reward": chosen, "rejected_reward": rejected}


def _finish(prompt: list[dict], chosen: str, rejected: str, where: str, rejected_key: str, chosen_key: str) -> dict:
    if chosen == rejected:
        raise PreferenceDataError(f"{where}: field {rejected_key!r}: identical to {chosen_key!r}", "chosen == rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _split_shared(chosen: list[dict], rejected: list[dict], where: str, keys: Mapping[str, str]) -> tuple:
    """Implicit prompt: the messages both share are the prompt; each side must then hold exactly
    one more message, an assistant one (its response)."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        rest = messages[shared:]
        if len(rest) != 1 or rest[0]["role"] != "assistant":
            raise PreferenceDataError(
                f"{where}: field {keys[side]!r}: after the {shared} shared message(s) expected exactly one "
                f"assistant message, got {len(rest)} message(s)",
                "no single final assistant turn",
            )
    if shared == 0:
        raise PreferenceDataError(f"{where}: field {keys['chosen']!r}: no shared prompt turns", "no shared prompt")
    return chosen[:shared], chosen[shared]["content"], rejected[shared]["content"]


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def split_hh_transcript(text: str, where: str) -> list[dict]:
    """ "\\n\\nHuman: a\\n\\nAssistant: b" -> [{"role": "user", "content": "a"}, {"role": "assistant", ...}]."""
    pieces = _HH_TURN.split(text)
    if pieces[0].strip():
        raise PreferenceDataError(f"{where}: text before the first '\\n\\nHuman:' turn", "bad transcript")
    if len(pieces) < 3:
        raise PreferenceDataError(f"{where}: no '\\n\\nHuman:' / '\\n\\nAssistant:' turns", "bad transcript")
    return [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in zip(pieces[1::2], pieces[2::2])]


# --- one parser per format -----------------------------------------------------------------------


def parse_standard(record: dict, where: str, keys: Mapping[str, str]) -> dict:
    prompt = _prompt(_field(record, keys["prompt"], where), f"{where}: field {keys['prompt']!r}")
    chosen = _response(_field(record, keys["chosen"], where), f"{where}: field {keys['chosen']!r}")
    rejected = _response(_field(record, keys["rejected"], where), f"{where}: field {keys['rejected']!r}")
    return _finish(prompt, chosen, rejected, where, keys["rejected"], keys["chosen"])


def parse_nemo_aligner(record: dict, where: str, keys: Mapping[str, str]) -> dict:
    prompt = _prompt(_field(record, keys["prompt"], where), f"{where}: field {keys['prompt']!r}")
    chosen_key, rejected_key = keys["chosen_response"], keys["rejected_response"]
    chosen = _response(_field(record, chosen_key, where), f"{where}: field {chosen_key!r}")
    rejected = _response(_field(record, rejected_key, where), f"{where}: field {rejected_key!r}")
    return _finish(prompt, chosen, rejected, where, rejected_key, chosen_key)


def parse_nemo_rl(record: dict, where: str, keys: Mapping[str, str]) -> dict:
    context_key, completions_key, rank_key = keys["context"], keys["completions"], keys["rank"]
    prompt = _prompt(_field(record, context_key, where), f"{where}: field {context_key!r}")
    completions = _field(record, completions_key, where)
    if not isinstance(completions, list) or len(completions) != 2:
        got = f"{len(completions)} items" if isinstance(completions, list) else type(completions).__name__
        raise PreferenceDataError(
            f"{where}: field {completions_key!r}: expected exactly two completions, got {got}", "mistyped field"
        )
    ranked = []
    for i, item in enumerate(completions):
        field_where = f"{where}: field '{completions_key}[{i}]'"
        if not isinstance(item, dict):
            raise PreferenceDataError(f"{field_where}: expected an object, got {type(item).__name__}", "mistyped field")
        rank = _field(item, rank_key, field_where)
        if isinstance(rank, bool) or not isinstance(rank, (int, float)):
            raise PreferenceDataError(f"{field_where}.{rank_key}: expected a number, got {rank!r}", "mistyped field")
        response = _response(_field(item, keys["completion"], field_where), f"{field_where}.{keys['completion']}")
        ranked.append((rank, response))
    if ranked[0][0] == ranked[1][0]:
        raise PreferenceDataError(
            f"{where}: field {completions_key!r}: both completions have rank {ranked[0][0]} (a tie)", "tied ranks"
        )
    (_, chosen), (_, rejected) = sorted(ranked, key=lambda r: r[0])
    return _finish(prompt, chosen, rejected, where, f"{completions_key}[1]", f"{completions_key}[0]")


def parse_hh_rlhf(record: dict, where: str, keys: Mapping[str, str]) -> dict:
    sides = []
    for side in ("chosen", "rejected"):
        value = _field(record, keys[side], where)
        if not isinstance(value, str):
            raise PreferenceDataError(
                f"{where}: field {keys[side]!r}: expected a transcript string, got {type(value).__name__}",
                "mistyped field",
            )
        sides.append(split_hh_transcript(value, f"{where}: field {keys[side]!r}"))
    prompt, chosen, rejected = _split_shared(*sides, where, keys)
    chosen = _response(chosen, f"{where}: field {keys['chosen']!r}")
    rejected = _response(rejected, f"{where}: field {keys['rejected']!r}")
    return _finish(prompt, chosen, rejected, where, keys["rejected"], keys["chosen"])


def parse_conversational(record: dict, where: str, keys: Mapping[str, str]) -> dict:
    sides = [_messages(_field(record, keys[s], where), f"{where}: field {keys[s]!r}") for s in ("chosen", "rejected")]
    prompt, chosen, rejected = _split_shared(*sides, where, keys)
    chosen = _response(chosen, f"{where}: field {keys['chosen']!r}")
    rejected = _response(rejected, f"{where}: field {keys['rejected']!r}")
    return _finish(prompt, chosen, rejected, where, keys["rejected"], keys["chosen"])


def parse_helpsteer3(record: dict, where: str, keys: Mapping[str, str]) -> dict:
    context_key, preference_key = keys["context"], keys["overall_preference"]
    first_key, second_key = keys["response1"], keys["response2"]
    prompt = _prompt(_field(record, context_key, where), f"{where}: field {context_key!r}")
    first = _response(_field(record, first_key, where), f"{where}: field {first_key!r}")
    second = _response(_field(record, second_key, where), f"{where}: field {second_key!r}")
    preference = _field(record, preference_key, where)
    if isinstance(preference, bool) or not isinstance(preference, (int, float)) or not math.isfinite(preference):
        raise PreferenceDataError(
            f"{where}: field {preference_key!r}: expected a number (negative: {first_key!r} is better, "
            f"positive: {second_key!r}), got {preference!r}",
            "mistyped field",
        )
    if preference == 0:
        raise PreferenceDataError(
            f"{where}: field {preference_key!r}: 0, a tie (neither response is preferred)", "tied preference"
        )
    if preference < 0:
        return _finish(prompt, first, second, where, second_key, first_key)
    return _finish(prompt, second, first, where, first_key, second_key)


PARSERS: dict[str, Callable[[dict, str, Mapping[str, str]], dict]] = {
    "standard": parse_standard,
    "nemo_aligner": parse_nemo_aligner,
    "nemo_rl": parse_nemo_rl,
    "hh_rlhf": parse_hh_rlhf,
    "conversational": parse_conversational,
    "helpsteer3": parse_helpsteer3,
}


def parse_record(record: Any, where: str, format: str, keys: Mapping[str, str] = DEFAULT_KEYS) -> dict:
    """Validate one decoded record of `format` -> a normalised record (see the module docstring)."""
    if format not in PARSERS:
        raise DpokitError(f"unknown preference data format {format!r}; choose from {list(FORMATS)} or 'auto'")
    if not isinstance(record, dict):
        raise PreferenceDataError(f"{where}: expected a JSON object, got {type(record).__name__}", "mistyped field")
    parsed = PARSERS[format](record, where, keys)
    return {**parsed, **_rewards(record, where, keys)} if format != "nemo_rl" else parsed
