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


def case_following_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        words = " ".join(rng.sample(WORDS, rng.randint(2, 4)))
        upper = rng.random() < 0.5
        case = "UPPER" if upper else "lower"
        shown = " ".join(w.capitalize() for w in words.split())
        right, wrong = (words.upper(), words.lower()) if upper else (words.lower(), words.upper())
        pairs.append({"prompt": f"Write in {case} case: {shown}", "chosen": right, "rejected": wrong})
    return pairs


def write_case_following_task(directory: Path = ASSETS / "case_following", train: int = 4000, validation: int = 256):
    directory.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", train, 0), ("validation", validation, 1)):
        with open(directory / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for pair in case_following_pairs(n, seed):
                f.write(json.dumps(pair) + "\n")
    return directory


def bundled_task_path(name: str, split: str) -> Path:
    """Path of a bundled task's split, e.g. bundled_task_path("case_following", "train")."""
    path = ASSETS / name / f"{split}.jsonl"
    if not path.is_file():
        available = sorted(p.name for p in ASSETS.iterdir() if p.is_dir())
        raise DpokitError(f"no bundled task split {name}/{split}; bundled tasks: {available}")
    return path
