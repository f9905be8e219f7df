"""``mcci shards build``: source images -> poisoned WebDataset shards + manifest.

Splits written:
- ``train``: the training set, a fraction ``poison_rate`` of it poisoned (label -> target for
  dirty-label attacks).
- ``trusted``: ``trusted_count`` clean training images held out of ``train``, the defender's small
  trusted set (the default source of the mind-control reference).
- ``test-clean``: every test image, clean.
- ``test-poisoned``: every test image whose true label is not the target (all-to-one) or every test
  image (all-to-all), with the trigger and its true label.

Modes: ``all-to-one`` relabels poisoned training images to ``target``; ``all-to-all`` relabels
label y to (y + 1) mod K. Attacks with cross samples (WaNet's noise mode) also modify extra training
images that keep their labels (``cross`` in the sample metadata, ``cross_indices`` in the manifest).

Output is written to a temporary folder next to ``out`` and renamed into place at the end, so a
crash never leaves a folder that looks complete; the same inputs and seed give byte-identical shards.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from shards.attacks import AttackContext, build_attack
from shards.errors import ShardBuildError
from shards.sources import LabelledImages, encode_image, load_source

FORMAT_VERSION = 1
MODES = ("all-to-one", "all-to-all")
SPLITS = ("train", "trusted", "test-clean", "test-poisoned")
LOSSLESS_MAX_SIDE = 64


@dataclass
class BuildSpec:
    source: str
    out: str
    attack: str = "badnets"
    poison_rate: float = 0.1
    target: int = 0
    mode: str = "all-to-one"
    seed: int = 0
    image_size: int | None = None
    test_source: str | None = None
    attack_params: dict[str, Any] = field(default_factory=dict)
    image_format: str = "auto"  # auto: png up to 64 px, jpeg above
    jpeg_quality: int = 95
    shard_size: int = 1000
    trusted_count: int = 100
    max_train: int | None = None  # a seeded random subset of this many training images
    workers: int = 0  # 0: choose from the machine and the data size
    overwrite: bool = False


@dataclass
class _SampleSpec:
    key: str
    ref: Any
    label: int
    orig_label: int
    poisoned: bool
    index: int
    cross: bool = False


def _validate(spec: BuildSpec) -> None:
    if not 0.0 < spec.poison_rate < 1.0:
        raise ShardBuildError(f"--poison-rate must be in (0, 1), got {spec.poison_rate}")
    if spec.mode not in MODES:
        raise ShardBuildError(f"--mode must be one of {MODES}, got {spec.mode!r}")
    if spec.image_format not in ("auto", "png", "jpeg"):
        raise ShardBuildError(f"--format must be auto, png or jpeg, got {spec.image_format!r}")
    if not 1 <= spec.jpeg_quality <= 100:
        raise ShardBuildError(f"--jpeg-quality must be in 1..100, got {spec.jpeg_quality}")
    if spec.shard_size < 1:
        raise ShardBuildError(f"--shard-size must be at least 1, got {spec.shard_size}")
    if spec.image_size is not None and spec.image_size < 8:
        raise ShardBuildError(f"--image-size must be at least 8, got {spec.image_size}")
    if spec.trusted_count < 0:
        raise ShardBuildError(f"--trusted-count must be >= 0, got {spec.trusted_count}")
    if spec.max_train is not None and spec.max_train < 1:
        raise ShardBuildError(f"--max-train must be at least 1, got {spec.max_train}")
    out = Path(spec.out)
    if out.exists() and any(out.iterdir()) and not spec.overwrite:
        raise ShardBuildError(f"{out} exists and is not empty; choose another --out or pass --overwrite")


def fit_image(image: Image.Image, size: int | None) -> np.ndarray:
    """Resize the shorter side to ``size`` and centre-crop a square (no-op when it already fits)."""
    if size is not None and image.size != (size, size):
        w, h = image.size
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


# Per-process state for the pool workers (inherited by fork, or set by the initializer).
_STATE: dict[str, Any] = {}


def _init_worker(state: dict[str, Any], in_pool: bool = False) -> None:
    _STATE.update(state)
    if in_pool:  # attacks that run a network (ISSBA's encoder) get one thread per worker, as DataLoader workers do
        import torch
        torch.set_num_threads(1)


def _write_shard(job: tuple[str, str, list[_SampleSpec]]) -> dict[str, Any]:
    split, path, samples = job
    source: LabelledImages = _STATE["sources"]["train" if split in ("train", "trusted") else "test"]
    attack, size, fmt, quality = _STATE["attack"], _STATE["image_size"], _STATE["format"], _STATE["jpeg_quality"]
    ext = "png" if fmt == "png" else "jpg"
    tmp = path + ".tmp"
    with wds.TarWriter(tmp, encoder=False, mtime=0.0) as sink:
        for s in samples:
            pixels = fit_image(source.load(s.ref), size)
            if pixels.shape != (size, size, 3):
                raise ShardBuildError(f"image {s.ref} is {pixels.shape[1]}x{pixels.shape[0]}, not {size}x{size}; "
                                      "pass --image-size to resize every image")
            if s.poisoned:
                pixels = attack.apply_train(pixels, s.index) if split == "train" else attack.apply(pixels, s.index)
            elif s.cross:
                pixels = attack.apply_cross(pixels, s.index)
            meta = {"label": s.label, "orig_label": s.orig_label, "poisoned": s.poisoned, "index": s.index,
                    "cross": s.cross}
            sink.write({"__key__": s.key, ext: encode_image(pixels, fmt, quality),
                        "cls": str(s.label).encode(), "json": json.dumps(meta, sort_keys=True).encode()})
    os.replace(tmp, path)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return {"split": split, "path": path, "sha256": digest, "count": len(samples), "size": os.path.getsize(path)}


def poison_label(label: int, spec: BuildSpec, num_classes: int) -> int:
    return (label + 1) % num_classes if spec.mode == "all-to-all" else spec.target


def _plan(spec: BuildSpec, sources: dict[str, LabelledImages], attack) -> tuple[dict, dict]:
    """Choose trusted, poisoned and cross samples and list every split's samples in order."""
    rng = np.random.default_rng(spec.seed)
    train, test = sources["train"], sources["test"]
    pool = np.arange(len(train))
    if spec.max_train is not None and spec.max_train < len(pool):
        pool = np.sort(rng.choice(pool, size=spec.max_train, replace=False))
    n = len(pool)
    if spec.trusted_count >= n:
        raise ShardBuildError(f"--trusted-count {spec.trusted_count} leaves no training images (train has {n})")
    trusted = np.sort(rng.choice(pool, size=spec.trusted_count, replace=False)) if spec.trusted_count else np.array([], int)
    keep = np.setdiff1d(pool, trusted)
    if attack.clean_label:
        eligible = keep[train.labels[keep] == spec.target]
    elif spec.mode == "all-to-all":
        eligible = keep
    else:
        eligible = keep[train.labels[keep] != spec.target]
    n_poison = int(round(spec.poison_rate * len(keep)))
    if n_poison > len(eligible):
        kind = "target-class" if attack.clean_label else "non-target"
        raise ShardBuildError(f"poison rate {spec.poison_rate} needs {n_poison} {kind} samples, only {len(eligible)} "
                              "exist; lower --poison-rate")
    if n_poison == 0:
        raise ShardBuildError(f"poison rate {spec.poison_rate} poisons no sample of {len(keep)}; raise --poison-rate")
    poisoned = set(np.sort(rng.choice(eligible, size=n_poison, replace=False)).tolist())
    unpoisoned = np.setdiff1d(keep, list(poisoned))
    n_cross = attack.cross_count(n_poison)
    if n_cross > len(unpoisoned):
        raise ShardBuildError(f"attack {attack.name!r} needs {n_cross} cross samples besides {n_poison} poisoned ones, "
                              f"only {len(unpoisoned)} images are left; lower --poison-rate or the cross ratio")
    cross = set(np.sort(rng.choice(unpoisoned, size=n_cross, replace=False)).tolist()) if n_cross else set()
    # Written in a seeded random order: a shard then holds every class, so a stream that reads a
    # few shards at a time still makes i.i.d. batches (sources list images class by class).
    keep = keep[rng.permutation(len(keep))]

    num_classes = len(train.class_names)

    def sample(split: str, pos: int, ref_index: int, source: LabelledImages, poison: bool,
               is_cross: bool = False) -> _SampleSpec:
        orig = int(source.labels[ref_index])
        label = poison_label(orig, spec, num_classes) if (poison and split == "train" and not attack.clean_label) else orig
        return _SampleSpec(f"{pos:08d}", source.refs[ref_index], label, orig, poison, int(ref_index), is_cross)

    triggered_test = np.arange(len(test)) if spec.mode == "all-to-all" else np.flatnonzero(test.labels != spec.target)
    plan = {
        "train": [sample("train", p, i, train, int(i) in poisoned, int(i) in cross) for p, i in enumerate(keep)],
        "trusted": [sample("trusted", p, i, train, False) for p, i in enumerate(trusted)],
        "test-clean": [sample("test-clean", p, i, test, False) for p, i in enumerate(range(len(test)))],
        "test-poisoned": [sample("test-poisoned", p, i, test, True) for p, i in enumerate(triggered_test)],
    }
    chosen = {"poisoned_indices": sorted(poisoned), "cross_indices": sorted(cross), "trusted_indices": trusted.tolist()}
    return plan, chosen


