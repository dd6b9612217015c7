"""Writes the benchmark's shared inputs once: random-weight model + token-id pairs.

  <out>/model/     config.json + model.safetensors, a Llama-architecture model in the Hugging Face
                   layout (keys "model.layers.0.self_attn.q_proj.weight", ...; random weights from
                   a fixed seed), so transformers/TRL, torchtune and dpokit load the same numbers.
  <out>/pairs.json {"pairs": [{"prompt_ids", "chosen_ids", "rejected_ids"}, ...], "meta": {...}}:
                   every framework trains on exactly these ids (already truncated to --max-length
                   per sequence, so no framework truncates anything itself).

Pairs come from HH-RLHF (`../shared/data/hh_rlhf_harmless_base_test.jsonl.gz` relative to the
repository, when present): each transcript is split at its last "\\n\\nAssistant:" into prompt and
response, and the texts are tokenized with a byte-level BPE (vocabulary = the model's) trained on
the same transcripts with the `tokenizers` library, an end-of-sequence token closing each response.
Without the file (or with --synthetic) lengths are drawn from log-normals fitted to that data
(SYNTHETIC_SHAPE below) and token ids uniformly.

    python benchmarks/make_assets.py --out benchmarks/.assets --model cpu-50m --max-length 512
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
HH_RLHF = REPO.parent / "shared" / "data" / "hh_rlhf_harmless_base_test.jsonl.gz"

# Llama-architecture sizes. N = matmul parameters (shared_io.matmul_params).
MODELS = {
    # ~56M parameters (N = 40M): the default, sized for a 2-core CPU.
    "cpu-50m": dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    # ~125M parameters (N = 100M): the "~100M model", for a GPU.
    "gpu-100m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    # The SmolLM2-135M architecture (HuggingFaceTB/SmolLM2-135M's config.json: tied embeddings,
    # 49,152-token vocabulary, RoPE theta 100,000; N = 134M in matmuls): the LoRA plan's model.
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    # a few million parameters, for smoke runs of the harness itself.
    "tiny": dict(
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32000,
    ),
}
SPECIAL_TOKENS = ("<pad>", "</s>")  # ids 0 and 1
PAD_ID, EOS_ID = 0, 1

# log-normal (mu, sigma) of token lengths measured on HH-RLHF harmless-base test with the BPE
# above, before truncation (`make_assets.py --max-length 4096 --fit` prints them); the synthetic fallback draws from these.
SYNTHETIC_SHAPE = {"prompt": (4.35, 0.99), "chosen": (3.32, 0.87), "rejected": (3.51, 0.92)}
ASSISTANT = "\n\nAssistant:"


def hf_config(model: str, max_length: int) -> dict:
    """A preset's sizes (and any of the defaults below it overrides: RoPE theta, context, tying)."""
    sizes = MODELS[model]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "head_dim": sizes["hidden_size"] // sizes["num_attention_heads"],
        "max_position_embeddings": max(2048, 2 * max_length),
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
        "pad_token_id": PAD_ID,
        "bos_token_id": EOS_ID,
        "eos_token_id": EOS_ID,
        "use_cache": False,
        **sizes,
    }


