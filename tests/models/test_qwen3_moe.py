"""Qwen3-MoE against transformers: LoRA through PEFT, the router's load-balancing loss, what the
family refuses, and the MoE MLP against a dense all-experts computation."""

import json

import pytest
import torch

import dpokit.models as models
from dpokit.data.collate import collate_preference_pairs
from dpokit.models import CheckpointError, adapter_params, hf_config_from_model, model_from_hf_config
from dpokit.models.hf_checkpoint import load_hf_checkpoint, load_peft_adapter, save_hf_checkpoint, save_peft_adapter
from dpokit.models.moe import MoE, SparseMoE, active_parameter_fractions, route_statistics, sparse_layers
from dpokit.training.forward import policy_logps
from dpokit.training.router import routed_token_weights
from dpokit.training.throughput import flops_per_token
from hf_fixtures import FAMILIES, hf_logits, write_hf_checkpoint

transformers = pytest.importorskip("transformers")
TOKENS = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MOE_FIXTURES = [name for name, (cls, _) in FAMILIES.items() if cls == "Qwen3MoeConfig"]


def test_the_tiny_fixtures_have_dense_and_sparse_layers(tmp_path):
    for name in MOE_FIXTURES:
        write_hf_checkpoint(name, tmp_path / name)
        model = load_hf_checkpoint(tmp_path / name)
        kinds = [isinstance(layer.mlp, SparseMoE) for layer in model.layers]
        assert any(kinds) and not all(kinds), (name, kinds)


