"""Preference datasets from the Hugging Face Hub, read offline from a real huggingface_hub cache.

Each test lays a dataset repo out on disk as huggingface_hub's cache does (blobs/<sha256>,
snapshots/<commit>/<path> symlinked to the blob, refs/<branch> holding the commit), sets
HF_HUB_CACHE and HF_HUB_OFFLINE=1, and calls the real `snapshot_download`: no mocks. The rows copy
the column structure of the published datasets (short made-up texts).
"""

import gzip
import hashlib
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import constants

from dpokit.cli import main as cli_main
from dpokit.data import PreferenceDataset, byte_tokenizer, detect_format, load_preference_records
from dpokit.data.hub import PRESETS, HubDatasetError, download_hub_dataset, hub_dataset_files, resolve_hub_dataset
from dpokit.errors import DpokitError

COMMIT = "5c6cb2a5d3e4f1b0a9c8d7e6f5a4b3c2d1e0f9a8"
OTHER_COMMIT = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline. huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE
    once, when it is imported, so the values it read are set too (the environment is for children)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_repo(cache, repo_id, files, *, commit=COMMIT, ref="main"):
    """Put a dataset repo's files ({path in repo: bytes}) into the cache at `commit`, with `ref`
    pointing at it; returns the snapshot folder."""
    storage = cache / f"datasets--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    for relpath, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / relpath
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # no newline: huggingface_hub reads it as is
    return snapshot


def jsonl_gz(rows):
    return gzip.compress("".join(json.dumps(row) + "\n" for row in rows).encode())


def parquet(tmp_path, rows):
    path = tmp_path / f"rows-{len(list(tmp_path.glob('rows-*')))}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path.read_bytes()


def messages(*turns):
    """[{"content", "role"}] in the field order of the Parquet datasets' struct."""
    return [{"content": text, "role": role} for role, text in turns]


def hh_row(question, good, bad):
    shared = f"\n\nHuman: {question}"
    return {"chosen": f"{shared}\n\nAssistant: {good}", "rejected": f"{shared}\n\nAssistant: {bad}"}


def red_team_row():
    """red-team-attempts/red_team_attempts.jsonl.gz rows: whole transcripts, no pairs."""
    return {
        "transcript": "\n\nHuman: hi\n\nAssistant: hello",
        "min_harmlessness_score_transcript": -0.5,
        "num_params": "52B",
        "model_type": "context distillation",
        "rating": 1.0,
        "task_description": "make small talk",
        "task_descripton_harmlessness_score": 0.2,
        "red_team_member_id": 7,
        "is_upworker": False,
        "tags": None,
    }


HH_FILES = {
    "harmless-base/train.jsonl.gz": jsonl_gz(
        [hh_row("Is fire hot?", "Yes.", "No."), hh_row("Is ice cold?", "Yes.", "No.")]
    ),
    "harmless-base/test.jsonl.gz": jsonl_gz([hh_row("Is the sky blue?", "Usually.", "Never.")]),
    "helpful-base/train.jsonl.gz": jsonl_gz([hh_row("2+2?", "4", "5")]),
    "helpful-base/test.jsonl.gz": jsonl_gz([hh_row("3+3?", "6", "7")]),
    "red-team-attempts/red_team_attempts.jsonl.gz": jsonl_gz([red_team_row()]),
    "README.md": b"---\nlicense: mit\n---\n",
    ".gitattributes": b"*.gz filter=lfs diff=lfs merge=lfs -text\n",
}


def ultrafeedback_row(n, prompt, good, bad, score_chosen=8.5, score_rejected=6.0):
    """HuggingFaceH4/ultrafeedback_binarized: prompt, prompt_id, chosen, rejected, messages, scores."""
    chosen = messages(("user", prompt), ("assistant", good))
    return {
        "prompt": prompt,
        "prompt_id": hashlib.sha256(f"{n}".encode()).hexdigest(),
        "chosen": chosen,
        "rejected": messages(("user", prompt), ("assistant", bad)),
        "messages": chosen,
        "score_chosen": score_chosen,
        "score_rejected": score_rejected,
    }


