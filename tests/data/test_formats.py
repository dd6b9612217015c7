"""Preference file formats: each parses its example into the same normalised record, auto-detection
and overrides, renamed keys, JSON arrays / gzip / Parquet, and one specific one-line error per
malformed case (or a counted skip)."""

import gzip
import json
from pathlib import Path

import pytest

from dpokit.data import (
    DatasetStats,
    PreferenceDataError,
    PreferenceDataset,
    byte_tokenizer,
    check_enough_pairs,
    collate_preference_pairs,
    detect_format,
    load_preference_records,
)
from dpokit.errors import DpokitError

HH_PATH = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "hh_rlhf_harmless_base_test.jsonl.gz"

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
EXPECTED = {"prompt": PROMPT, "chosen": "4", "rejected": "5"}

EXAMPLES = {
    "standard": {"prompt": PROMPT, "chosen": "4", "rejected": "5"},
    "nemo_aligner": {"prompt": PROMPT, "chosen_response": "4", "rejected_response": "5"},
    "nemo_rl": {
        "context": PROMPT,
        "completions": [
            {"rank": 1, "completion": "5"},
            {"rank": 0, "completion": [{"role": "assistant", "content": "4"}]},
        ],
    },
    "conversational": {
        "chosen": PROMPT + [{"role": "assistant", "content": "4"}],
        "rejected": PROMPT + [{"role": "assistant", "content": "5"}],
    },
}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", sorted(EXAMPLES))
def test_each_format_parses_its_example_auto_detected_and_forced(tmp_path, fmt):
    path = write_jsonl(tmp_path / "d.jsonl", [EXAMPLES[fmt]])
    assert detect_format(EXAMPLES[fmt]) == fmt
    for forced in ("auto", fmt):
        stats = DatasetStats()
        assert load_preference_records(path, format=forced, stats=stats) == [EXPECTED]
        assert stats.format == fmt


def test_hh_rlhf_transcripts_split_into_turns_with_shared_prompt(tmp_path):
    shared = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?"
    record = {"chosen": shared + "\n\nAssistant: 4", "rejected": shared + "\n\nAssistant: 5"}
    [parsed] = load_preference_records(write_jsonl(tmp_path / "hh.jsonl", [record]))
    assert parsed == {
        "prompt": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "2+2?"},
        ],
        "chosen": "4",
        "rejected": "5",
    }


def test_nemo_aligner_rewards_reach_the_batch(tmp_path):
    rows = [
        {"prompt": "p", "chosen_response": "a", "rejected_response": "b", "chosen_reward": 2.5, "rejected_reward": -1},
        {"prompt": "q", "chosen_response": "c", "rejected_response": "d", "chosen_reward": 1, "rejected_reward": 0.5},
    ]
    ds = PreferenceDataset(write_jsonl(tmp_path / "d.jsonl", rows), byte_tokenizer(), max_seq_len=64)
    batch = collate_preference_pairs([ds[0], ds[1]], pad_id=0)
    assert batch.chosen_reward.tolist() == [2.5, 1.0] and batch.rejected_reward.tolist() == [-1.0, 0.5]


def test_renamed_keys(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "2+2?", "good": "4", "bad": "5"}])
    with pytest.raises(PreferenceDataError, match="cannot tell the preference format"):
        load_preference_records(path)
    [record] = load_preference_records(path, keys={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert record == {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"}
    with pytest.raises(DpokitError, match="unknown preference field"):
        load_preference_records(path, keys={"answer": "good"})


def test_json_array_gzip_and_location_in_errors(tmp_path):
    array = tmp_path / "d.json"
    array.write_text(json.dumps([EXAMPLES["standard"], {"prompt": "p", "chosen": "a"}]))
    with pytest.raises(PreferenceDataError, match=r"d.json:\[1\]: missing field 'rejected'"):
        load_preference_records(array)
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps(EXAMPLES["nemo_aligner"]) + "\n")
    assert load_preference_records(gz) == [EXPECTED]


def test_parquet_when_pyarrow_is_installed(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}, {"prompt": "x", "chosen": "", "rejected": "5"}]
        ),
        path,
    )
    with pytest.raises(PreferenceDataError, match=r"d.parquet:row 2: field 'chosen': empty response"):
        load_preference_records(path)


