"""Small SentencePiece-style BPE tokenizer.json files built offline with HF `tokenizers`.

Laid out as the published files are: "▁" for spaces, `<0xNN>` byte-fallback tokens in the model's
vocabulary (not added tokens), an unknown token, and the family's normalizer / pre-tokenizer /
decoder. "gemma": Replace(" ", "▁") and a Split on spaces (no prefix space), as Gemma 2 / 3 and
transformers' GemmaTokenizer. "llama": Prepend("▁") + Replace, no pre-tokenizer, a decoder that
strips the first space (Llama 2, Mistral 7B v0.1-v0.3, Phi-3).
"""

import json

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SP_CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog 1234567890 times.",
    "def f(x):\n    return x ** 2  # square\n\n\tif x > 10:\n\t\tprint('big')",
    "Ünïcödé façade naïve café — “quotes” … ½ ² ³",
    "What is 2 + 2? 4, of course. And 3 + 3? 6. Bonjour, ça va ?",
    "[INST] user question [/INST] model answer, then more text.",
    "emoji 🙂 and 日本語",
]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def sentencepiece_bpe(
    style: str, specials: list[str], *, bos: str | None = None, vocab_size: int = 900, rstrip: tuple[str, ...] = ()
) -> str:
    """tokenizer.json text of a byte-fallback BPE in `style` ("gemma" or "llama"). `specials` come
    first (ids 0..), then the 256 byte tokens; `bos` is what the post-processor puts before a
    text (Gemma's <bos>, Mistral's <s>; Phi-3 has none); tokens in `rstrip` swallow the whitespace
    after them (Phi-3's turn markers)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if style == "gemma":
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    elif style == "llama":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:
        raise ValueError(style)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + BYTE_TOKENS, show_progress=False)
    # train on the normalised text (the trainer does not apply a Prepend)
    tok.train_from_iterator([("▁" + t if style == "llama" else t).replace(" ", "▁") for t in SP_CORPUS * 20], trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in BYTE_TOKENS]
    for token in data["added_tokens"]:
        token["rstrip"] = token["content"] in rstrip
    return json.dumps(data, ensure_ascii=False)
