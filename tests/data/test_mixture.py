"""Weighted mixtures of preference training sets: composition, up/downsampling, determinism, the
errors, and the mixture through everything a recipe does with a train set (training_set, packing,
the sampler and its resume, check_gt_rewards, the precomputed-reference cache key)."""

import json
import os
import subprocess
import sys
from collections import Counter
from functools import partial

import pytest
import torch

from dpokit.data import (
    MixedPreferenceDataset,
    PreferenceDataset,
    bundled_preference_dataset,
    byte_tokenizer,
    check_enough_pairs,
    load_packed_dataset,
    mix_preference_datasets,
    mixture_counts,
    pack_preference_dataset,
    training_set,
)
from dpokit.distributed.sampler import GlobalBatchSampler, PackedGlobalBatchSampler, training_sampler
from dpokit.errors import DpokitError
from dpokit.losses import dpo_loss, rpo_sq_loss
from dpokit.training.forward import check_gt_rewards
from dpokit.training.reference_cache import reference_logps_key

TOKENIZER = byte_tokenizer()


def write_pairs(path, prefix: str, n: int, *, rewards: bool = False):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            record = {"prompt": f"{prefix} prompt {i}", "chosen": f"{prefix} good {i}", "rejected": f"{prefix} bad {i}"}
            if rewards:
                record |= {"chosen_reward": 1.0 + i, "rejected_reward": 0.5}
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture
def make_sources(tmp_path):
    """sizes, e.g. a=16, b=4 -> {"a": PreferenceDataset of 16 pairs, "b": ...}, built afresh per call."""

    def make(rewards: frozenset = frozenset(), **sizes):
        return {
            name: PreferenceDataset(
                write_pairs(tmp_path / f"{name}.jsonl", name, n, rewards=name in rewards), TOKENIZER, max_seq_len=64
            )
            for name, n in sizes.items()
        }

    return make


def table(mixture: MixedPreferenceDataset) -> list[tuple[str, int]]:
    return [mixture.locate(i) for i in range(len(mixture))]


def plain_pairs(prefix: str, n: int) -> list[dict]:
    """Tokenized-looking pairs without a file (the mixture takes any sequence of pair dicts)."""
    return [
        {"prompt_ids": [1, i % 200], "chosen_ids": [2], "rejected_ids": [3], "id": f"{prefix}{i}"} for i in range(n)
    ]


# --- composition -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights, size, expected",
    [
        ({"a": 0.7, "b": 0.3}, 1000, {"a": 700, "b": 300}),
        ({"a": 7, "b": 3}, 10, {"a": 7, "b": 3}),
        ({"a": 1, "b": 1, "c": 1}, 10, {"a": 4, "b": 3, "c": 3}),  # tie: the earlier source gets the extra one
        ({"a": 0.1, "b": 0.2, "c": 0.7}, 7, {"a": 1, "b": 1, "c": 5}),  # quotas 0.7, 1.4, 4.9
        ({"a": 1, "b": 1000}, 5, {"a": 0, "b": 5}),
        ({"a": 2.5, "b": 2.5, "c": 5}, 3, {"a": 1, "b": 1, "c": 1}),  # quotas 0.75, 0.75, 1.5
        ({"a": 1, "b": 1, "c": 2}, 2, {"a": 1, "b": 0, "c": 1}),  # quotas 0.5, 0.5, 1: tie, a first
    ],
)
def test_counts_are_largest_remainder_shares_summing_to_size(weights, size, expected):
    counts = mixture_counts(weights, size)
    assert counts == expected
    assert sum(counts.values()) == size


def test_mixture_takes_its_composition_from_each_source(make_sources):
    sources = make_sources(a=16, b=4)
    mixture = mix_preference_datasets(sources, {"a": 0.7, "b": 0.3}, size=10)
    assert len(mixture) == 10 and mixture.composition == {"a": 7, "b": 3}
    assert Counter(mixture.source(i) for i in range(10)) == {"a": 7, "b": 3}
    # Downsampled a (7 of 16) and upsampled b (3 of 4 here): without replacement, no item twice.
    for name in "ab":
        taken = [j for source, j in table(mixture) if source == name]
        assert len(set(taken)) == len(taken)


def test_default_size_is_the_sum_of_the_sources(make_sources):
    mixture = mix_preference_datasets(make_sources(a=16, b=4), {"a": 1, "b": 3})
    assert len(mixture) == 20 and mixture.composition == {"a": 5, "b": 15}
    assert mixture.stats.pairs == 20


