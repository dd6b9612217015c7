"""Vertical-slice tests of the byte tokenizer, the JSONL preference dataset, collation and the
bundled task."""

import json

import pytest
import torch

from dpokit.data import (
    CHATML_TEMPLATE,
    PreferenceDataError,
    PreferenceDataset,
    bundled_task_path,
    byte_tokenizer,
    collate_preference_pairs,
)
from dpokit.data.synthetic import case_following_pairs, write_case_following_task
from dpokit.data.tokenizer import TEMPLATES, llama3_1_template, llama3_2_template


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "héllo wörld 🙂\n\tcode: x = 1  # done"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_special_token_text_in_user_content_stays_text():
    tok = byte_tokenizer()
    ids = tok.encode("<|eot_id|>")
    assert tok.eot_id not in ids and len(ids) == len("<|eot_id|>")


def test_prompt_plus_response_equals_full_conversation_and_mask_covers_response():
    tok = byte_tokenizer()
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ids, mask = tok.tokenize_messages(prompt + [{"role": "assistant", "content": "hello"}])
    prompt_ids, response_ids = tok.encode_prompt(prompt), tok.encode_response("hello")
    assert ids == prompt_ids + response_ids
    assert mask == [False] * len(prompt_ids) + [True] * len(response_ids)
    assert response_ids[-1] == tok.eot_id
    assert tok.decode(prompt_ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chatml_template_layout():
    tok = byte_tokenizer(CHATML_TEMPLATE)
    ids, mask = tok.tokenize_messages([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    assert tok.decode(ids) == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "a<|im_end|>"


def test_llama3_1_system_turn_layout_and_date_string():
    # Meta's documented Llama 3.1 prompt format: a system turn always opens the conversation.
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    system = "Cutting Knowledge Date: December 2023\nToday Date: {}\n\n"
    user = {"role": "user", "content": " q "}
    prompts = [([user], ""), ([{"role": "system", "content": "\n be brief "}, user], "be brief")]
    for template, date in ((TEMPLATES["llama3_1"], "26 Jul 2024"), (llama3_2_template("03 Feb 2025"), "03 Feb 2025")):
        tok = byte_tokenizer(template)
        for prompt, system_message in prompts:
            ids, mask = tok.tokenize_messages(prompt + [{"role": "assistant", "content": " a "}])
            assert tok.decode(ids) == (
                "<|begin_of_text|>"
                + header.format("system")
                + system.format(date)
                + system_message
                + "<|eot_id|>"
                + header.format("user")
                + "q<|eot_id|>"
                + header.format("assistant")
                + "a<|eot_id|>"
            )
            assert tok.decode([i for i, m in zip(ids, mask) if m]) == "a<|eot_id|>"
            assert ids == tok.encode_prompt(prompt) + tok.encode_response(" a ")
    # the default date is fixed, not today's: 3.1 and 3.2 tokenize identically by default
    prompt = [{"role": "user", "content": "q"}]
    expected = byte_tokenizer(llama3_1_template()).encode_prompt(prompt)
    for template in (TEMPLATES["llama3_2"], llama3_2_template()):
        assert byte_tokenizer(template).encode_prompt(prompt) == expected


def test_chat_templates_refuse_tool_calls():
    call = [{"type": "function", "function": {"name": "f", "arguments": {}}}]
    plain = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    for name in TEMPLATES:
        tok = byte_tokenizer(TEMPLATES[name])
        with pytest.raises(ValueError, match="message 1: has 'tool_calls'.*not supported"):
            tok.tokenize_messages([plain[0], {"role": "assistant", "content": "", "tool_calls": call}])
        # a null / empty tool_calls field (as OpenAI exports write it) carries no call: rendered as text
        assert tok.tokenize_messages([plain[0], {**plain[1], "tool_calls": None}]) == tok.tokenize_messages(plain)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_dataset_reads_strings_and_message_lists(tmp_path):
    tok = byte_tokenizer()
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
            {
                "prompt": [{"role": "user", "content": "2+2?"}],
                "chosen": [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "assistant", "content": "5"}],
            },
        ],
    )
    ds = PreferenceDataset(path, tok, max_seq_len=128)
    assert len(ds) == 2 and ds[0] == ds[1]
    assert ds[0]["chosen_ids"] == tok.encode_response("4")
    assert ds[0]["prompt_ids"] == tok.encode_prompt([{"role": "user", "content": "2+2?"}])


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "p", "chosen": "a"', "d.jsonl:2: invalid JSON"),
        ('{"prompt": "p", "chosen": "a"}', "d.jsonl:2: missing field 'rejected'"),
        ('{"prompt": "p", "chosen": 3, "rejected": "b"}', "d.jsonl:2: field 'chosen': expected a string"),
        ('{"prompt": "p", "chosen": "", "rejected": "b"}', "d.jsonl:2: field 'chosen': empty response"),
        ('{"prompt": "p", "chosen": "a", "rejected": "a"}', "d.jsonl:2: field 'rejected': identical to 'chosen'"),
        (
            '{"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}',
            "d.jsonl:2: field 'prompt'[0].role: unknown role 'robot'",
        ),
        (
            '{"prompt": "p", "chosen": [{"role": "assistant", "content": null, "tool_calls": [{"type": "function"}]}], '
            '"rejected": "b"}',
            "d.jsonl:2: field 'chosen'[0].tool_calls: tool calls are not supported",
        ),
        (
            '{"prompt": [{"role": "user", "content": "x", "function_call": {"name": "f"}}], "chosen": "a", "rejected": "b"}',
            "d.jsonl:2: field 'prompt'[0].function_call: tool calls are not supported",
        ),
    ],
)
def test_malformed_lines_name_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, line])
    with pytest.raises(PreferenceDataError) as info:
        PreferenceDataset(path, byte_tokenizer(), max_seq_len=64)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_non_utf8_line_is_reported(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(PreferenceDataError, match=r"d.jsonl:2: not valid UTF-8"):
        PreferenceDataset(path, byte_tokenizer(), max_seq_len=64)


def test_skip_invalid_counts_every_skipped_line(tmp_path):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, "{oops", good, {"prompt": "p", "chosen": "a", "rejected": "a"}])
    ds = PreferenceDataset(path, byte_tokenizer(), max_seq_len=64, skip_invalid=True)
    assert len(ds) == 2
    assert sum(ds.stats.skipped.values()) == 2
    assert "2 pairs, 2 skipped" in ds.stats.summary()