MALFORMED = [
    # (format, line, expected message after "d.jsonl:2: ", skip reason)
    ("standard", '{"prompt": "p", "chosen": "a"', "invalid JSON", "invalid JSON"),
    ("standard", {"prompt": "p", "chosen": "a"}, "missing field 'rejected'", "missing field"),
    (
        "standard",
        {"prompt": 5, "chosen": "a", "rejected": "b"},
        "field 'prompt': expected a string or a list",
        "mistyped field",
    ),
    ("standard", {"prompt": "p", "chosen": " ", "rejected": "b"}, "field 'chosen': empty response", "empty response"),
    (
        "standard",
        {"prompt": "p", "chosen": "a", "rejected": "a"},
        "field 'rejected': identical to 'chosen'",
        "chosen == rejected",
    ),
    (
        "standard",
        {"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"},
        "field 'prompt'[0].role: unknown role 'robot'",
        "unknown role",
    ),
    (
        "nemo_aligner",
        {
            "prompt": "p",
            "chosen_response": "a",
            "rejected_response": "b",
            "chosen_reward": "high",
            "rejected_reward": 0,
        },
        "field 'chosen_reward': expected a finite number",
        "mistyped field",
    ),
    (
        "nemo_aligner",
        {"prompt": "p", "chosen_response": "a", "rejected_response": "b", "chosen_reward": 1},
        "missing field 'rejected_reward'",
        "missing field",
    ),
    (
        "nemo_rl",
        {
            "context": [{"role": "user", "content": "p"}],
            "completions": [{"rank": 0, "completion": "a"}, {"rank": 0, "completion": "b"}],
        },
        "field 'completions': both completions have rank 0 (a tie)",
        "tied ranks",
    ),
    (
        "nemo_rl",
        {"context": [{"role": "user", "content": "p"}], "completions": [{"rank": 0, "completion": "a"}]},
        "field 'completions': expected exactly two completions, got 1 items",
        "mistyped field",
    ),
    (
        "nemo_rl",
        {
            "context": [{"role": "user", "content": "p"}],
            "completions": [{"rank": 0, "completion": "a"}, {"completion": "b"}],
        },
        "field 'completions[1]': missing field 'rank'",
        "missing field",
    ),
    (
        "hh_rlhf",
        {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant:"},
        "field 'rejected': empty response",
        "empty response",
    ),
    (
        "hh_rlhf",
        {"chosen": "\n\nHuman: hi\n\nAssistant: a\n\nAssistant: b", "rejected": "\n\nHuman: hi\n\nAssistant: c"},
        "field 'chosen': after the 1 shared message(s) expected exactly one assistant message, got 2",
        "no single final assistant turn",
    ),
    (
        "hh_rlhf",
        {"chosen": "hi there\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: c"},
        "field 'chosen': text before the first",
        "bad transcript",
    ),
    (
        "conversational",
        {
            "chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "p"}, {"role": "bot", "content": "b"}],
        },
        "field 'rejected'[1].role: unknown role 'bot'",
        "unknown role",
    ),
    (
        "conversational",
        {
            "chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
        },
        "field 'chosen': after the 0 shared message(s) expected exactly one assistant message, got 2",
        "no single final assistant turn",
    ),
]


@pytest.mark.parametrize("fmt, line, message, reason", MALFORMED, ids=[f"{m[0]}-{m[3]}" for m in MALFORMED])
def test_malformed_record_gives_its_specific_one_line_error(tmp_path, fmt, line, message, reason):
    good = EXAMPLES.get(fmt) or {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, line, good])
    with pytest.raises(PreferenceDataError) as info:
        load_preference_records(path)
    assert str(info.value).startswith(f"{path}:2: {message}") and "\n" not in str(info.value)
    assert info.value.reason == reason
    stats = DatasetStats()
    assert len(load_preference_records(path, skip_invalid=True, stats=stats)) == 2
    assert stats.skipped == {reason: 1}