def test_upsampling_meets_every_item_once_before_any_twice(make_sources):
    sources = make_sources(a=8, b=3)
    mixture = mix_preference_datasets(sources, {"a": 1, "b": 1}, size=22, seed=5)
    assert mixture.composition == {"a": 11, "b": 11}
    for name, length in (("a", 8), ("b", 3)):
        taken = [j for source, j in table(mixture) if source == name]  # in mixture order
        passes = [taken[k : k + length] for k in range(0, len(taken), length)]
        assert all(sorted(p) == list(range(length)) for p in passes[:-1])  # each full pass: every item once
        assert len(set(passes[-1])) == len(passes[-1])  # the partial last pass repeats nothing
        assert passes[0] != passes[1]  # a fresh permutation per pass
        counts = Counter(taken)
        assert max(counts.values()) - min(counts.values()) <= 1


def test_items_are_the_sources_items(make_sources):
    sources = make_sources(a=6, b=5, c=4)
    mixture = mix_preference_datasets(sources, {"a": 1, "b": 2, "c": 3}, size=30, seed=3)
    for i in range(len(mixture)):
        name, j = mixture.locate(i)
        assert mixture.source(i) == name
        assert mixture[i] is sources[name][j]
    assert list(mixture) == [mixture[i] for i in range(len(mixture))]
    assert mixture[-1] is mixture[len(mixture) - 1]
    with pytest.raises(IndexError):
        mixture[len(mixture)]


def test_summary_names_each_source_and_its_sampling():
    sources = {"hh": plain_pairs("hh", 1600), "uf": plain_pairs("uf", 200)}
    mixture = mix_preference_datasets(sources, {"hh": 0.7, "uf": 0.3}, size=1000)
    assert mixture.stats.summary() == (
        "mixture of 2 sets: hh 700 (weight 0.7, 0.44x of 1,600), uf 300 (weight 0.3, 1.5x of 200)"
    )


def test_summary_carries_the_sources_own_summaries(make_sources):
    sources = make_sources(a=16, b=4)
    mixture = mix_preference_datasets(sources, {"a": 0.7, "b": 0.3}, size=10)
    assert mixture.stats.summary() == (
        "mixture of 2 sets: a 7 (weight 0.7, 0.44x of 16), b 3 (weight 0.3, 0.75x of 4) "
        "(a: 16 pairs, 0 skipped, 0 truncated, standard format; b: 4 pairs, 0 skipped, 0 truncated, standard format)"
    )
    assert mixture.files == sources["a"].files + sources["b"].files
    assert mixture.path == "mixture of a, b"


# --- determinism -------------------------------------------------------------------------------


def test_same_inputs_and_seed_give_the_same_table_whatever_the_global_rng(make_sources):
    torch.manual_seed(1)
    first = mix_preference_datasets(make_sources(a=16, b=4), {"a": 0.7, "b": 0.3}, seed=11)
    torch.manual_seed(2)
    torch.rand(100)
    again = mix_preference_datasets(make_sources(a=16, b=4), {"a": 0.7, "b": 0.3}, seed=11)
    assert table(first) == table(again)
    assert first.fingerprint == again.fingerprint
    other = mix_preference_datasets(make_sources(a=16, b=4), {"a": 0.7, "b": 0.3}, seed=12)
    assert table(other) != table(first)
    assert other.composition == first.composition