def helpsteer3_row(context, response1, response2, overall_preference):
    """nvidia/HelpSteer3 preference/*.jsonl.gz rows."""
    return {
        "domain": "general",
        "language": "english",
        "context": context,
        "response1": response1,
        "response2": response2,
        "overall_preference": overall_preference,
        "individual_preference": [
            {"score": overall_preference, "reasoning": "@Response 1 is shorter."},
            {"score": overall_preference, "reasoning": "Both answer; one is clearer."},
        ],
    }


def tulu_row(n, prompt, good, bad):
    """allenai/llama-3.1-tulu-3-8b-preference-mixture: id, prompt, chosen, rejected, source."""
    return {
        "id": f"allenai/tulu-3-sft-reused-off-policy_{n}",
        "prompt": prompt,
        "chosen": messages(("user", prompt), ("assistant", good)),
        "rejected": messages(("user", prompt), ("assistant", bad)),
        "source": "allenai/tulu-3-sft-reused-off-policy",
    }


def dataset(**kwargs):
    return PreferenceDataset(tokenizer=byte_tokenizer(), max_seq_len=256, **kwargs)


def decoded(ds, index):
    """(chosen, rejected) text of item `index`, without the end-of-turn token."""
    tokenizer = byte_tokenizer()
    item = ds[index]
    return tuple(tokenizer.decode(item[k]).removesuffix("<|eot_id|>") for k in ("chosen_ids", "rejected_ids"))


# --- hh-rlhf: folders, subset, split ----------------------------------------------------------------


def test_hh_rlhf_preset_reads_every_folders_train_file_each_record_located_in_its_own(hf_cache):
    snapshot = cache_repo(hf_cache, "Anthropic/hh-rlhf", HH_FILES)
    files = hub_dataset_files("Anthropic/hh-rlhf")
    assert files == [snapshot / "harmless-base/train.jsonl.gz", snapshot / "helpful-base/train.jsonl.gz"]
    assert str(files) == "Anthropic/hh-rlhf split 'train'"

    ds = dataset(hub="Anthropic/hh-rlhf")
    assert len(ds) == 3 and ds.stats.format == "hh_rlhf" and ds.stats.skipped == {}
    assert ds.files == files and str(ds.path) == "Anthropic/hh-rlhf split 'train'"
    assert [decoded(ds, i)[0] for i in range(3)] == ["Yes.", "Yes.", "4"]

    locations = []
    load_preference_records(files, format="hh_rlhf", locations=locations)
    assert locations == [
        f"{snapshot}/harmless-base/train.jsonl.gz:1",
        f"{snapshot}/harmless-base/train.jsonl.gz:2",
        f"{snapshot}/helpful-base/train.jsonl.gz:1",
    ]


def test_an_invalid_record_of_the_second_file_names_that_file_and_line(hf_cache):
    files = dict(HH_FILES)
    files["helpful-base/train.jsonl.gz"] = jsonl_gz([hh_row("2+2?", "4", "5"), hh_row("1+1?", "", "2")])
    snapshot = cache_repo(hf_cache, "Anthropic/hh-rlhf", files)
    with pytest.raises(DpokitError) as error:
        dataset(hub="Anthropic/hh-rlhf")
    assert str(error.value) == (
        f"{snapshot}/helpful-base/train.jsonl.gz:2: field 'chosen': empty response "
        f"(skip_invalid=true skips such records and counts them by reason)"
    )
    ds = dataset(hub="Anthropic/hh-rlhf", skip_invalid=True)
    assert len(ds) == 3 and ds.stats.skipped == {"empty response": 1}


def test_hh_rlhf_subset_and_split(hf_cache):
    snapshot = cache_repo(hf_cache, "Anthropic/hh-rlhf", HH_FILES)
    assert hub_dataset_files("Anthropic/hh-rlhf", subset="helpful-base") == [snapshot / "helpful-base/train.jsonl.gz"]
    assert hub_dataset_files("Anthropic/hh-rlhf", split="test") == [
        snapshot / "harmless-base/test.jsonl.gz",
        snapshot / "helpful-base/test.jsonl.gz",
    ]
    ds = dataset(hub="Anthropic/hh-rlhf", split="test", subset="harmless-base")
    assert len(ds) == 1 and decoded(ds, 0) == ("Usually.", "Never.")
    assert str(ds.path) == "Anthropic/hh-rlhf subset 'harmless-base' split 'test'"


