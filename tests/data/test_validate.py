"""`dpokit validate`: every invalid record named as the strict reader names it, counted by reason;
token-length percentiles equal to ones computed by hand from the byte tokenizer (and from
`transformers` for a tokenizer.json); truncation, padding and packing figures equal to the training
path's own (`PreferenceDataset`, `collate_preference_pairs`, `collate_packed`); exit codes 0/1/2."""

import gzip
import json
import random
import subprocess

import numpy as np
import pytest

from dpokit.cli import main
from dpokit.data import (
    CHATML_TEMPLATE,
    PreferenceDataError,
    PreferenceDataset,
    bundled_task_path,
    byte_tokenizer,
    collate_packed,
    collate_preference_pairs,
    load_preference_records,
    pack_preference_dataset,
)
from dpokit.data.preference import SKIP_INVALID_EFFECT
from dpokit.data.validate import load_tokenizer, percentile, validate_preference_file

GOOD = {"prompt": "Say hi", "chosen": "hi there", "rejected": "go away"}
DEFECTS = {  # line number -> (line, reason); line 1 is GOOD
    2: (json.dumps({"prompt": "p2", "rejected": "x"}), "missing field"),
    3: (json.dumps({"prompt": "p3", "chosen": "ok", "rejected": "   "}), "empty response"),
    4: (json.dumps({"prompt": "p4", "chosen": 5, "rejected": "no"}), "mistyped field"),
    5: ('{"prompt": "p5", "chosen": ', "invalid JSON"),
    6: (json.dumps({"prompt": "p6", "chosen": "same", "rejected": "same"}), "chosen == rejected"),
}
EXPECTED_ERRORS = [  # what each bad line's error names: line and field
    "d.jsonl:2: missing field 'chosen'",
    "d.jsonl:3: field 'rejected': empty response",
    "d.jsonl:4: field 'chosen': expected a string or one assistant message, got int",
    "d.jsonl:5: invalid JSON (",
    "d.jsonl:6: field 'rejected': identical to 'chosen'",
]
# Line 7 repeats line 1; line 8 is blank (allowed, not a record); line 9 differs only in whitespace
# that the llama3 template trims, so its chosen and rejected are the same tokens.
TRIMMED_TWIN = {"prompt": "p9", "chosen": " yes", "rejected": "yes  "}


def random_pairs(n, seed=0):
    rng = random.Random(seed)
    text = lambda k: "".join(rng.choice("abcdefgh ") for _ in range(k)).strip() or "x"  # noqa: E731
    return [
        {
            "prompt": text(rng.randint(1, 120)),
            "chosen": "A" + text(rng.randint(0, 60)),
            "rejected": "B" + text(rng.randint(0, 90)),
        }
        for _ in range(n)
    ]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture
def defective(tmp_path, monkeypatch):
    """d.jsonl (relative, so locations read "d.jsonl:LINE") and its valid records in order."""
    monkeypatch.chdir(tmp_path)
    extra = random_pairs(40)
    lines = [
        json.dumps(GOOD),
        *(DEFECTS[k][0] for k in sorted(DEFECTS)),
        json.dumps(GOOD),
        "",
        json.dumps(TRIMMED_TWIN),
        *map(json.dumps, extra),
    ]
    write_lines(tmp_path / "d.jsonl", lines)
    return "d.jsonl", [GOOD, GOOD, TRIMMED_TWIN, *extra]


def byte_lengths(record):
    """Token lengths under the byte tokenizer + llama3 template, from the template's layout:
    <|begin_of_text|> <|start_header_id|>user<|end_header_id|>\\n\\n CONTENT <|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n  ->  1 + 8 + n + 1 + 13 tokens; a response is
    its trimmed bytes + <|eot_id|>."""
    size = lambda s: len(s.strip().encode())  # noqa: E731
    return 23 + size(record["prompt"]), size(record["chosen"]) + 1, size(record["rejected"]) + 1