def random_hf_state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """N(0, 0.02) matrices (HF's initializer_range), ones for the RMSNorm weights; no lm_head.weight
    when the head is tied to the embedding (as HF saves a tied model)."""
    g = torch.Generator().manual_seed(seed)
    d, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd, h, kv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]

    def normal(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    sd = {
        "model.embed_tokens.weight": normal(vocab, d),
        "model.norm.weight": torch.ones(d),
    }
    if not config.get("tie_word_embeddings"):
        sd["lm_head.weight"] = normal(vocab, d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update(
            {
                p + "input_layernorm.weight": torch.ones(d),
                p + "post_attention_layernorm.weight": torch.ones(d),
                p + "self_attn.q_proj.weight": normal(h * hd, d),
                p + "self_attn.k_proj.weight": normal(kv * hd, d),
                p + "self_attn.v_proj.weight": normal(kv * hd, d),
                p + "self_attn.o_proj.weight": normal(d, h * hd),
                p + "mlp.gate_proj.weight": normal(ffn, d),
                p + "mlp.up_proj.weight": normal(ffn, d),
                p + "mlp.down_proj.weight": normal(d, ffn),
            }
        )
    return sd


def write_model(out: Path, model: str, max_length: int, seed: int) -> dict:
    from safetensors.torch import save_file

    config = hf_config(model, max_length)
    out.mkdir(parents=True, exist_ok=True)
    save_file(random_hf_state_dict(config, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


# ----------------------------------------------------------------------------- pairs


def hh_rlhf_texts(path: Path) -> tuple[list[tuple[str, str, str]], int]:
    """(prompt, chosen, rejected) texts, and how many records were skipped because the two
    transcripts do not share everything up to the last assistant turn."""
    triples, skipped = [], 0
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            cut_c = record["chosen"].rfind(ASSISTANT) + len(ASSISTANT)
            cut_r = record["rejected"].rfind(ASSISTANT) + len(ASSISTANT)
            prompt = record["chosen"][:cut_c]
            if cut_c < len(ASSISTANT) or record["rejected"][:cut_r] != prompt:
                skipped += 1
                continue
            triples.append((prompt, record["chosen"][cut_c:], record["rejected"][cut_r:]))
    return triples, skipped


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on the data itself (no tokenizer download is possible here)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def truncate(p: list[int], c: list[int], r: list[int], max_length: int) -> tuple[list[int], list[int], list[int]]:
    """Fit prompt + each response into max_length tokens: responses keep their start and are cut to
    at most max_length // 2 only when the prompt cannot shrink enough; the prompt keeps its end."""
    longest = max(len(c), len(r))
    if len(p) + longest <= max_length:
        return p, c, r
    if max_length - longest < max_length // 2:
        c, r = c[: max_length // 2], r[: max_length // 2]
        longest = max(len(c), len(r))
    keep = max(1, max_length - longest)
    return p[-keep:], c, r


def hh_rlhf_pairs(path: Path, vocab_size: int, max_length: int) -> tuple[list[dict], dict]:
    triples, skipped = hh_rlhf_texts(path)
    tok = train_bpe([t for triple in triples for t in triple], vocab_size)
    pairs, truncated = [], 0
    for prompt, chosen, rejected in triples:
        ids = [e.ids for e in tok.encode_batch([prompt, chosen, rejected])]
        p, c, r = ids[0], ids[1] + [EOS_ID], ids[2] + [EOS_ID]
        tp, tc, tr = truncate(p, c, r, max_length)
        truncated += (len(tp), len(tc), len(tr)) != (len(p), len(c), len(r))
        pairs.append({"prompt_ids": tp, "chosen_ids": tc, "rejected_ids": tr})
    meta = {
        "source": str(path.name),
        "records_skipped": skipped,
        "pairs_truncated": truncated,
        "tokenizer": f"byte-level BPE trained on the data, {tok.get_vocab_size()} tokens",
    }
    return pairs, meta


def synthetic_pairs(n: int, vocab_size: int, max_length: int, seed: int) -> tuple[list[dict], dict]:
    rng = random.Random(seed)

    def draw(kind: str) -> int:
        mu, sigma = SYNTHETIC_SHAPE[kind]
        return max(1, round(math.exp(rng.gauss(mu, sigma))))

    def ids(n_tokens: int) -> list[int]:
        return [rng.randrange(len(SPECIAL_TOKENS), vocab_size) for _ in range(n_tokens)]

    pairs, truncated = [], 0
    for _ in range(n):
        p, c, r = ids(draw("prompt")), ids(draw("chosen") - 1) + [EOS_ID], ids(draw("rejected") - 1) + [EOS_ID]
        tp, tc, tr = truncate(p, c, r, max_length)
        truncated += (len(tp), len(tc), len(tr)) != (len(p), len(c), len(r))
        pairs.append({"prompt_ids": tp, "chosen_ids": tc, "rejected_ids": tr})
    return pairs, {"source": "synthetic log-normal (HH-RLHF shape)", "pairs_truncated": truncated}


def lognormal_fit(values: list[int]) -> tuple[float, float]:
    logs = [math.log(v) for v in values]
    mu = sum(logs) / len(logs)
    return round(mu, 2), round(math.sqrt(sum((x - mu) ** 2 for x in logs) / len(logs)), 2)


def write_pairs(
    out: Path, *, vocab_size: int, max_length: int, seed: int, synthetic: bool, num_synthetic: int = 2312
) -> dict:
    if not synthetic and HH_RLHF.is_file():
        pairs, meta = hh_rlhf_pairs(HH_RLHF, vocab_size, max_length)
    else:
        pairs, meta = synthetic_pairs(num_synthetic, vocab_size, max_length, seed)
    random.Random(seed).shuffle(pairs)  # the runners take pairs in file order
    meta.update(max_length=max_length, pairs=len(pairs), pad_id=PAD_ID, eos_id=EOS_ID)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"pairs": pairs, "meta": meta}))
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / ".assets"))
    ap.add_argument("--model", default="cpu-50m", choices=sorted(MODELS))
    ap.add_argument("--max-length", type=int, default=512, help="max tokens of prompt + one response")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--synthetic", action="store_true", help="synthetic lengths even if HH-RLHF is present")
    ap.add_argument("--fit", action="store_true", help="print log-normal fits of the HH-RLHF token lengths")
    args = ap.parse_args(argv)
    out = Path(args.out)
    config = write_model(out / "model", args.model, args.max_length, args.seed)
    meta = write_pairs(
        out / "pairs.json",
        vocab_size=config["vocab_size"],
        max_length=args.max_length,
        seed=args.seed,
        synthetic=args.synthetic,
    )
    print(json.dumps({"model": args.model, **meta}))
    if args.fit:
        pairs = json.loads((out / "pairs.json").read_text())["pairs"]
        for key in ("prompt", "chosen", "rejected"):
            print(key, lognormal_fit([len(p[f"{key}_ids"]) for p in pairs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