def test_a_revision_selects_its_snapshot(hf_cache):
    cache_repo(hf_cache, "Anthropic/hh-rlhf", HH_FILES)
    only_helpful = {"helpful-base/train.jsonl.gz": HH_FILES["helpful-base/train.jsonl.gz"]}
    old = cache_repo(hf_cache, "Anthropic/hh-rlhf", only_helpful, commit=OTHER_COMMIT, ref="v1")
    assert hub_dataset_files("Anthropic/hh-rlhf", revision="v1") == [old / "helpful-base/train.jsonl.gz"]
    assert hub_dataset_files("Anthropic/hh-rlhf", revision=OTHER_COMMIT) == [old / "helpful-base/train.jsonl.gz"]
    assert len(dataset(hub="Anthropic/hh-rlhf", revision="v1")) == 1


# --- the other presets -----------------------------------------------------------------------------


def test_ultrafeedback_parquet_message_lists_with_scores_as_rewards(hf_cache, tmp_path):
    rows = [
        ultrafeedback_row(0, "Name a prime.", "7 is prime.", "8 is prime."),
        ultrafeedback_row(1, "Capital of France?", "Paris.", "Lyon.", 9.0, 3.5),
    ]
    snapshot = cache_repo(
        hf_cache,
        "HuggingFaceH4/ultrafeedback_binarized",
        {
            "data/train_prefs-00000-of-00001.parquet": parquet(tmp_path, rows),
            "data/test_prefs-00000-of-00001.parquet": parquet(tmp_path, rows[:1]),
            "data/train_sft-00000-of-00001.parquet": parquet(tmp_path, rows[:1]),
        },
    )
    ds = dataset(hub="HuggingFaceH4/ultrafeedback_binarized")  # the preset's train split: train_prefs
    assert ds.files == [snapshot / "data/train_prefs-00000-of-00001.parquet"]
    assert len(ds) == 2 and ds.stats.format == "conversational"
    assert decoded(ds, 1) == ("Paris.", "Lyon.")
    assert (ds[1]["chosen_reward"], ds[1]["rejected_reward"]) == (9.0, 3.5)
    locations = []
    load_preference_records(ds.files, format="conversational", locations=locations)
    assert locations == [f"{ds.files[0]}:row 1", f"{ds.files[0]}:row 2"]
    validation_split = PRESETS["HuggingFaceH4/ultrafeedback_binarized"].validation_split
    test = dataset(hub="HuggingFaceH4/ultrafeedback_binarized", split=validation_split)
    assert test.files == [snapshot / "data/test_prefs-00000-of-00001.parquet"]


def test_split_train_does_not_take_train_prefs_and_the_error_lists_the_splits(hf_cache, tmp_path):
    row = ultrafeedback_row(0, "Name a prime.", "7.", "8.")
    cache_repo(
        hf_cache,
        "HuggingFaceH4/ultrafeedback_binarized",
        {
            "data/train_prefs-00000-of-00001.parquet": parquet(tmp_path, [row]),
            "data/test_prefs-00000-of-00001.parquet": parquet(tmp_path, [row]),
            "README.md": b"# card\n",
        },
    )
    with pytest.raises(HubDatasetError) as error:
        hub_dataset_files("HuggingFaceH4/ultrafeedback_binarized", split="train")
    assert str(error.value) == (
        f"HuggingFaceH4/ultrafeedback_binarized split 'train': no such split; the cache ({hf_cache}) has "
        f"splits: test_prefs, train_prefs; if the Hub has more, run "
        f"`dpokit download HuggingFaceH4/ultrafeedback_binarized --dataset` where there is network"
    )


