"""Packers (property tests against their invariants, FFD against a brute-force optimum), packing
stats, the packed batch layout, online packed datasets and the offline `dpokit pack` round trip."""

import itertools
import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpokit.cli import main as cli_main
from dpokit.data import (
    IGNORE_INDEX,
    collate_packed,
    first_fit_decreasing,
    first_fit_shuffle,
    load_packed_dataset,
    pack_preference_dataset,
    packing_stats,
    pair_length,
)
from dpokit.data.packing import first_fit
from dpokit.errors import DpokitError

lengths_and_capacity = st.integers(1, 64).flatmap(
    lambda cap: st.tuples(st.lists(st.integers(1, cap), max_size=80), st.just(cap))
)


def check_packing(packs, lengths, capacity):
    placed = sorted(i for pack in packs for i in pack)
    assert placed == list(range(len(lengths)))  # every pair exactly once (pairs are atomic items)
    assert all(pack and sum(lengths[i] for i in pack) <= capacity for pack in packs)


def naive_first_fit(order, lengths, capacity):
    """The O(N * packs) scan the segment tree replaces."""
    packs, room = [], []
    for i in order:
        for b, r in enumerate(room):
            if r >= lengths[i]:
                packs[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            packs.append([i])
            room.append(capacity - lengths[i])
    return packs


@settings(max_examples=150, deadline=None)
@given(lengths_and_capacity, st.integers(0, 2**16))
def test_packers_place_every_pair_once_within_capacity_as_naive_first_fit(case, seed):
    lengths, capacity = case
    ffd = first_fit_decreasing(lengths, capacity)
    ffs = first_fit_shuffle(lengths, capacity, seed=seed)
    for packs in (ffd, ffs):
        check_packing(packs, lengths, capacity)
    # The tree walk makes exactly the choices of the linear scan.
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    assert ffd == naive_first_fit(order, lengths, capacity)
    shuffled = list(range(len(lengths)))
    random.Random(seed).shuffle(shuffled)
    assert ffs == naive_first_fit(shuffled, lengths, capacity)
    # First fit never leaves two packs at most half full.
    assert sum(2 * sum(lengths[i] for i in p) <= capacity for p in ffd) <= 1


def optimal_bins(lengths, capacity):
    """Fewest bins by trying every assignment (tiny inputs only)."""
    best = len(lengths)
    for assignment in itertools.product(range(len(lengths)), repeat=len(lengths)):
        loads = {}
        for item, b in zip(lengths, assignment):
            loads[b] = loads.get(b, 0) + item
        if max(loads.values()) <= capacity:
            best = min(best, len(loads))
    return best


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 10), min_size=1, max_size=5))
def test_ffd_within_one_bin_of_the_optimum_on_small_cases(lengths):
    packs = first_fit_decreasing(lengths, 10)
    assert len(packs) <= optimal_bins(lengths, 10) + 1


def test_ffd_known_case_and_stats():
    lengths = [7, 5, 4, 3, 3, 2]  # optimum: (7,3) (5,3,2) (4) -> 3 bins of 10
    packs = first_fit_decreasing(lengths, 10)
    assert packs == [[0, 3], [1, 2], [4, 5]]
    stats = packing_stats(packs, lengths, 10)
    assert (stats.packs, stats.pairs, stats.tokens) == (3, 6, 24)
    assert stats.occupancy == pytest.approx(0.8) and stats.pairs_per_pack == 2.0


def test_a_pair_longer_than_the_pack_is_an_error():
    with pytest.raises(DpokitError, match="pair 1 needs 11 tokens, more than the pack size 10"):
        first_fit([0, 1], [3, 11], 10)


def item(p, c, r):
    return {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}


def test_unshared_packed_layout():
    a, b = item([1, 2], [3, 4], [5]), item([6], [7], [8, 9])
    batch = collate_packed([[a, b]], pad_id=0, pack_size=16)
    row = {
        k: getattr(batch, k)[0].tolist()
        for k in ("input_ids", "position_ids", "document_ids", "labels", "sequence_ids")
    }
    X = IGNORE_INDEX
    assert row["input_ids"] == [1, 2, 3, 4, 1, 2, 5, 6, 7, 6, 8, 9] + [0] * 4
    assert row["position_ids"] == [0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 2] + [0] * 4
    assert row["document_ids"] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3] + [-1] * 4
    assert row["labels"] == [X, 3, 4, X, X, 5, X, 7, X, 8, 9, X] + [X] * 4
    # pair 0 chosen = 0, pair 1 chosen = 1, pair 0 rejected = 2, pair 1 rejected = 3
    assert row["sequence_ids"] == [-1, 0, 0, -1, -1, 2, -1, 1, -1, 3, 3, -1] + [-1] * 4
    assert batch.branch_ids.eq(0).all() and batch.num_pairs == 2 and batch.num_tokens == 12