def test_non_utf8_line_and_mixed_formats(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(EXAMPLES["standard"]).encode() + b'\n{"prompt": "\xff"}\n')
    with pytest.raises(PreferenceDataError, match=r"d.jsonl:2: not valid UTF-8"):
        load_preference_records(path)
    # Auto-detection fixes the format on the first record: a record of another format is an error.
    mixed = write_jsonl(tmp_path / "m.jsonl", [EXAMPLES["standard"], EXAMPLES["nemo_aligner"]])
    with pytest.raises(PreferenceDataError, match=r"m.jsonl:2: missing field 'chosen'"):
        load_preference_records(mixed)
    with pytest.raises(DpokitError, match="unknown preference data format 'trl'"):
        load_preference_records(mixed, format="trl")


def test_skips_are_counted_in_the_summary(tmp_path):
    rows = [EXAMPLES["standard"], "{bad", {"prompt": "p", "chosen": "a", "rejected": "a"}, "{bad"]
    ds = PreferenceDataset(write_jsonl(tmp_path / "d.jsonl", rows), byte_tokenizer(), max_seq_len=64, skip_invalid=True)
    assert (
        ds.stats.summary() == "1 pairs, 3 skipped (1 chosen == rejected, 2 invalid JSON), 0 truncated, standard format"
    )


def test_truncation_cuts_prompt_start_then_response_end_never_to_empty(tmp_path):
    tok = byte_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p" * 50, "chosen": "c" * 200, "rejected": "r" * 3}])
    full_prompt = tok.encode_prompt([{"role": "user", "content": "p" * 50}])
    ds = PreferenceDataset(path, tok, max_seq_len=40, max_prompt_len=30)
    item = ds[0]
    assert item["prompt_ids"] == full_prompt[-30:]
    assert item["chosen_ids"] == tok.encode_response("c" * 200)[:10]
    assert item["rejected_ids"] == tok.encode_response("r" * 3) and ds.stats.truncated == 1
    # The prompt may keep up to max_prompt_len < max_seq_len tokens, so a response keeps >= 1 token.
    item = PreferenceDataset(path, tok, max_seq_len=40, max_prompt_len=39)[0]
    assert len(item["prompt_ids"]) == 39 and len(item["chosen_ids"]) == len(item["rejected_ids"]) == 1


def test_dataset_smaller_than_one_global_batch_is_an_error(tmp_path):
    ds = PreferenceDataset(
        write_jsonl(tmp_path / "d.jsonl", [EXAMPLES["standard"]] * 3), byte_tokenizer(), max_seq_len=64
    )
    check_enough_pairs(ds, 3)
    with pytest.raises(DpokitError, match=r"d.jsonl: 3 pairs, fewer than one global batch of 4 pairs"):
        check_enough_pairs(ds, 4)


@pytest.mark.skipif(not HH_PATH.is_file(), reason="HH-RLHF sample not present")
def test_real_hh_rlhf_file_is_detected_and_every_bad_record_counted():
    ds = PreferenceDataset(HH_PATH, byte_tokenizer(), max_seq_len=1024, skip_invalid=True)
    assert ds.stats.format == "hh_rlhf"
    skipped = sum(ds.stats.skipped.values())
    assert ds.stats.pairs + skipped == 2312 and skipped < 20
    assert ds.stats.skipped.get("empty response", 0) >= 1
    with pytest.raises(PreferenceDataError, match=r"hh_rlhf_harmless_base_test.jsonl.gz:\d+: "):
        PreferenceDataset(HH_PATH, byte_tokenizer(), max_seq_len=1024)
