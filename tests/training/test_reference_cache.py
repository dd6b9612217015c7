"""The precomputed reference: cached log-probs equal a direct forward, are reused by a later run,
and anything that changes the numbers (weights, data, settings) changes the cache key."""

from __future__ import annotations

import pytest
import torch

from _distributed_helpers import build_model, collate, synthetic_pairs
from dpokit.distributed.fsdp import state_dict_tensors
from dpokit.distributed.sampler import collate_with_index
from dpokit.training.forward import policy_logps
from dpokit.training.reference_cache import (
    TensorFingerprint,
    dataset_fingerprint,
    precompute_reference_logps,
    reference_cache_key,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add contention
    yield
    torch.set_num_threads(threads)


def _weights_key(model) -> str:
    fingerprint = TensorFingerprint()
    for _ in fingerprint.wrap(state_dict_tensors(model)):
        pass
    return fingerprint.hexdigest()


def test_precomputed_tables_match_a_direct_forward_and_are_reused(tmp_path):
    torch.manual_seed(0)
    model = build_model()
    splits = {"train": synthetic_pairs(11, seed=1), "validation": synthetic_pairs(5, seed=2)}
    key = reference_cache_key(
        weights=_weights_key(model),
        datasets={n: dataset_fingerprint(d) for n, d in splits.items()},
        settings={"average_logps": False},
    )
    tables, cached = precompute_reference_logps(
        model, splits, collate, cache_dir=tmp_path, key=key, batch_size=4, device=torch.device("cpu")
    )
    assert not cached and len(list(tmp_path.glob("reference_logps-*.pt"))) == 1

    # Any batch of the training split looks up what a direct forward of the same pairs computes.
    batch = collate_with_index(splits["train"], [7, 2, 9], collate)
    with torch.no_grad():
        direct = policy_logps(model, batch)
    looked_up = tables["train"].logps(batch)
    torch.testing.assert_close(looked_up.chosen, direct.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(looked_up.rejected, direct.rejected, atol=1e-5, rtol=0)

    # A later run with the same key reads the file (a different model proves no forward happens).
    again, cached = precompute_reference_logps(
        build_model(), splits, collate, cache_dir=tmp_path, key=key, batch_size=4, device=torch.device("cpu")
    )
    assert cached
    for name in splits:
        assert torch.equal(again[name].chosen, tables[name].chosen)
        assert torch.equal(again[name].rejected, tables[name].rejected)


def test_cache_key_changes_with_weights_data_and_settings():
    torch.manual_seed(0)
    model = build_model()
    data = synthetic_pairs(6)
    base = dict(
        weights=_weights_key(model), datasets={"train": dataset_fingerprint(data)}, settings={"average_logps": False}
    )
    key = reference_cache_key(**base)
    assert reference_cache_key(**base) == key
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    changed_data = [dict(p) for p in data]
    changed_data[3] = {**data[3], "chosen_ids": data[3]["chosen_ids"] + [1]}
    for changed in (
        dict(base, weights=_weights_key(model)),
        dict(base, datasets={"train": dataset_fingerprint(changed_data)}),
        dict(base, settings={"average_logps": True}),
    ):
        assert reference_cache_key(**changed) != key