def test_prefix_shared_layout():
    a = item([1, 2, 3], [4, 5], [6])
    batch = collate_packed([[a]], pad_id=0, prefix_sharing=True)
    X = IGNORE_INDEX
    assert batch.input_ids[0].tolist() == [1, 2, 3, 4, 5, 3, 6]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 2, 3]
    assert batch.branch_ids[0].tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert batch.labels[0].tolist() == [X, X, 4, 5, X, 6, X]
    assert batch.sequence_ids[0].tolist() == [-1, -1, 0, 0, -1, 1, -1]
    assert pair_length(a, prefix_sharing=True) == 7 and pair_length(a) == 9


def test_collate_packed_refuses_overfull_pack_and_carries_rewards():
    a = {**item([1], [2], [3]), "chosen_reward": 1.0, "rejected_reward": 0.0}
    with pytest.raises(ValueError, match="more than pack_size=3"):
        collate_packed([[a]], pad_id=0, pack_size=3)
    batch = collate_packed([[a], [a]], pad_id=0, pack_size=4)
    assert batch.chosen_reward.tolist() == [1.0, 1.0] and batch.input_ids.shape == (2, 4)


def random_pairs(n, seed=0):
    rng = random.Random(seed)
    ids = lambda lo, hi: [rng.randrange(1, 50) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    return [item(ids(1, 20), ids(1, 15), ids(1, 15)) for _ in range(n)]


@pytest.mark.parametrize("algorithm", ["ffd", "ffs"])
@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_online_packed_dataset_and_offline_file_round_trip(tmp_path, algorithm, prefix_sharing):
    pairs = random_pairs(60)
    packed = pack_preference_dataset(pairs, pack_size=128, algorithm=algorithm, prefix_sharing=prefix_sharing)
    check_packing(packed.packs, packed.lengths, 128)
    assert packed.stats.pairs == 60 and 0 < packed.stats.occupancy <= 1
    loader = torch.utils.data.DataLoader(
        packed,
        batch_size=3,
        collate_fn=lambda packs: collate_packed(packs, pad_id=0, pack_size=128, prefix_sharing=prefix_sharing),
    )
    assert sum(batch.num_pairs for batch in loader) == 60
    path, stats_path = packed.save(tmp_path / "packed.jsonl")
    loaded = load_packed_dataset(path)
    assert [loaded[i] for i in range(len(loaded))] == [packed[i] for i in range(len(packed))]
    assert loaded.prefix_sharing == prefix_sharing and loaded.stats == packed.stats
    assert json.loads(stats_path.read_text())["occupancy"] == pytest.approx(packed.stats.occupancy)


def test_ffs_repacks_each_epoch():
    packed = pack_preference_dataset(random_pairs(40), pack_size=100, algorithm="ffs", seed=1)
    first = [list(p) for p in packed.packs]
    packed.set_epoch(1)
    assert packed.packs != first
    check_packing(packed.packs, packed.lengths, 100)


def test_loading_a_corrupt_packed_file_names_the_line(tmp_path):
    packed = pack_preference_dataset(random_pairs(10), pack_size=128)
    path, stats_path = packed.save(tmp_path / "p.jsonl")
    lines = path.read_text().splitlines()
    lines[1] = json.dumps({"pairs": [item([1] * 100, [2] * 20, [3] * 20)]})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DpokitError, match=r"p.jsonl:2: field 'pairs': 240 tokens, more than the pack size 128"):
        load_packed_dataset(path)
    lines[1] = json.dumps({"pairs": [{"prompt_ids": [1], "chosen_ids": "x", "rejected_ids": [2]}]})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DpokitError, match=r"p.jsonl:2: field 'pairs\[0\]'.chosen_ids: expected a non-empty list"):
        load_packed_dataset(path)


def test_dpokit_pack_command(tmp_path, capsys):
    source = tmp_path / "d.jsonl"
    source.write_text(
        "".join(
            json.dumps({"prompt": f"q{i}", "chosen": "yes" * (i % 5 + 1), "rejected": "no"}) + "\n" for i in range(30)
        )
    )
    out = tmp_path / "packed.jsonl"
    assert (
        cli_main(["pack", str(source), str(out), "--max-seq-len", "64", "--pack-size", "256", "--prefix-sharing"]) == 0
    )
    loaded = load_packed_dataset(out)
    assert loaded.prefix_sharing and loaded.stats.pairs == 30 and "occupancy" in capsys.readouterr().out
    assert cli_main(["pack", str(source), str(out), "--max-seq-len", "64", "--pack-size", "100"]) == 2
    assert "must be at least 2 x --max-seq-len" in capsys.readouterr().err
    with source.open("a") as f:
        f.write(json.dumps({"prompt": "q", "chosen": "", "rejected": "no"}) + "\n")
    assert cli_main(["pack", str(source), str(out), "--max-seq-len", "64", "--pack-size", "256"]) == 2
    assert "d.jsonl:31: field 'chosen': empty response (--skip-invalid skips such records" in capsys.readouterr().err
    assert cli_main(["pack", str(source), str(out), "--max-seq-len", "64", "--pack-size", "256", "--skip-invalid"]) == 0
