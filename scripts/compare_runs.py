"""Are two runs the same? Compares two recipe output folders: every metrics.jsonl record (wall-clock
fields left out) and every tensor under final/ bitwise. Used to check that a refactor changes no
arithmetic: run the tiny configs at two commits, then

    python scripts/compare_runs.py OLD_OUTPUT_DIR NEW_OUTPUT_DIR

Exit 0 when identical, 1 otherwise (the first differences are printed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

WALL_CLOCK = ("_s", "_per_s", "_rank0", "_per_device")
MEASURED = ("mfu", "peak_memory_gib")  # depend on the machine, not on the arithmetic


def records(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(WALL_CLOCK) and k not in MEASURED} for r in rows]


def compare(old: Path, new: Path) -> list[str]:
    problems = []
    a, b = records(old), records(new)
    if len(a) != len(b):
        problems.append(f"metrics.jsonl: {len(a)} vs {len(b)} records")
    for i, (ra, rb) in enumerate(zip(a, b)):
        for key in sorted(set(ra) | set(rb)):
            if ra.get(key) != rb.get(key):
                problems.append(
                    f"metrics.jsonl record {i} (step {ra.get('step')}) {key}: {ra.get(key)} vs {rb.get(key)}"
                )
    files_a = sorted(p.relative_to(old) for p in (old / "final").rglob("*.safetensors"))
    files_b = sorted(p.relative_to(new) for p in (new / "final").rglob("*.safetensors"))
    if files_a != files_b:
        problems.append(f"final/: {[str(p) for p in files_a]} vs {[str(p) for p in files_b]}")
    for rel in sorted(set(files_a) & set(files_b)):
        ta, tb = load_file(old / rel), load_file(new / rel)
        if ta.keys() != tb.keys():
            problems.append(f"{rel}: different tensor names")
        for key in sorted(set(ta) & set(tb)):
            if not torch.equal(ta[key], tb[key]):
                diff = (ta[key].double() - tb[key].double()).abs().max().item()
                problems.append(f"{rel} {key}: max |difference| {diff:.3g}")
    return problems


def main() -> int:
    old, new = Path(sys.argv[1]), Path(sys.argv[2])
    problems = compare(old, new)
    for line in problems[:20]:
        print(line)
    if not problems:
        tensors = sum(len(load_file(p)) for p in (new / "final").rglob("*.safetensors"))
        print(f"identical: {len(records(new))} metrics records, {tensors} tensors bitwise")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