def test_table_is_the_same_in_another_process():
    code = (
        "import json; from dpokit.data import mix_preference_datasets; "
        "src = {n: [{'prompt_ids': [1], 'chosen_ids': [2], 'rejected_ids': [3]}] * k for n, k in (('a', 50), ('b', 7))}; "
        "m = mix_preference_datasets(src, {'a': 2, 'b': 1}, seed=9, size=40); "
        "print(json.dumps([m.locate(i) for i in range(len(m))]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    pair = {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}
    here = mix_preference_datasets({"a": [pair] * 50, "b": [pair] * 7}, {"a": 2, "b": 1}, seed=9, size=40)
    assert [tuple(entry) for entry in json.loads(out)] == table(here)


def test_fingerprint_changes_with_any_source_weight_seed_or_size(tmp_path, make_sources):
    weights = {"a": 0.7, "b": 0.3}
    base = mix_preference_datasets(make_sources(a=16, b=4), weights, seed=0, size=10).fingerprint
    variants = [
        mix_preference_datasets(make_sources(a=16, b=4), weights, seed=1, size=10),
        mix_preference_datasets(make_sources(a=16, b=4), weights, seed=0, size=11),
        mix_preference_datasets(make_sources(a=16, b=4), {"a": 0.6, "b": 0.4}, seed=0, size=10),
        mix_preference_datasets(make_sources(a=17, b=4), weights, seed=0, size=10),
    ]
    assert len({base, *(m.fingerprint for m in variants)}) == 5
    # One changed text in a source (same lengths, same table) is a different mixture too.
    sources = make_sources(a=16, b=4)
    lines = (tmp_path / "b.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"prompt": "edited", "chosen": "x", "rejected": "y"})
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    sources["b"] = PreferenceDataset(tmp_path / "b.jsonl", TOKENIZER, max_seq_len=64)
    assert mix_preference_datasets(sources, weights, seed=0, size=10).fingerprint != base
    # Weights in the same proportion are the same mixture.
    same = mix_preference_datasets(make_sources(a=16, b=4), {"a": 0.7, "b": 0.3}, seed=0, size=10)
    assert same.fingerprint == base


def test_reference_cache_key_tells_mixtures_apart(make_sources):
    def key(mixture):
        settings = dict(weights="w", average_logps=False, ld_alpha=None, dtype="float32", param_dtype=None)
        return reference_logps_key(datasets={"train": mixture}, **settings)

    weights = {"a": 0.7, "b": 0.3}
    base = key(mix_preference_datasets(make_sources(a=16, b=4), weights, seed=0))
    assert key(mix_preference_datasets(make_sources(a=16, b=4), weights, seed=0)) == base
    assert key(mix_preference_datasets(make_sources(a=16, b=4), weights, seed=1)) != base
    assert key(mix_preference_datasets(make_sources(a=16, b=4), {"a": 0.5, "b": 0.5}, seed=0)) != base


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"a": 1, "b": -1}, "train_datasets.b.weight: -1 is not a number > 0"),
        ({"a": 0, "b": 1}, "train_datasets.a.weight: 0 is not a number > 0"),
        ({"a": 1, "b": float("nan")}, "train_datasets.b.weight: nan is not a number > 0"),
        ({"a": float("inf"), "b": 1}, "train_datasets.a.weight: inf is not a number > 0"),
        ({"a": "0.5", "b": 1}, "train_datasets.a.weight: '0.5' is not a number > 0"),
        ({"a": True, "b": 1}, "train_datasets.a.weight: True is not a number > 0"),
        ({"a": 1}, "train_datasets.b.weight: missing (a number > 0)"),
        ({"a": 1, "b": 1, "c": 1}, "train_datasets.c: has a weight but no dataset (datasets: a, b)"),
    ],
)
def test_bad_weights_are_one_line_errors_naming_the_source(weights, message):
    sources = {"a": plain_pairs("a", 4), "b": plain_pairs("b", 4)}
    with pytest.raises(DpokitError) as error:
        mix_preference_datasets(sources, weights)
    assert str(error.value) == message


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"size": 0}, "train_datasets: size 0 is not a whole number > 0"),
        ({"size": 2.5}, "train_datasets: size 2.5 is not a whole number > 0"),
        ({"seed": "x"}, "train_datasets: seed 'x' is not a whole number"),
    ],
)
def test_bad_size_or_seed(kwargs, message):
    with pytest.raises(DpokitError) as error:
        mix_preference_datasets({"a": plain_pairs("a", 4)}, {"a": 1}, **kwargs)
    assert str(error.value) == message


def test_no_datasets_an_empty_one_or_a_packed_one_are_errors(tmp_path, make_sources):
    with pytest.raises(DpokitError) as error:
        mix_preference_datasets({}, {})
    assert str(error.value) == "train_datasets: no datasets to mix"
    with pytest.raises(DpokitError) as error:
        mix_preference_datasets({"a": plain_pairs("a", 4), "b": []}, {"a": 1, "b": 1})
    assert str(error.value) == "train_datasets.b: an empty dataset cannot supply 2 pairs"
    packed_file = tmp_path / "packed.jsonl"
    pack_preference_dataset(make_sources(a=4)["a"], pack_size=256).save(packed_file)
    with pytest.raises(DpokitError) as error:
        mix_preference_datasets({"a": plain_pairs("a", 4), "p": load_packed_dataset(packed_file)}, {"a": 1, "p": 1})
    assert str(error.value) == (
        "train_datasets.p.dataset: is packed (a `dpokit pack` file); mix unpacked datasets "
        "and set packing to pack the mixture"
    )


# --- through the training path -----------------------------------------------------------------

SAMPLER = dict(pad_id=TOKENIZER.pad_id, batch_size=2, gradient_accumulation_steps=2, rank=0, world_size=1, seed=7)


def run_steps(sampler, n: int) -> list[list[torch.Tensor]]:
    return [[batch.input_ids for batch in sampler.next_step()] for _ in range(n)]