def test_peft_loads_our_attention_adapter_and_matches_our_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    reference = write_hf_checkpoint("qwen3_moe", tmp_path / "base")
    lora = {"lora_targets": ATTENTION, "lora_rank": 4, "lora_alpha": 8.0}
    ours = load_hf_checkpoint(tmp_path / "base", lora=lora)
    assert all("experts" not in n and ".gate." not in n for n in adapter_params(ours))
    with torch.no_grad():
        for p in adapter_params(ours).values():
            p.normal_(0, 0.1)
    ours.eval()
    save_peft_adapter(ours, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = ours(TOKENS)
        diff = (peft_model(input_ids=TOKENS).logits - expected).abs().max().item()
        assert diff <= 1e-5, diff
        with peft_model.disable_adapter():  # the adapter changes the outputs: the check above is not vacuous
            assert (peft_model(input_ids=TOKENS).logits - expected).abs().max().item() > 1e-3
    save_hf_checkpoint(ours, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
    assert (hf_logits(merged, TOKENS) - expected).abs().max().item() <= 1e-5
    fresh = load_hf_checkpoint(tmp_path / "base", lora=lora)
    load_peft_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(TOKENS), expected)


@pytest.mark.parametrize("targets", [["q_proj", "gate_proj"], ["down_proj"]])
def test_lora_on_mlp_projections_of_an_moe_model_is_refused(targets, tmp_path):
    write_hf_checkpoint("qwen3_moe", tmp_path)
    with pytest.raises(ValueError, match="not supported for MoE models"):
        model_from_hf_config(tmp_path, lora={"lora_targets": targets})


def test_qlora_keeps_experts_and_router_frozen(tmp_path):
    pytest.importorskip("torchao")
    write_hf_checkpoint("qwen3_moe", tmp_path)
    model = load_hf_checkpoint(tmp_path, lora={"lora_targets": ATTENTION, "lora_rank": 4}, quantize_base=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and ".self_attn." in n for n in trainable)


def padded_tokens_and_mask():
    """Right-padded rows of different lengths (the collator's layout) and their attention mask."""
    lengths = [40, 31, 17, 26]
    tokens = torch.randint(0, 96, (len(lengths), 40), generator=torch.Generator().manual_seed(3))
    mask = (torch.arange(40) < torch.tensor(lengths)[:, None]).long()
    return tokens * mask, mask


@pytest.mark.parametrize("name", MOE_FIXTURES)
def test_router_aux_loss_equals_transformers_with_padding(name, tmp_path):
    write_hf_checkpoint(name, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    ours = load_hf_checkpoint(tmp_path).eval()
    tokens, mask = padded_tokens_and_mask()
    with torch.no_grad():
        expected = hf(input_ids=tokens, attention_mask=mask, output_router_logits=True).aux_loss
        unmasked = hf(input_ids=tokens, output_router_logits=True).aux_loss
        with route_statistics(ours, mask) as stats:
            ours(tokens)
        got = stats.loss()
    assert abs(got.item() - expected.item()) <= 1e-6, (got.item(), expected.item())
    assert abs(unmasked.item() - expected.item()) > 1e-4  # the padding would have changed it
    assert stats.layers == len(sparse_layers(ours))
    assert all(layer.statistics is None for layer in sparse_layers(ours))  # detached after the block


def test_router_aux_loss_of_a_padded_preference_batch_counts_its_real_tokens(tmp_path):
    """Through the training path: `routed_token_weights` of a collated batch is the mask of its
    real tokens, and the aux loss of the policy forward is transformers' with that mask."""
    write_hf_checkpoint("qwen3_moe", tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    ours = load_hf_checkpoint(tmp_path).eval()
    gen = torch.Generator().manual_seed(5)

    def ids(n):
        return torch.randint(1, 96, (n,), generator=gen).tolist()

    items = [dict(prompt_ids=ids(p), chosen_ids=ids(c), rejected_ids=ids(r)) for p, c, r in [(7, 5, 9), (12, 3, 4)]]
    batch = collate_preference_pairs(items, pad_id=0)
    weights = routed_token_weights(batch)
    lengths = [len(i["prompt_ids"]) + len(i[k]) for k in ("chosen_ids", "rejected_ids") for i in items]
    assert weights.sum(-1).tolist() == lengths and weights.sum().item() == batch.num_tokens
    with torch.no_grad():
        expected = hf(input_ids=batch.input_ids, attention_mask=weights.long(), output_router_logits=True).aux_loss
        with route_statistics(ours, weights) as stats:
            policy_logps(ours, batch)
    assert abs(stats.loss().item() - expected.item()) <= 1e-6


def test_sparse_moe_equals_every_expert_weighted_densely():
    """Gathering tokens per expert == running all experts on all tokens and weighting by the
    (renormalised) top-k router probabilities, zero for the unrouted ones; gradients too."""
    torch.manual_seed(0)
    for norm in (True, False):
        moe = MoE(n_experts=6, top_k=2, expert_hidden_dim=16, norm_topk_prob=norm)
        model = models.llama(
            vocab_size=50, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=40, max_seq_len=64, moe=moe
        )
        layer = model.layers[0].mlp
        x = torch.randn(3, 11, 32, requires_grad=True)
        probs = torch.softmax(layer.gate(x).float(), -1)
        top, idx = probs.topk(2, -1)
        if norm:
            top = top / top.sum(-1, keepdim=True)
        dense_w = torch.zeros_like(probs).scatter(-1, idx, top)
        dense = sum(dense_w[..., e, None] * expert(x) for e, expert in enumerate(layer.experts))
        out = layer(x)
        torch.testing.assert_close(out, dense, rtol=0, atol=1e-6)
        (g_sparse,) = torch.autograd.grad(out.square().sum(), layer.experts[0].up_proj.weight)
        (g_dense,) = torch.autograd.grad(dense.square().sum(), layer.experts[0].up_proj.weight)
        torch.testing.assert_close(g_sparse, g_dense, rtol=0, atol=1e-5)


def test_an_expert_no_token_is_routed_to_gets_a_zero_gradient():
    """FSDP2 reduce-scatters the same gradients on every rank: an idle expert has 0, not None."""
    torch.manual_seed(0)
    moe = MoE(n_experts=4, top_k=1, expert_hidden_dim=8)
    model = models.llama(
        vocab_size=50, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=24, max_seq_len=64, moe=moe
    )
    layer = model.layers[0].mlp
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[2] = 1.0  # every token with a positive sum goes to expert 2
    x = torch.rand(2, 5, 16)
    layer(x).sum().backward()
    for e, expert in enumerate(layer.experts):
        grad = expert.gate_proj.weight.grad
        assert grad is not None
        assert (grad.abs().sum() > 0) == (e == 2), e


def test_flops_count_active_expert_weights_only():
    moe = MoE(n_experts=8, top_k=2, expert_hidden_dim=16)
    arch = dict(
        vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=40, max_seq_len=64, tie_embeddings=True
    )
    model = models.llama(**arch, moe=moe)
    experts = sum(p.numel() for layer in sparse_layers(model) for p in layer.experts.parameters())
    total = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    assert len(active_parameter_fractions(model)) == 2 * 8 * 3
    assert flops_per_token(model, reference_forward=False) == 6 * (total - experts + experts * 2 / 8)
    assert flops_per_token(model, reference_forward=True) == 8 * (total - experts + experts * 2 / 8)


@pytest.mark.parametrize("name, active, unit", [("qwen3_30b_a3b", 33, 1e8), ("qwen3_235b_a22b", 22, 1e9)])
def test_presets_activate_the_published_parameter_count(name, active, unit):
    """Model cards: 3.3B and 22B activated (truncated: 3.35B and 22.19B, embeddings included)."""
    arch = models.ARCHITECTURES[name]
    with torch.device("meta"):
        model = models.llama(**{**arch, "n_layers": 1})
    fractions = active_parameter_fractions(model)
    params = list(model.named_parameters())
    per_layer = sum(p.numel() * fractions.get(id(p), 1.0) for n, p in params if n.startswith("layers."))
    outside = sum(p.numel() for n, p in params if not n.startswith("layers."))
    assert int((outside + arch["n_layers"] * per_layer) / unit) == active


def test_preset_config_json_round_trips_through_transformers():
    with torch.device("meta"):
        model = models.llama(**{**models.ARCHITECTURES["qwen3_30b_a3b"], "n_layers": 2})
    config = hf_config_from_model(model, torch.bfloat16)
    with torch.device("meta"):
        assert model_from_hf_config(config).args == model.args
    hf = transformers.AutoConfig.for_model(**config)
    assert (hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size, hf.norm_topk_prob) == (128, 8, 768, True)
    assert (hf.decoder_sparse_step, hf.mlp_only_layers, hf.router_aux_loss_coef) == (1, [], 0.001)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_experts": 8, "num_local_experts": 6}, "num_experts and num_local_experts disagree"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok=9 > num_experts=8"),
        ({"mlp_only_layers": [0, 1, 2]}, "no layer is sparse"),
        ({"mlp_only_layers": [5]}, "mlp_only_layers must list layer indices below 3"),
        ({"norm_topk_prob": "yes"}, "norm_topk_prob must be true or false"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"shared_expert_intermediate_size": 64}, r"\['shared_expert_intermediate_size'\] not understood"),
    ],
)
def test_configs_we_cannot_reproduce_are_refused(change, message, tmp_path):
    write_hf_checkpoint("qwen3_moe", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("num_local_experts", None)
    config["num_experts"] = 8
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        model_from_hf_config(tmp_path)


def test_fused_expert_tensors_are_refused_by_name(tmp_path):
    """transformers' in-memory layout (3-D `experts.gate_up_proj`) is not what it saves nor what the
    Hub holds; a folder with it is refused with the keys named, not half-loaded."""
    from safetensors.torch import load_file, save_file

    hf = write_hf_checkpoint("qwen3_moe", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state = {k: v for k, v in state.items() if ".experts." not in k}
    for k, v in hf.state_dict().items():
        if ".experts." in k:
            state[k] = v.contiguous()
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing .*experts\.0\.down_proj.*unexpected .*experts\.gate_up_proj"):
        load_hf_checkpoint(tmp_path)