def nearest_rank(values, q):
    return int(np.percentile(values, q, method="inverted_cdf"))


def test_every_invalid_record_is_listed_as_the_strict_reader_names_it(defective, tmp_path, monkeypatch):
    path, _ = defective
    report = validate_preference_file(path, byte_tokenizer())
    messages = [str(e) for e in report.errors]
    assert len(messages) == len(EXPECTED_ERRORS)
    for message, expected in zip(messages, EXPECTED_ERRORS):
        assert message.startswith(expected), (message, expected)
    assert report.stats.skipped == {reason: 1 for _, reason in DEFECTS.values()}
    assert report.stats.pairs == 43 and report.stats.format == "standard" and not report.ok

    # The strict reader, given line 1 (which sets the format) and each bad line at its own line number
    # (the lines between blank), raises exactly the message listed for it.
    (tmp_path / "strict").mkdir()
    monkeypatch.chdir(tmp_path / "strict")
    for message, line_number in zip(messages, sorted(DEFECTS)):
        lines = [json.dumps(GOOD)] + [""] * (line_number - 2) + [DEFECTS[line_number][0]]
        write_lines(tmp_path / "strict" / "d.jsonl", lines)
        with pytest.raises(PreferenceDataError) as raised:
            load_preference_records("d.jsonl")
        assert str(raised.value) == f"{message} (skip_invalid=true {SKIP_INVALID_EFFECT})"  # names the fix


def test_duplicates_and_pairs_identical_after_tokenization_are_named(defective):
    path, _ = defective
    report = validate_preference_file(path, byte_tokenizer())
    assert report.duplicates == [("d.jsonl:7", "d.jsonl:1")]
    assert report.identical_tokens == ["d.jsonl:9"]
    # chatml does not trim content, so there " yes" and "yes  " stay different
    assert validate_preference_file(path, byte_tokenizer(CHATML_TEMPLATE)).identical_tokens == []


def test_length_percentiles_equal_the_byte_counts_of_the_template(defective):
    path, valid = defective
    report = validate_preference_file(path, byte_tokenizer())
    prompt, chosen, rejected = zip(*map(byte_lengths, valid))
    sequence = [p + max(c, r) for p, c, r in zip(prompt, chosen, rejected)]
    for name, values in zip(("prompt", "chosen", "rejected", "sequence"), (prompt, chosen, rejected, sequence)):
        expected = {
            "p50": nearest_rank(values, 50),
            "p90": nearest_rank(values, 90),
            "p99": nearest_rank(values, 99),
            "max": max(values),
        }
        assert report.lengths[name] == expected, name


def test_percentile_is_nearest_rank():
    rng = random.Random(1)
    for n in (1, 2, 3, 7, 10, 99, 100, 101, 1000):
        values = [rng.randint(0, 500) for _ in range(n)]
        for q in (1, 50, 90, 99, 100):
            assert percentile(values, q) == nearest_rank(values, q), (n, q)


def test_truncation_and_layout_costs_equal_the_training_path(defective):
    path, valid = defective
    max_length = 180  # truncates a few pairs, so padded batches still differ in width
    report = validate_preference_file(path, byte_tokenizer(), max_length=max_length, batch_size=4)
    by_hand = sum(p + max(c, r) > max_length for p, c, r in map(byte_lengths, valid))
    assert report.stats.truncated == by_hand > 0
    dataset = PreferenceDataset(path, byte_tokenizer(), max_seq_len=max_length, skip_invalid=True)
    assert report.stats.truncated == dataset.stats.truncated and report.stats.pairs == len(dataset)

    padded, packed, shared = report.layouts
    order = list(range(len(dataset)))
    random.Random(0).shuffle(order)  # the documented batch order: a seeded shuffle, seed 0
    batches = [
        collate_preference_pairs([dataset[i] for i in order[s : s + 4]], pad_id=0) for s in range(0, len(order), 4)
    ]
    assert padded.computed == sum(b.input_ids.numel() for b in batches)
    assert padded.real == sum(b.num_tokens for b in batches)
    assert 0 < padded.padding < 1
    for layout, prefix_sharing in ((packed, False), (shared, True)):
        packs = pack_preference_dataset(dataset, pack_size=2 * max_length, prefix_sharing=prefix_sharing)
        batches = [
            collate_packed([pack], pad_id=0, pack_size=2 * max_length, prefix_sharing=prefix_sharing) for pack in packs
        ]
        assert layout.computed == sum(b.input_ids.numel() for b in batches)
        assert layout.real == sum(b.num_tokens for b in batches)
        assert layout.tokens_per_pair == pytest.approx(len(batches) * 2 * max_length / len(dataset))


