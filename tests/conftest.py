"""Tiny data made on the spot: tests read no shared data folder and no network."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def make_image_tree(root: Path, classes: int = 3, per_class: int = 12, size: int = 32, split_dirs: bool = True,
                    test_per_class: int = 4) -> Path:
    """Class folders of PNGs whose mean colour depends on the class (learnable, deterministic)."""
    rng = np.random.default_rng(0)
    splits = {"train": per_class, "test": test_per_class} if split_dirs else {"": per_class}
    for split, count in splits.items():
        for c in range(classes):
            d = root / split / f"class_{c}" if split else root / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = np.array([(c * 80) % 256, 255 - (c * 60) % 256, (c * 120) % 256], np.float32)
                pixels = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{i:04d}.png")
    return root


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    return make_image_tree(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """BadNets shards of a 3-class, 32 px tree: 42 train (+6 trusted), 12 test; 5 shards of train."""
    from shards.build import BuildSpec, build_shards

    root = tmp_path_factory.mktemp("tiny")
    make_image_tree(root / "data", classes=3, per_class=16, test_per_class=4)
    out = root / "shards"
    build_shards(BuildSpec(source=str(root / "data"), out=str(out), poison_rate=0.2, shard_size=9,
                           trusted_count=6), progress=False)
    return out


TINY_TRAIN = ["data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=20", "train.epochs=1",
              "train.cpu=true", "model.sfrn=mcci_convnet_tiny", "model.ain_widths=[8,8,8]", "reference.count=4",
              "train.log_every=1"]


@pytest.fixture(scope="session")
def trained(tiny_shards, tmp_path_factory) -> Path:
    """A tiny undefended baseline and a tiny MCCI run on tiny_shards (read-only for tests)."""
    from pipeline.cli import main

    out = tmp_path_factory.mktemp("runs")
    main(["train", f"data.shards={tiny_shards}", f"train.out={out / 'baseline'}", "train.defense=none", *TINY_TRAIN])
    main(["train", f"data.shards={tiny_shards}", f"train.out={out / 'mcci'}", *TINY_TRAIN])
    return out


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """``mcci ARGV`` in this process, expected to stop with one error line and no traceback: (exit code, the line)."""
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return exit_info.value.code, lines[0]
