import os
import subprocess
import sys

import pytest


@pytest.mark.subprocess
def test_download_offline_is_one_clear_error(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run(
        [sys.executable, "-m", "dpokit.cli", "download", "Qwen/Qwen2.5-0.5B", "--output-dir", str(tmp_path / "q")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("dpokit: error: could not download 'Qwen/Qwen2.5-0.5B'") and "HF_HUB_OFFLINE" in last


def test_download_fetches_only_weights_configs_and_tokenizer_files(tmp_path, monkeypatch):
    import fnmatch

    import huggingface_hub

    from dpokit.models import hub

    calls = {}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: calls.update(kw) or kw["local_dir"])
    assert hub.download_checkpoint("org/m", tmp_path) == tmp_path
    wanted = [
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "original/tokenizer.model",
        "merges.txt",
        "generation_config.json",
    ]
    unwanted = ["original/consolidated.00.pth", "pytorch_model.bin", "model.gguf", "README.md"]
    match = lambda name: any(fnmatch.fnmatch(name, p) for p in calls["allow_patterns"])  # noqa: E731
    assert all(match(n) for n in wanted) and not any(match(n) for n in unwanted)
