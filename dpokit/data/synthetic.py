"""The bundled synthetic preference task behind the `tiny` configs.

"Case following": the prompt asks for a few words in UPPER or lower case; the chosen reply
writes them in the asked case, the rejected reply in the other one. Whether a reply is right
depends on the prompt's instruction, so a model cannot reach high accuracy from the replies
alone (half the pairs prefer upper case, half lower case): it has to read the prompt. A 4-layer
byte-level model learns it with DPO in a minute on a CPU.

Regenerate the files with `python scripts/make_synthetic_task.py` (deterministic).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from dpokit.errors import DpokitError

ASSETS = Path(__file__).parent / "assets"
WORDS = (
    "apple river stone cloud garden light music paper window forest ocean silver mountain "
    "candle bridge winter summer engine pencil rocket castle meadow thunder velvet harbor "
    "lantern orchard puzzle signal timber valley wander yellow zephyr anchor basket copper "
    "desert ember falcon glacier hollow island jasmine kettle ladder marble nectar"
).split()


def case_following_pairs(n: int, seed: int, *, exclude: frozenset[str] = frozenset()) -> list[dict]:
    """n distinct pairs whose prompts are not in `exclude` (so no pair repeats within a split and a
    validation prompt never appears in training)."""
    rng = random.Random(seed)
    pairs, seen = [], set(exclude)
    while len(pairs) < n:
        words = " ".join(rng.sample(WORDS, rng.randint(2, 4)))
        upper = rng.random() < 0.5
        case = "UPPER" if upper else "lower"
        shown = " ".join(w.capitalize() for w in words.split())
        prompt = f"Write in {case} case: {shown}"
        if prompt in seen:
            continue
        seen.add(prompt)
        right, wrong = (words.upper(), words.lower()) if upper else (words.lower(), words.upper())
        pairs.append({"prompt": prompt, "chosen": right, "rejected": wrong})
    return pairs


def write_case_following_task(directory: Path = ASSETS / "case_following", train: int = 4000, validation: int = 256):
    directory.mkdir(parents=True, exist_ok=True)
    held_out = case_following_pairs(validation, seed=1)
    splits = {
        "validation": held_out,
        "train": case_following_pairs(train, seed=0, exclude=frozenset(p["prompt"] for p in held_out)),
    }
    for split, pairs in splits.items():
        with open(directory / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for pair in pairs:
                f.write(json.dumps(pair) + "\n")
    return directory


def bundled_task_path(name: str, split: str) -> Path:
    """Path of a bundled task's split, e.g. bundled_task_path("case_following", "train")."""
    path = ASSETS / name / f"{split}.jsonl"
    if not path.is_file():
        available = sorted(p.name for p in ASSETS.iterdir() if p.is_dir())
        raise DpokitError(f"no bundled task split {name}/{split}; bundled tasks: {available}")
    return path