def test_helpsteer3_tie_is_skipped_and_counted_or_a_one_line_error(hf_cache):
    question = [{"role": "user", "content": "Say hi."}]
    conversation = [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Another?"},
    ]
    train = [
        helpsteer3_row(question, "Hi!", "Hello there, friend.", -2),  # negative: response1 better
        helpsteer3_row(conversation, "Blue.", "Green.", 0),  # a tie
        helpsteer3_row(conversation, "Blue.", "Green, or maybe teal.", 3),  # positive: response2 better
    ]
    feedback = [{"domain": "code", "language": "python", "context": question, "response1": "x", "feedback1": []}]
    snapshot = cache_repo(
        hf_cache,
        "nvidia/HelpSteer3",
        {
            "preference/train.jsonl.gz": jsonl_gz(train),
            "preference/validation.jsonl.gz": jsonl_gz(train[:1]),
            "feedback/train.jsonl.gz": jsonl_gz(feedback),  # another subset: not read by default
        },
    )
    ds = dataset(hub="nvidia/HelpSteer3", skip_invalid=True)
    assert ds.files == [snapshot / "preference/train.jsonl.gz"]
    assert ds.stats.format == "helpsteer3" and ds.stats.skipped == {"tied preference": 1} and len(ds) == 2
    assert decoded(ds, 0) == ("Hi!", "Hello there, friend.")
    assert decoded(ds, 1) == ("Green, or maybe teal.", "Blue.")
    assert "1 skipped (1 tied preference)" in ds.stats.summary()
    with pytest.raises(DpokitError) as error:
        dataset(hub="nvidia/HelpSteer3")
    assert str(error.value) == (
        f"{snapshot}/preference/train.jsonl.gz:2: field 'overall_preference': 0, a tie (neither response is "
        f"preferred) (skip_invalid=true skips such records and counts them by reason)"
    )
    assert len(dataset(hub="nvidia/HelpSteer3", split="validation")) == 1


def test_helpsteer3_format_detected_and_checked(tmp_path):
    row = helpsteer3_row("Say hi.", "Hi!", "Hello.", 1)
    assert detect_format(row) == "helpsteer3"
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "overall_preference": "-1"}) + "\n")
    records = load_preference_records(path, skip_invalid=True)
    assert records == [{"prompt": [{"role": "user", "content": "Say hi."}], "chosen": "Hello.", "rejected": "Hi!"}]
    with pytest.raises(DpokitError, match=r"hs.jsonl:2: field 'overall_preference': expected a number \(negative"):
        load_preference_records(path)


def test_tulu_parquet_shards_read_in_order(hf_cache, tmp_path):
    repo = "allenai/llama-3.1-tulu-3-8b-preference-mixture"
    shards = {
        f"data/train-0000{i}-of-00002.parquet": parquet(
            tmp_path, [tulu_row(2 * i + j, f"Q{2 * i + j}?", f"A{2 * i + j}.", "No idea.") for j in range(2)]
        )
        for i in range(2)
    }
    snapshot = cache_repo(hf_cache, repo, {**shards, "qwen_license.txt": b"license\n", "README.md": b"# Tulu\n"})
    ds = dataset(hub=repo)
    assert ds.files == [snapshot / name for name in sorted(shards)]
    assert [decoded(ds, i)[0] for i in range(4)] == ["A0.", "A1.", "A2.", "A3."]
    assert ds.stats.format == "conversational" and PRESETS[repo].validation_split is None


def test_a_repo_without_a_preset_is_auto_detected_and_a_split_folder_counts(hf_cache, tmp_path):
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
    snapshot = cache_repo(
        hf_cache,
        "someone/prefs",
        {
            "default/train/0000.parquet": parquet(tmp_path, rows),
            "default/train/0001.parquet": parquet(tmp_path, rows),
            "default/validation/0000.parquet": parquet(tmp_path, rows),
        },
    )
    ds = dataset(hub="someone/prefs")
    assert ds.files == [snapshot / "default/train/0000.parquet", snapshot / "default/train/0001.parquet"]
    assert ds.stats.format == "standard" and len(ds) == 2
    resolved = resolve_hub_dataset("someone/prefs", split="validation", subset="default")
    assert resolved.files == [snapshot / "default/validation/0000.parquet"] and resolved.format == "auto"


# --- errors ---------------------------------------------------------------------------------------------


def test_a_repo_not_in_the_cache_offline(hf_cache):
    with pytest.raises(HubDatasetError) as error:
        dataset(hub="Anthropic/hh-rlhf")
    assert str(error.value) == (
        f"Anthropic/hh-rlhf: not in the Hugging Face cache ({hf_cache}) and HF_HUB_OFFLINE=1; "
        f"run `dpokit download Anthropic/hh-rlhf --dataset` where there is network"
    )