def test_trains_through_training_set_and_the_sampler(make_sources):
    mixture = mix_preference_datasets(make_sources(a=16, b=4), {"a": 0.5, "b": 0.5}, seed=1)
    train, packed = training_set(mixture, packer=None, ld_alpha=0.5)
    assert train is mixture and not packed
    check_enough_pairs(train, 4)
    sampler = training_sampler(train, **SAMPLER)
    assert isinstance(sampler, GlobalBatchSampler) and sampler.steps_per_epoch == 5
    for _ in range(3):
        for batch in sampler.next_step():
            pairs = [mixture[i] for i in batch.pair_index.tolist()]
            assert batch.input_ids[0, : len(pairs[0]["prompt_ids"])].tolist() == pairs[0]["prompt_ids"]
    with pytest.raises(DpokitError) as error:
        check_enough_pairs(train, 64)
    assert str(error.value) == "mixture of a, b: 20 pairs, fewer than one global batch of 64 pairs"


def test_packs_through_training_set_and_the_packed_sampler(make_sources):
    mixture = mix_preference_datasets(make_sources(a=16, b=4), {"a": 0.5, "b": 0.5}, seed=1)
    packer = partial(pack_preference_dataset, pack_size=256, prefix_sharing=True)
    train, packed = training_set(mixture, packer=packer)
    assert packed and train.pairs is mixture and train.path == mixture.path
    assert sorted(i for pack in train.packs for i in pack) == list(range(len(mixture)))
    sampler = training_sampler(train, **{**SAMPLER, "batch_size": 1})
    assert isinstance(sampler, PackedGlobalBatchSampler)
    batches = sampler.next_step()
    for batch in batches:
        assert batch.num_pairs == len(batch.pair_index)
        first = mixture[int(batch.pair_index[0])]
        assert batch.input_ids[0, : len(first["prompt_ids"])].tolist() == first["prompt_ids"]
    with pytest.raises(DpokitError, match="ld_alpha is set but the training data is packed"):
        training_set(mixture, packer=packer, ld_alpha=0.5)


@pytest.mark.parametrize("packing", [False, True])
def test_a_resumed_sampler_on_a_rebuilt_mixture_continues_with_the_same_pairs(make_sources, packing):
    def build():
        mixture = mix_preference_datasets(make_sources(a=16, b=4), {"a": 0.5, "b": 0.5}, seed=3)
        packer = partial(pack_preference_dataset, pack_size=128) if packing else None
        train, _ = training_set(mixture, packer=packer)
        return training_sampler(train, **{**SAMPLER, "batch_size": 1 if packing else 2})

    first = build()
    run_steps(first, 3)
    state = first.state_dict()
    expected = run_steps(first, 2 * first.steps_per_epoch)  # on past an epoch boundary
    resumed = build()
    resumed.load_state_dict(state)
    got = run_steps(resumed, 2 * resumed.steps_per_epoch)
    assert len(got) == len(expected) and all(len(a) == len(b) for a, b in zip(expected, got))
    assert all(torch.equal(a, b) for step_a, step_b in zip(expected, got) for a, b in zip(step_a, step_b))
    from_start = run_steps(build(), 1)[0]
    assert not all(torch.equal(a, b) for a, b in zip(from_start, got[0]))  # the position was what resumed


def test_check_gt_rewards_sees_the_mixtures_pairs(make_sources):
    both = mix_preference_datasets(make_sources(rewards=frozenset("ab"), a=8, b=4), {"a": 1, "b": 1})
    check_gt_rewards(rpo_sq_loss, both)
    half = mix_preference_datasets(make_sources(rewards=frozenset("a"), a=8, b=4), {"a": 1, "b": 1})
    check_gt_rewards(dpo_loss, half)  # a loss without rewards does not look
    with pytest.raises(DpokitError, match="only 6 of 12 pairs of train_dataset carry them"):
        check_gt_rewards(rpo_sq_loss, half)


def test_mixes_the_bundled_task_with_a_file(make_sources):
    bundled = bundled_preference_dataset(name="case_following", split="train", tokenizer=TOKENIZER, max_seq_len=128)
    sources = {"case": bundled, **make_sources(extra=10)}
    mixture = mix_preference_datasets(sources, {"case": 0.9, "extra": 0.1}, size=200, seed=0)
    assert mixture.composition == {"case": 180, "extra": 20}
    assert mixture.stats.summary().startswith(
        f"mixture of 2 sets: case 180 (weight 0.9, 0.04x of {len(bundled):,}), extra 20 (weight 0.1, 2x of 10)"
    )