def test_truncation_keeps_prompt_end_and_response_start_and_is_counted(tmp_path):
    tok = byte_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x" * 100 + "END", "chosen": "abc" * 30, "rejected": "b"}])
    ds = PreferenceDataset(path, tok, max_seq_len=64, max_prompt_len=24)
    item = ds[0]
    assert len(item["prompt_ids"]) == 24 and len(item["prompt_ids"]) + len(item["chosen_ids"]) == 64
    assert tok.decode(item["prompt_ids"]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.decode(item["chosen_ids"]).startswith("abcabc")
    assert item["rejected_ids"] == tok.encode_response("b")
    assert ds.stats.truncated == 1


def test_collate_puts_chosen_then_rejected_with_shifted_response_labels():
    items = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
        {"prompt_ids": [7], "chosen_ids": [8, 9, 10], "rejected_ids": [11, 12]},
    ]
    batch = collate_preference_pairs(items, pad_id=0)
    assert batch.num_pairs == 2 and batch.num_tokens == 5 + 4 + 4 + 3
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 0], [1, 2, 3, 6, 0], [7, 11, 12, 0, 0]]
    x = -100
    assert batch.labels.tolist() == [[x, x, 4, 5, x], [8, 9, 10, x, x], [x, x, 6, x, x], [11, 12, x, x, x]]
    # Every label is the next input token: logits at t score input t+1.
    ids, labels = batch.input_ids, batch.labels
    keep = labels[:, :-1] != -100
    assert torch.equal(labels[:, :-1][keep], ids[:, 1:][keep])


def test_bundled_task_is_what_the_generator_writes(tmp_path):
    write_case_following_task(tmp_path)
    for split in ("train", "validation"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == bundled_task_path("case_following", split).read_bytes()


def test_bundled_task_has_no_repeats_and_no_validation_prompt_in_training():
    train = bundled_task_path("case_following", "train").read_text().splitlines()
    validation = bundled_task_path("case_following", "validation").read_text().splitlines()
    assert (len(train), len(validation)) == (4000, 256)
    prompts = {
        split: [json.loads(line)["prompt"] for line in lines]
        for split, lines in (("train", train), ("validation", validation))
    }
    assert len(set(prompts["train"])) == 4000 and len(set(prompts["validation"])) == 256
    assert not set(prompts["train"]) & set(prompts["validation"])


def test_bundled_task_balances_the_two_instructions():
    pairs = case_following_pairs(2000, seed=0)
    upper = sum("UPPER" in p["prompt"] for p in pairs)
    assert 900 < upper < 1100
    for p in pairs:
        wanted = str.upper if "UPPER" in p["prompt"] else str.lower
        assert p["chosen"] == wanted(p["chosen"]) and p["rejected"] != p["chosen"]
        assert p["chosen"].lower() == p["rejected"].lower() == p["prompt"].split(": ", 1)[1].lower()