def test_a_revision_not_in_the_cache_offline(hf_cache):
    cache_repo(hf_cache, "Anthropic/hh-rlhf", HH_FILES)
    with pytest.raises(HubDatasetError) as error:
        hub_dataset_files("Anthropic/hh-rlhf", revision="v2.0")
    assert str(error.value) == (
        f"Anthropic/hh-rlhf: revision 'v2.0' not in the Hugging Face cache ({hf_cache}; cached: main) and "
        f"HF_HUB_OFFLINE=1; run `dpokit download Anthropic/hh-rlhf --dataset --revision v2.0` where there is network"
    )


def test_a_subset_that_does_not_exist_lists_the_folders(hf_cache):
    cache_repo(hf_cache, "Anthropic/hh-rlhf", HH_FILES)
    with pytest.raises(HubDatasetError) as error:
        hub_dataset_files("Anthropic/hh-rlhf", subset="helpful-bas")
    assert str(error.value) == (
        f"Anthropic/hh-rlhf: no subset folder 'helpful-bas'; the cache ({hf_cache}) has folders: harmless-base, "
        f"helpful-base, red-team-attempts; if the Hub has more, run "
        f"`dpokit download Anthropic/hh-rlhf --dataset --subset helpful-bas` where there is network"
    )


def test_a_split_only_in_an_unsupported_format(hf_cache):
    cache_repo(hf_cache, "someone/csv-prefs", {"train.csv": b"prompt,chosen,rejected\n"})
    with pytest.raises(HubDatasetError) as error:
        hub_dataset_files("someone/csv-prefs")
    assert str(error.value) == (
        "someone/csv-prefs split 'train': no file in a format dpokit reads (train.csv); "
        "it reads .json, .json.gz, .jsonl, .jsonl.gz, .parquet"
    )


def test_path_and_hub_are_exclusive():
    with pytest.raises(DpokitError, match=r"give path= \(a local file\) or hub= .* not both"):
        dataset(path="pairs.jsonl", hub="Anthropic/hh-rlhf")
    with pytest.raises(DpokitError, match=r"give path= \(a local preference file\) or hub="):
        dataset()
    with pytest.raises(DpokitError, match=r"split=, revision= only apply with hub="):
        dataset(path="pairs.jsonl", split="test", revision="v1")


# --- the command line -------------------------------------------------------------------------------------


@pytest.mark.subprocess
def test_cli_validate_hub_dataset_offline(hf_cache):
    cache_repo(hf_cache, "Anthropic/hh-rlhf", HH_FILES)
    env = {**os.environ, "HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "dpokit.cli", "validate", "--hub", "Anthropic/hh-rlhf"]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "Anthropic/hh-rlhf split 'train': 3 records: 3 valid pairs, 0 invalid, hh_rlhf format" in result.stdout
    result = subprocess.run([*command, "--split", "nope"], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("dpokit: error: Anthropic/hh-rlhf split 'nope': no such split;")


def test_cli_pack_and_download_a_hub_dataset(hf_cache, tmp_path, capsys):
    snapshot = cache_repo(hf_cache, "Anthropic/hh-rlhf", HH_FILES)
    out = tmp_path / "packed.jsonl"
    args = ["pack", "--hub", "Anthropic/hh-rlhf", str(out), "--max-seq-len", "64", "--pack-size", "256"]
    assert cli_main([*args, "--split", "test"]) == 0
    assert out.is_file() and "Anthropic/hh-rlhf split 'test': 2 pairs" in capsys.readouterr().out
    assert cli_main([*args[:3], "in.jsonl", *args[3:]]) == 2
    assert "with --hub REPO give only OUTPUT" in capsys.readouterr().err

    assert cli_main(["download", "Anthropic/hh-rlhf", "--dataset"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"downloaded dataset Anthropic/hh-rlhf to {snapshot}",
        "splits: red_team_attempts (1 file), test (2 files), train (2 files)",
    ]
    path, splits = download_hub_dataset("Anthropic/hh-rlhf", subset="helpful-base")
    assert path == snapshot and splits == {"test": 1, "train": 1}
