"""Write the math_qa datasets: ``data/{train,dev,test}.jsonl``, disjoint, mixed levels.

Run ``python -m examples.math_qa.generate`` (the files are shipped; rerunning with the same
seed rewrites them byte for byte).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dmipro.lm._math import generate_problems

__all__ = ["DATA_DIR", "SPLITS", "main", "write_splits"]

DATA_DIR = Path(__file__).parent / "data"
SPLITS = ("train", "dev", "test")


def write_splits(directory: Path = DATA_DIR, *, per_split: int = 300, seed: int = 2024) -> dict[str, Path]:
    """Generate ``3 * per_split`` distinct problems and write one JSONL file per split."""
    records = generate_problems(per_split * len(SPLITS), seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for index, split in enumerate(SPLITS):
        path = directory / f"{split}.jsonl"
        chunk = records[index * per_split: (index + 1) * per_split]
        path.write_text("".join(json.dumps(record) + "\n" for record in chunk), encoding="utf-8")
        paths[split] = path
    return paths


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output directory")
    parser.add_argument("--per-split", type=int, default=300, help="examples per split")
    parser.add_argument("--seed", type=int, default=2024, help="generator seed")
    args = parser.parse_args(argv)
    for split, path in write_splits(args.out, per_split=args.per_split, seed=args.seed).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
