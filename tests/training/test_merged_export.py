"""The merged LoRA export keeps what was trained: merged in fp32 on the stored base, saved in the
chosen dtype, and what a narrower dtype rounds away is counted and measured."""

from __future__ import annotations

import pytest
import torch

from dpokit.models import MergeRounding, adapter_params, cast_base, load_hf_checkpoint, merge_update
from dpokit.training import save_lora_checkpoint
from hf_fixtures import hf_logits, write_hf_checkpoint

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_merge_update_counts_updates_below_the_saved_dtype_resolution():
    base = torch.ones(4, 8, dtype=torch.bfloat16)  # bf16 spacing at 1.0 is 2**-7
    lora_b, lora_a = torch.zeros(4, 1), torch.ones(1, 8)
    lora_b[0], lora_b[1] = 1e-4, 0.05  # row 0: below half a bf16 step; row 1: several steps; rows 2-3: no update
    rounding = MergeRounding()
    merged = merge_update(base, lora_a, lora_b, 1.0, dtype=torch.bfloat16, rounding=rounding)
    assert (rounding.updated, rounding.dropped) == (16, 8)
    assert torch.equal(merged[0], base[0]) and torch.all(merged[1] > 1)
    exact = MergeRounding()
    merged32 = merge_update(base, lora_a, lora_b, 1.0, dtype=torch.float32, rounding=exact)
    assert (exact.updated, exact.dropped) == (16, 0)
    assert torch.allclose(merged32[0].double(), torch.full((8,), 1 + 1e-4, dtype=torch.float64), rtol=0, atol=1e-7)


@pytest.fixture
def trained(tmp_path):
    """An fp32 HF folder, loaded with LoRA, base cast to bf16 as the recipe does, adapters 'trained'
    (small random updates, as a few steps of DPO give)."""
    reference = write_hf_checkpoint("llama3_gqa", tmp_path / "base")
    model = cast_base(
        load_hf_checkpoint(tmp_path / "base", lora={"lora_targets": TARGETS, "lora_rank": 4, "lora_alpha": 8.0}),
        torch.bfloat16,
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in adapter_params(model).items():
            p.normal_(0, 0.02 if "lora_b" in name else 0.3)
    return model.eval(), reference, tmp_path


def test_fp32_export_equals_peft_base_plus_adapter_on_an_fp32_base_trained_in_bf16(trained):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model, reference, tmp_path = trained
    export = save_lora_checkpoint(model, tmp_path / "final", source_dir=tmp_path / "base")
    assert export.dtype == torch.float32 and export.max_logit_change is None
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final", dtype=torch.float32).eval()
    assert merged.dtype == torch.float32
    adapted = peft.PeftModel.from_pretrained(reference, tmp_path / "final" / "adapter").eval()
    tokens = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    diff = (hf_logits(merged, tokens) - hf_logits(adapted, tokens)).abs().max().item()
    assert diff <= 1e-4, diff
    # the frozen weights are the stored fp32 ones, not the bf16 copies the model trained with
    stored = reference.state_dict()
    saved = merged.state_dict()
    assert torch.equal(saved["model.norm.weight"], stored["model.norm.weight"])
    assert torch.equal(saved["model.embed_tokens.weight"], stored["model.embed_tokens.weight"])


def test_bf16_export_reports_the_dropped_updates_and_the_logit_change_it_makes(trained):
    transformers = pytest.importorskip("transformers")
    model, _, tmp_path = trained
    probe = [torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(n)) for n in (17, 30)]
    export = save_lora_checkpoint(
        model, tmp_path / "final16", source_dir=tmp_path / "base", dtype=torch.bfloat16, probe_sequences=probe
    )
    exact = save_lora_checkpoint(model, tmp_path / "final32", source_dir=tmp_path / "base")
    assert 0 < export.rounding.dropped < export.rounding.updated
    assert export.rounding.updated == exact.rounding.updated
    assert exact.rounding.dropped < export.rounding.dropped / 100
    assert "rounded back" in export.summary() and "save_dtype=fp32" in export.summary()
    # The reported change is the one transformers sees between the two folders.
    m16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final16", dtype=torch.float32).eval()
    m32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final32", dtype=torch.float32).eval()
    seen = torch.cat([(hf_logits(m16, ids[None]) - hf_logits(m32, ids[None])).abs().flatten() for ids in probe])
    assert export.max_logit_change > 0
    assert export.max_logit_change == pytest.approx(seen.max().item(), rel=1e-3, abs=1e-5)
    assert export.mean_logit_change == pytest.approx(seen.mean().item(), rel=1e-3, abs=1e-6)
