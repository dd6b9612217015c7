"""`dpokit download`: fetch a model's weights, configs and tokenizer files from the Hugging Face Hub."""

from __future__ import annotations

import os
from pathlib import Path

from dpokit.errors import DpokitError

# Weights as safetensors, every JSON (config, index, tokenizer, generation), BPE text files and
# Meta's tiktoken file. Not fetched: original/*.pth consolidated weights, *.bin, *.gguf, ONNX...
ALLOW_PATTERNS = (
    "*.safetensors",
    "*.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "original/tokenizer.model",
    "*.jinja",
)


class DownloadError(DpokitError):
    pass


def download_checkpoint(repo_id: str, output_dir: str | Path | None = None, *, revision: str | None = None) -> Path:
    """Download `repo_id` (token from $HF_TOKEN) into `output_dir` (default ./checkpoints/<name>)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # a runtime dependency; only a broken install lacks it
        raise DownloadError("huggingface_hub is not installed: pip install huggingface-hub") from None
    output_dir = Path(output_dir) if output_dir is not None else Path("checkpoints") / repo_id.split("/")[-1]
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            local_dir=output_dir,
            allow_patterns=list(ALLOW_PATTERNS),
            token=os.environ.get("HF_TOKEN") or None,
        )
    except Exception as e:  # network, auth, gated repo, offline mode: one line for the user
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        hint = "set HF_TOKEN for gated models; check the network (HF_HUB_OFFLINE=1 forbids downloads)"
        raise DownloadError(f"could not download {repo_id!r} to {output_dir}: {reason} ({hint})") from None
    return Path(path)
