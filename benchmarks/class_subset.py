"""A seeded, class-balanced subset of a class-folder tree: the same number of images from every class.

    python -m benchmarks.class_subset imagenette/train DATA/train --per-class 260 --seed 0
    python -m benchmarks.class_subset imagenette/train DATA/dev --per-class 100 --skip 260 --seed 0
    python -m benchmarks.class_subset imagenette/val DATA/val --per-class 100 --seed 1

Each class's file names are sorted, then shuffled by one ``random.Random(seed)`` shared by the classes in sorted
order; the subset is positions ``skip`` to ``skip + per_class`` of that order, so two calls with the same seed and
disjoint ranges give disjoint subsets (a training set and a dev set). Files are hard-linked (copied across file
systems). A class with too few images is refused, naming it.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
from pathlib import Path


def class_subset(source: Path, out: Path, per_class: int, skip: int = 0, seed: int = 0) -> dict[str, int]:
    rng = random.Random(seed)
    classes = sorted(p for p in source.iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"{source} has no class folders")
    counts = {}
    for folder in classes:
        files = sorted(p.name for p in folder.iterdir() if p.is_file())
        rng.shuffle(files)
        chosen = files[skip:skip + per_class]
        if len(chosen) < per_class:
            raise SystemExit(f"{folder} has {len(files)} images, fewer than --skip {skip} + --per-class {per_class}")
        (out / folder.name).mkdir(parents=True, exist_ok=True)
        for name in chosen:
            target = out / folder.name / name
            if not target.exists():
                try:
                    os.link(folder / name, target)
                except OSError:
                    shutil.copy2(folder / name, target)
        counts[folder.name] = len(chosen)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a class-folder tree")
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, required=True)
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N of each class's seeded order")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = class_subset(args.source, args.out, args.per_class, args.skip, args.seed)
    print(f"wrote {sum(counts.values())} images of {len(counts)} classes to {args.out}")


if __name__ == "__main__":
    main()
