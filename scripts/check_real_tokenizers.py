"""Check dpokit's tokenizers against HF `tokenizers` on real published tokenizer files.

    python scripts/check_real_tokenizers.py [--hf-real ../shared/hf-real] [--hh ../shared/data/...jsonl.gz]

For every folder of `--hf-real` with a `tokenizer.json` (plus a Llama 3 `tokenizer.json` made from
`original/tokenizer.model` by transformers' TikTokenConverter, as the HF export is), it prints
whether dpokit loads the file and, if so, on how many texts the ids differ from
`tokenizers.Tokenizer.encode(text, add_special_tokens=False)`. Texts: every HH-RLHF transcript
(when the file is there) and a set of hard cases (control and missing bytes, whitespace runs,
repeated patterns, special-token text, scripts of many languages). Needs transformers + tokenizers.
Also reports the chat template each folder is detected as (or why none is).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import tempfile
from pathlib import Path

from dpokit.data.hf_tokenizer import TokenizerError, detect_template, tokenizer_json_encoding
from dpokit.data.tokenizer import TEMPLATES, Tokenizer


def hard_texts(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = [
        "a\x04b",
        "\x04",
        "x\x06\x13\x14y",
        "ab\x04ab\x04ab",
        "  \x04  ",
        "1\x0423",
        "héllo\x7fwörld",
        "ababababab",
        "aaaaaaaaaaaaaaaaaaaaaaa",
        " " * 40 + "x",
        "\t\t\t\t\t  \n\n\n   \t",
        "x" + " " * 33 + "y",
        "<|im_end|> typed by a user",
        "<|endoftext|>",
        "Ünïcödé 漢字 العربية हिन्दी 🙂🙂",
        "e\u0301 \u212b",
        "  leading",
        "trailing   ",
        "line\r\nbreaks\r\n\r\n",
        "1234567890 3.14159 1e-9",
        "don't I'LL we'Re",
    ]
    alphabet = "ab \t\n\x04\x06xyz0123.,'!é漢🙂\x13\x7f"
    for _ in range(400):
        texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))))
    return texts


def hh_texts(path: Path) -> list[str]:
    if not path.is_file():
        return []
    with gzip.open(path, "rt") as f:
        records = [json.loads(line) for line in f]
    return [r[k] for r in records for k in ("chosen", "rejected")]


def llama3_tokenizer_json(folder: Path, out_dir: Path) -> Path | None:
    model = folder / "original" / "tokenizer.model"
    if not model.is_file():
        return None
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from dpokit.data.hf_tokenizer import LLAMA3_PATTERN, llama3_special_tokens

    specials = llama3_special_tokens(128000)
    converter = TikTokenConverter(vocab_file=str(model), pattern=LLAMA3_PATTERN, extra_special_tokens=list(specials))
    path = out_dir / f"{folder.name}-tokenizer.json"
    converter.converted().save(str(path))
    return path


def compare(tokenizer_json: Path, texts: list[str]) -> str:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        encoding, info = tokenizer_json_encoding(tokenizer_json)
    except TokenizerError as error:
        return f"refused: {error}"
    eot = next(iter(encoding._special_tokens))
    template = TEMPLATES["chatml"].__class__(name="check", begin="", header_format="", end_of_turn=eot)
    ours = Tokenizer(encoding, template, **info)
    reference = HFTokenizer.from_file(str(tokenizer_json))
    differ = [t for t in texts if ours.encode(t) != reference.encode(t, add_special_tokens=False).ids]
    special_text = [t for t in differ if ours.special_token_text(t)]
    other = [t for t in differ if not ours.special_token_text(t)]
    line = (
        f"loaded ({len(info['missing_bytes'])} missing bytes): ids differ on {len(other)} of {len(texts)} texts"
        f" (+{len(special_text)} with special-token text, encoded as plain text by design)"
    )
    if other:
        line += f"; e.g. {other[0][:60]!r}"
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-real", type=Path, default=Path("../shared/hf-real"))
    parser.add_argument("--hh", type=Path, default=Path("../shared/data/hh_rlhf_harmless_base_test.jsonl.gz"))
    args = parser.parse_args(argv)
    if not args.hf_real.is_dir():
        print(f"{args.hf_real}: not found", file=sys.stderr)
        return 2
    texts = hh_texts(args.hh) + hard_texts()
    print(f"{len(texts)} texts")
    with tempfile.TemporaryDirectory() as tmp:
        for folder in sorted(p for p in args.hf_real.iterdir() if p.is_dir()):
            try:
                template = detect_template(folder).name
            except TokenizerError as error:
                template = f"none ({str(error)[:100]})"
            files = [folder / "tokenizer.json"] if (folder / "tokenizer.json").is_file() else []
            converted = llama3_tokenizer_json(folder, Path(tmp))
            files += [converted] if converted else []
            print(f"{folder.name}: template {template}")
            for path in files:
                print(f"  {path.name}: {compare(path, texts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