def test_cli_text_report_lists_capped_errors_and_exits_1(defective, capsys):
    path, _ = defective
    assert main(["validate", path, "--max-errors", "2", "--max-length", "90"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(EXPECTED_ERRORS[0]) and out[1].startswith(EXPECTED_ERRORS[1])
    assert out[2] == "... and 3 more invalid records (--json lists them all)"
    assert out[3] == "d.jsonl: 48 records: 43 valid pairs, 5 invalid, standard format"
    assert [line.split(None, 1) for line in out[4:9]] == [  # counts per reason, most frequent first, then by name
        ["1", reason] for reason in sorted(reason for _, reason in DEFECTS.values())
    ]
    assert any(line.startswith("max length 90: ") for line in out)
    assert "  d.jsonl:7: same prompt, chosen and rejected as d.jsonl:1" in out
    assert out[-1].startswith(
        "FAILED: 5 invalid record(s); training stops at the first unless the dataset sets skip_invalid: true"
    )


def test_cli_json_report(defective, capsys):
    path, valid = defective
    assert main(["validate", path, "--json", "--max-length", "90"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["records"], report["pairs"], report["invalid"], report["ok"]) == (48, 43, 5, False)
    assert report["invalid_by_reason"] == {reason: 1 for _, reason in sorted(DEFECTS.values(), key=lambda d: d[1])}
    assert [e["message"][: len(x)] for e, x in zip(report["errors"], EXPECTED_ERRORS)] == EXPECTED_ERRORS
    assert report["duplicates"] == [{"location": "d.jsonl:7", "first": "d.jsonl:1"}]
    assert report["identical_after_tokenization"] == ["d.jsonl:9"]
    assert report["lengths"]["prompt"]["max"] == max(byte_lengths(r)[0] for r in valid)
    assert set(report["layouts"]) == {
        "padded (8 pairs per batch)",
        "packed FFD (packs of 180)",
        "prefix-shared FFD (packs of 180)",
    }


def test_clean_file_exits_0_with_renamed_keys(tmp_path, capsys):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in random_pairs(10)]
    path = write_lines(tmp_path / "renamed.jsonl", map(json.dumps, rows))
    args = ["validate", str(path), "--key-names", "prompt=question,chosen=good", "--key-names", "rejected=bad"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "10 records: 10 valid pairs, 0 invalid, standard format" in out
    assert out.endswith("OK: every record is valid\n")
    assert main(["validate", str(path)]) == 1  # without the names no record is recognisable
    assert "10  unknown format" in capsys.readouterr().out


def test_file_level_defects_and_empty_files_exit_1(tmp_path, capsys):
    array = tmp_path / "d.json"
    array.write_text(json.dumps([GOOD, {"prompt": "p", "chosen": "c"}]))
    assert main(["validate", str(array)]) == 1
    assert f"{array}:[1]: missing field 'rejected'" in capsys.readouterr().out
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(gzip.compress((json.dumps(GOOD) + "\n").encode() * 200)[:-20])
    assert main(["validate", str(truncated), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["invalid_by_reason"] == {"unreadable file": 1}
    empty = write_lines(tmp_path / "empty.jsonl", [""])
    assert main(["validate", str(empty)]) == 1
    assert capsys.readouterr().out.endswith("FAILED: no preference pairs\n")


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.jsonl"], "missing.jsonl: preference data file not found"),
        (["{data}", "--tokenizer", "nope/tokenizer.json"], "tokenizer 'nope/tokenizer.json': expected 'byte'"),
        (["{data}", "--template", "llama2"], "unknown chat template 'llama2'"),
        (["{data}", "--format", "alpaca"], "unknown preference data format 'alpaca'"),
        (["{data}", "--key-names", "prompt"], "--key-names: expected FIELD=NAME"),
        (["{data}", "--key-names", "question=prompt"], "unknown preference field name(s) ['question']"),
        (
            ["{data}", "--max-length", "100", "--pack-size", "150"],
            "pack size 150 must be at least 2 x the max length (200)",
        ),
    ],
)
def test_usage_errors_exit_2(tmp_path, capsys, args, message):
    data = write_lines(tmp_path / "ok.jsonl", [json.dumps(GOOD)])
    assert main(["validate", *(str(data) if a == "{data}" else a for a in args)]) == 2
    assert message in capsys.readouterr().err


def test_argument_errors_exit_2_and_help_exits_0(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["validate", str(tmp_path / "x.jsonl"), "--max-length", "0"])
    assert exited.value.code == 2 and "expected a positive integer, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["validate", "--help"])
    assert exited.value.code == 0 and "usage: dpokit validate" in capsys.readouterr().out


@pytest.mark.subprocess
def test_subprocess_exit_status_and_json(defective):
    path, _ = defective
    result = subprocess.run(["dpokit", "validate", path, "--json"], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["invalid"] == 5
    good = subprocess.run(
        ["dpokit", "validate", str(bundled_task_path("case_following", "validation"))], capture_output=True, text=True
    )
    assert good.returncode == 0 and good.stdout.endswith("OK: every record is valid\n"), good.stderr


def test_bundled_task_duplicates_equal_repeated_lines():
    path = bundled_task_path("case_following", "train")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    report = validate_preference_file(path, byte_tokenizer())
    assert report.ok and report.stats.pairs == len(lines)
    assert len(report.duplicates) == len(lines) - len(set(lines))
    for where, first in report.duplicates[:20]:
        assert lines[int(where.rsplit(":", 1)[1]) - 1] == lines[int(first.rsplit(":", 1)[1]) - 1]


CHATML_JINJA = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_tokenizer_json_lengths_equal_transformers(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from hf_fixtures import write_tokenizer

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    write_tokenizer(checkpoint, CHATML_JINJA, vocab_size=400)
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(checkpoint / "tokenizer.json"), chat_template=CHATML_JINJA
    )
    monkeypatch.chdir(tmp_path)
    records = random_pairs(25, seed=3)
    write_lines(tmp_path / "d.jsonl", map(json.dumps, records))

    def ids(encoded):
        return encoded["input_ids"] if hasattr(encoded, "keys") else encoded

    prompt = [
        len(
            ids(
                reference.apply_chat_template(
                    [{"role": "user", "content": r["prompt"]}], tokenize=True, add_generation_prompt=True
                )
            )
        )
        for r in records
    ]
    chosen, rejected = (
        [len(reference.encode(r[k], add_special_tokens=False)) + 1 for r in records]  # + <|im_end|>
        for k in ("chosen", "rejected")
    )
    for spec in (str(checkpoint), str(checkpoint / "tokenizer.json")):  # the template is detected either way
        report = validate_preference_file("d.jsonl", load_tokenizer(spec))
        assert report.template == "chatml" and report.ok
        for name, values in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            assert report.lengths[name] == {
                "p50": nearest_rank(values, 50),
                "p90": nearest_rank(values, 90),
                "p99": nearest_rank(values, 99),
                "max": max(values),
            }, (spec, name)
