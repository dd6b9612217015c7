"""`dpokit generate` and `dpokit chat` against the library's decoding of the same checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dpokit.eval_checkpoint import eval_tokenizer
from dpokit.generation import generate, stop_ids
from dpokit.models import disable_adapter
from dpokit.resolve import load_for_inference

pytestmark = pytest.mark.subprocess
DPOKIT = [sys.executable, "-m", "dpokit.cli"]
PROMPTS = ["Write in UPPER case: Quiet Harbor", "Write in lower case: Golden Meadow"]


def dpokit(*args, stdin=None):
    return subprocess.run([*DPOKIT, *args], capture_output=True, text=True, input=stdin, timeout=600)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    result = dpokit(
        "run", "dpo_lora_single_device", "--config", "tiny", "device=cpu", f"output_dir={out}", "max_steps=3"
    )
    assert result.returncode == 0, result.stderr
    return out


def library_replies(path, conversations, *, adapters=True, max_new_tokens=10):
    loaded = load_for_inference(path)
    tokenizer, _ = eval_tokenizer(loaded)
    ids = [tokenizer.encode_prompt(c) for c in conversations]
    stops = stop_ids(tokenizer)
    model = loaded.model
    if adapters:
        outs = generate(model, ids, max_new_tokens=max_new_tokens, stop_ids=stops)
    else:
        with disable_adapter(model):
            outs = generate(model, ids, max_new_tokens=max_new_tokens, stop_ids=stops)
    return [tokenizer.decode([t for t in out if t not in stops]) for out in outs]


def user(text):
    return [{"role": "user", "content": text}]


def test_generate_streams_what_the_library_decodes_with_adapters_on_and_off(run_dir):
    for adapters in ("on", "off"):
        result = dpokit(
            "generate", str(run_dir), "--prompt", PROMPTS[0], "--max-new-tokens", "10", "--adapters", adapters
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == library_replies(run_dir, [user(PROMPTS[0])], adapters=adapters == "on")[0] + "\n"


def test_generate_a_prompts_file_as_json_on_final_and_on_the_adapter(run_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n" + json.dumps({"messages": user(PROMPTS[1])}) + "\n")
    want = library_replies(run_dir / "final", [user(p) for p in PROMPTS])
    for checkpoint in (run_dir / "final", run_dir / "final" / "adapter"):
        result = dpokit("generate", str(checkpoint), "--prompts", str(prompts), "--max-new-tokens", "10", "--json")
        assert result.returncode == 0, result.stderr
        got = [json.loads(line)["completion"] for line in result.stdout.splitlines()]
        assert got == want, checkpoint  # the merged folder decodes as base + adapter


def test_chat_keeps_the_history(run_dir):
    result = dpokit("chat", str(run_dir), "--max-new-tokens", "8", stdin=f"{PROMPTS[0]}\n/reset\n{PROMPTS[1]}\nagain\n")
    assert result.returncode == 0, result.stderr
    first, second, third = result.stdout.splitlines()
    assert first == library_replies(run_dir, [user(PROMPTS[0])], max_new_tokens=8)[0]  # /reset: a fresh start
    assert second == library_replies(run_dir, [user(PROMPTS[1])], max_new_tokens=8)[0]
    history = [*user(PROMPTS[1]), {"role": "assistant", "content": second}, *user("again")]
    assert third == library_replies(run_dir, [history], max_new_tokens=8)[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["/no/such/folder", "--prompt", "hi"], "/no/such/folder: checkpoint not found"),
        (["RUN/final", "--prompt", "hi", "--adapters", "off"], "has no LoRA adapters to switch off"),
        (["RUN", "--prompts", "/no/such.txt"], "/no/such.txt: prompts file not found"),
        (["RUN", "--prompts", "BAD"], 'bad.jsonl:2: expected {"prompt": "..."} or {"messages": [...]}'),
        (["RUN", "--prompt", "hi", "--top-p", "0"], "generate: top_p must be in (0, 1]"),
    ],
)
def test_bad_generate_inputs_are_one_line(run_dir, tmp_path, args, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n[1, 2]\n')
    args = [
        str(run_dir / "final") if a == "RUN/final" else str(run_dir) if a == "RUN" else str(bad) if a == "BAD" else a
        for a in args
    ]
    result = dpokit("generate", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