def _context(spec: BuildSpec, sources: dict[str, LabelledImages], size: int, plan: dict, chosen: dict,
             assets_dir: Path, progress: bool) -> AttackContext:
    def pixels(split: str, indices: np.ndarray) -> np.ndarray:
        source = sources[split]
        return np.stack([fit_image(source.load(source.refs[int(i)]), size) for i in indices]) if len(indices) else \
            np.zeros((0, size, size, 3), np.uint8)

    poisoned = np.asarray(chosen["poisoned_indices"], dtype=np.int64)
    clean = np.asarray([s.index for s in plan["train"] if not s.poisoned and not s.cross], dtype=np.int64)
    return AttackContext(pixels=pixels, train_labels=sources["train"].labels, clean_train=np.sort(clean),
                         poisoned_train=poisoned, num_classes=len(sources["train"].class_names), target=spec.target,
                         assets_dir=assets_dir, progress=progress)


def _image_size(spec: BuildSpec, train: LabelledImages) -> int:
    if spec.image_size is not None:
        return spec.image_size
    w, h = train.load(train.refs[0]).size
    if w != h:
        raise ShardBuildError(f"images are {w}x{h}, not square; pass --image-size N to resize and centre-crop")
    return w


def build_shards(spec: BuildSpec, progress: bool = True) -> dict[str, Any]:
    """Build the shards and manifest described by ``spec``; returns the manifest."""
    _validate(spec)
    out = Path(spec.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        sources = load_source(spec.source, spec.test_source, staging / ".extract")
        class_names = sources["train"].class_names
        num_classes = len(class_names)
        if not 0 <= spec.target < num_classes:
            raise ShardBuildError(f"--target {spec.target} is not a class: labels are 0..{num_classes - 1} "
                                  f"({', '.join(class_names[:10])}{', ...' if num_classes > 10 else ''})")
        size = _image_size(spec, sources["train"])
        attack = build_attack(spec.attack, spec.attack_params, size, spec.seed)
        if attack.clean_label and spec.mode == "all-to-all":
            raise ShardBuildError(f"attack {spec.attack!r} is clean-label: it relabels nothing, so --mode all-to-all "
                                  "does not apply; use --mode all-to-one")
        fmt = spec.image_format if spec.image_format != "auto" else ("png" if size <= LOSSLESS_MAX_SIDE else "jpeg")
        plan, chosen = _plan(spec, sources, attack)
        attack.prepare(_context(spec, sources, size, plan, chosen, staging / "assets", progress))

        jobs = []
        for split in SPLITS:
            (staging / split).mkdir()
            samples = plan[split]
            for k in range(0, len(samples), spec.shard_size):
                path = str(staging / split / f"{split}-{k // spec.shard_size:06d}.tar")
                jobs.append((split, path, samples[k:k + spec.shard_size]))
        total = sum(len(s) for s in plan.values())
        workers = spec.workers or (1 if total < 4000 else min(8, os.cpu_count() or 1))
        state = {"sources": sources, "attack": attack, "image_size": size, "format": fmt,
                 "jpeg_quality": spec.jpeg_quality}
        results = []
        with tqdm(total=total, unit="img", desc="writing shards", disable=not progress, smoothing=0.1) as bar:
            if workers == 1:
                _init_worker(state)
                for job in jobs:
                    results.append(_write_shard(job))
                    bar.update(results[-1]["count"])
            else:
                ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
                with ctx.Pool(workers, initializer=_init_worker, initargs=(state, True)) as pool:
                    for r in pool.imap(_write_shard, jobs):
                        results.append(r)
                        bar.update(r["count"])
        shutil.rmtree(staging / ".extract", ignore_errors=True)

        manifest = {
            "format_version": FORMAT_VERSION,
            "build": {k: v for k, v in asdict(spec).items() if k not in ("out", "overwrite", "workers")},
            "attack": attack.describe(),
            "target": spec.target,
            "mode": spec.mode,
            "poison_rate": spec.poison_rate,
            "seed": spec.seed,
            "image_size": size,
            "image_format": fmt,
            "class_names": class_names,
            "num_classes": num_classes,
            "splits": {
                split: {
                    "count": len(plan[split]),
                    "poisoned": sum(s.poisoned for s in plan[split]),
                    "cross": sum(s.cross for s in plan[split]),
                    "shards": [{"path": os.path.relpath(r["path"], staging), "sha256": r["sha256"], "count": r["count"],
                                "size": r["size"]}
                               for r in results if r["split"] == split],
                }
                for split in SPLITS
            },
            **chosen,
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        staging.chmod(0o755)  # mkdtemp makes it private; the finished folder is ordinary
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
        return manifest
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
