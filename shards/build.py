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

Output is written to a hidden temporary folder next to ``out`` and swapped into place at the end,
so a crash never leaves a folder that looks complete and an interrupted rebuild leaves the old
output as it was; the same inputs and seed give byte-identical shards. ``--overwrite`` replaces only
a shard folder this project wrote (``manifest.json`` and the split folders, nothing else), never one
that is, holds or lies inside the source. A lock file next to ``out`` refuses a second build into
the same folder while the first runs; SIGINT and SIGTERM stop the build and remove its temporary
folder, and a build finds and removes what a killed one left.

Image size: ``--image-size N`` resizes (shorter side) and centre-crops every image to N px;
without it the first training image (in source order) sets the size, it must be square, and every
other image must have it. Either way the size is at most ``MAX_IMAGE_SIZE``, and a source image
above Pillow's ``MAX_IMAGE_PIXELS`` is refused before it is decoded (shards.sources.open_image_file).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import queue
import shutil
import signal
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from shards.attacks import AttackContext, build_attack
from shards.errors import Interrupted, ShardBuildError
from shards.outputs import unwritable
from shards.sources import LabelledImages, encode_image, load_source

FORMAT_VERSION = 1
MODES = ("all-to-one", "all-to-all")
SPLITS = ("train", "trusted", "test-clean", "test-poisoned")
LOSSLESS_MAX_SIDE = 64
MAX_IMAGE_SIZE = 1024  # px per side of a shard image: 3 MiB per decoded image, ViT-L/16 at 512 px fits easily
# What a shard folder holds; anything else in a folder named by --overwrite is not ours to delete.
OUTPUT_ENTRIES = {"manifest.json", "assets", "preview.png", *SPLITS}
# bytes the longest hidden sibling adds to the output's name: ".NAME.partial-" + mkdtemp's 8 characters
HIDDEN_NAME_EXTRA = len("..partial-") + 8


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
    crop_pct: float = 1.0  # with image_size: resize the shorter side to image_size / crop_pct, then centre-crop
    test_source: str | None = None
    attack_params: dict[str, Any] = field(default_factory=dict)
    image_format: str = "auto"  # auto: png up to 64 px (and for attacks JPEG would damage), jpeg above
    jpeg_quality: int = 95
    shard_size: int = 1000
    trusted_count: int = 100
    max_train: int | None = None  # a seeded random subset of this many training images
    max_test: int | None = None  # and of test images (both test splits come from it)
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
    if spec.image_size is not None and not 8 <= spec.image_size <= MAX_IMAGE_SIZE:
        raise ShardBuildError(f"--image-size must be in 8..{MAX_IMAGE_SIZE}, got {spec.image_size}")
    if not 0.5 <= spec.crop_pct <= 1.0:
        raise ShardBuildError(f"--crop-pct must be in 0.5..1 (timm's crop_pct, e.g. 0.875), got {spec.crop_pct}")
    if spec.crop_pct != 1.0 and spec.image_size is None:
        raise ShardBuildError("--crop-pct needs --image-size: it says how much of the resized image the crop keeps")
    if spec.seed < 0:
        raise ShardBuildError(f"--seed must be >= 0, got {spec.seed}")
    if spec.workers < 0:
        raise ShardBuildError(f"--workers must be >= 0 (0: automatic), got {spec.workers}")
    if spec.trusted_count < 0:
        raise ShardBuildError(f"--trusted-count must be >= 0, got {spec.trusted_count}")
    for flag, value in (("--max-train", spec.max_train), ("--max-test", spec.max_test)):
        if value is not None and value < 1:
            raise ShardBuildError(f"{flag} must be at least 1, got {value}")
    _check_output(spec)


def _source_paths(spec: BuildSpec) -> list[Path]:
    """The local files or folders the sources read (none for embedded data or hub names)."""
    return [Path(p).resolve() for p in (spec.source, spec.test_source) if p is not None and Path(p).exists()]


def _check_output(spec: BuildSpec) -> None:
    """Refuse an output that would destroy anything but an earlier build's shards."""
    if not spec.out:
        raise ShardBuildError("--out is empty; name a folder for the shards")
    out = Path(spec.out)
    resolved = out.resolve()
    for source in _source_paths(spec):
        if resolved == source or resolved in source.parents or source in resolved.parents:
            raise ShardBuildError(f"--out {out} is, holds or lies inside the source {source}; "
                                  "write the shards to a folder outside the source")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ShardBuildError(f"--out {out} is a file; name a folder for the shards")
    problem = unwritable(out, HIDDEN_NAME_EXTRA)  # first: Path.exists raises on a name too long
    if problem:
        raise ShardBuildError(f"--out {out} cannot be written: {problem}")
    if not out.exists() or not any(out.iterdir()):
        return
    if not spec.overwrite:
        raise ShardBuildError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    if not (out / "manifest.json").is_file():
        raise ShardBuildError(f"--overwrite refused: {out} has no manifest.json, so `mcci shards build` did not "
                              "write it; choose another --out")
    foreign = _foreign_entries(out)
    if foreign:
        raise ShardBuildError(f"--overwrite refused: {out} also holds {', '.join(foreign[:5])}"
                              f"{f' and {len(foreign) - 5} more' if len(foreign) > 5 else ''}, which a shard build "
                              "did not write; move them away or choose another --out")


def _foreign_entries(out: Path) -> list[str]:
    """What in an earlier build's folder that build did not write, as paths relative to ``out`` (top level first):
    the old folder is deleted whole, so a user's notes in ``train/`` or a folder inside ``test-clean/`` must stop
    the overwrite. Ours: the top-level names a build (or ``mcci shards preview``) writes, the shard files its
    manifest lists in each split folder, and under ``assets/`` files whose sha256 the manifest records. Links are
    never ours."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ShardBuildError(f"--overwrite refused: {out / 'manifest.json'} cannot be read ({e}), so what the "
                              "earlier build wrote is unknown; move the folder away or choose another --out") from e
    if not isinstance(manifest, dict):
        manifest = {}
    splits = manifest.get("splits") if isinstance(manifest.get("splits"), dict) else {}
    attack = manifest.get("attack") if isinstance(manifest.get("attack"), dict) else {}
    asset_hashes = set((attack.get("assets") or {}).values()) if isinstance(attack.get("assets"), dict) else set()
    top, nested = [], []
    for entry in sorted(out.iterdir()):
        name = entry.name
        if name not in OUTPUT_ENTRIES or entry.is_symlink():
            top.append(name)
        elif name in SPLITS:
            if not entry.is_dir():
                top.append(name)
                continue
            shards = (splits.get(name) or {}).get("shards") if isinstance(splits.get(name), dict) else None
            listed = {Path(s["path"]).name for s in shards or [] if isinstance(s, dict) and isinstance(s.get("path"), str)
                      and Path(s["path"]).parent.name == name}
            nested += [f"{name}/{child.name}" for child in sorted(entry.iterdir())
                       if child.name not in listed or child.is_symlink() or not child.is_file()]
        elif name == "assets":
            if not entry.is_dir():
                top.append(name)
                continue
            for child in sorted(entry.rglob("*")):
                if child.is_symlink() or (child.is_file() and
                                          hashlib.sha256(child.read_bytes()).hexdigest() not in asset_hashes):
                    nested.append(str(child.relative_to(out)))
                elif child.is_dir() and not any(child.iterdir()):
                    nested.append(str(child.relative_to(out)) + "/")
        elif name in ("manifest.json", "preview.png") and not entry.is_file():
            top.append(name)
    return top + nested


def _hidden(out: Path, kind: str) -> str:
    """Prefix of the hidden siblings of ``out``: ``.NAME.partial-*`` (a build in progress) and
    ``.NAME.old-*`` (the previous output during the swap)."""
    return f".{out.name}.{kind}-"


@contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """Hold ``.NAME.lock`` next to ``out`` (flock: released by the kernel when the holder dies) while
    building; a second build into the same folder is refused with the holder's pid and host."""
    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ShardBuildError(f"another build is writing {out} ({holder}); wait for it to finish, "
                                  "or choose another --out") from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break  # still the file at `path`, not one a finishing holder unlinked meanwhile
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    try:
        yield
    finally:
        os.unlink(path)
        os.close(fd)


def _recover(out: Path) -> None:
    """Under the lock, what an earlier build left is from a build that died: an ``old`` folder
    whose swap never finished goes back into place (or away, if its successor is in place), and
    ``partial`` folders are removed."""
    for old in sorted(out.parent.glob(_hidden(out, "old") + "*")):
        if out.exists():
            shutil.rmtree(old)
        else:
            os.rename(old, out)
    for partial in out.parent.glob(_hidden(out, "partial") + "*"):
        shutil.rmtree(partial)


def _swap_into_place(staging: Path, out: Path) -> None:
    """Replace ``out`` by ``staging``: the old output moves aside first (a rename) and is deleted
    only after the new one is in place, so every moment has one complete folder (``_recover``
    restores the old one if the process dies between the two renames)."""
    staging.chmod(0o755)  # mkdtemp makes it private; the finished folder is ordinary
    if out.exists():
        old = out.parent / f"{_hidden(out, 'old')}{os.getpid()}"  # unique: the lock is ours
        os.rename(out, old)
        os.rename(staging, out)
        shutil.rmtree(old)
    else:
        os.rename(staging, out)


# Signals received during this build. The exception a handler raises can be swallowed where Python
# ignores exceptions (fork hooks, finalisers), so the build also checks this list as it goes.
_SIGNALS: list[int] = []
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _raise_interrupted(signum: int, frame: Any) -> None:
    _SIGNALS.append(signum)
    raise Interrupted(signum)


def _stop_if_signalled() -> None:
    if _SIGNALS:
        raise Interrupted(_SIGNALS[-1])


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``Interrupted`` in the main thread, so the build removes its
    temporary folder and stops its workers instead of dying with them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _SIGNALS.clear()
    previous = {s: signal.signal(s, _raise_interrupted) for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _worker(state: dict[str, Any], jobs: list[tuple[int, tuple]], results: Any) -> None:
    """A shard-writing process: writes its ``(index, job)`` list, putting ``(index, result)`` on ``results``,
    or ``(index, exception)`` and stopping at the first error (the main process raises it)."""
    _init_worker(state, in_worker=True)
    for index, job in jobs:
        try:
            results.put((index, _write_shard(job)))
        except Exception as e:
            results.put((index, e))
            return


def _parallel_results(ctx: Any, workers: int, state: dict[str, Any], jobs: list) -> Iterator[dict[str, Any]]:
    """``_write_shard`` of every job in ``workers`` processes (job i in process i mod workers), yielded in
    job order, waking twice a second to honour a signal. On any exit (done, error, signal) the processes
    are terminated and joined. Not multiprocessing.Pool: its terminate() takes the task queue's lock,
    which a worker waiting for a task holds, so interrupting a build with an idle worker hung forever."""
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(state, list(enumerate(jobs))[k::workers], results), daemon=True)
             for k in range(workers)]
    try:
        # Signals wait while the workers fork (a handler raising inside fork's hooks is lost);
        # the workers unblock them in _init_worker.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            for proc in procs:
                proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        finished: dict[int, dict[str, Any]] = {}
        for index in range(len(jobs)):
            while index not in finished:
                try:
                    done, result = results.get(timeout=0.5)
                except queue.Empty:
                    _stop_if_signalled()
                    crashed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    if crashed:
                        raise ShardBuildError(f"a shard-writing process died (exit code {crashed[0]}; -9 is usually "
                                              "the out-of-memory killer): rerun with fewer --workers") from None
                    continue
                if isinstance(result, Exception):
                    raise result
                finished[done] = result
            yield finished.pop(index)
    finally:
        started = [proc for proc in procs if proc.pid is not None]  # a signal can stop the loop that starts them
        for proc in started:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: the workers restored its default action
        for proc in started:
            proc.join()


def fit_image(image: Image.Image, size: int | None, crop_pct: float = 1.0) -> np.ndarray:
    """Resize the shorter side (bicubic, as timm's pretrained configs mostly ask) to ``size / crop_pct``
    and centre-crop a ``size`` square: timm's evaluation transform (no-op when it already fits)."""
    if size is not None and (image.size != (size, size) or crop_pct != 1.0):
        w, h = image.size
        scale = size / crop_pct / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


# Per-process state for the pool workers (inherited by fork, or set by the initializer).
_STATE: dict[str, Any] = {}


def _init_worker(state: dict[str, Any], in_worker: bool = False) -> None:
    _STATE.update(state)
    if in_worker:
        # Ctrl-C reaches the whole process group: the main process alone handles it and terminates
        # the workers; SIGTERM (what terminate sends) gets its default back, ending the worker at once.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        # attacks that run a network (ISSBA's encoder) get one thread per worker, as DataLoader workers do
        import torch
        torch.set_num_threads(1)


def _write_shard(job: tuple[str, str, list[_SampleSpec]]) -> dict[str, Any]:
    split, path, samples = job
    source: LabelledImages = _STATE["sources"]["train" if split in ("train", "trusted") else "test"]
    attack, size, fmt, quality = _STATE["attack"], _STATE["image_size"], _STATE["format"], _STATE["jpeg_quality"]
    resize_to = size if _STATE["resize"] else None  # without --image-size every image must already have the size
    ext = "png" if fmt == "png" else "jpg"
    tmp = path + ".tmp"
    with wds.TarWriter(tmp, encoder=False, mtime=0.0) as sink:
        for s in samples:
            pixels = fit_image(source.load(s.ref), resize_to, _STATE["crop_pct"])
            if pixels.shape != (size, size, 3):
                raise ShardBuildError(f"image {s.ref} is {pixels.shape[1]}x{pixels.shape[0]}, not {size}x{size} as "
                                      "the first training image; pass --image-size N to resize every image to N px")
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

    test_pool = np.arange(len(test))
    if spec.max_test is not None and spec.max_test < len(test_pool):
        test_pool = np.sort(rng.choice(test_pool, size=spec.max_test, replace=False))
    triggered_test = test_pool if spec.mode == "all-to-all" else test_pool[test.labels[test_pool] != spec.target]
    plan = {
        "train": [sample("train", p, i, train, int(i) in poisoned, int(i) in cross) for p, i in enumerate(keep)],
        "trusted": [sample("trusted", p, i, train, False) for p, i in enumerate(trusted)],
        "test-clean": [sample("test-clean", p, i, test, False) for p, i in enumerate(test_pool)],
        "test-poisoned": [sample("test-poisoned", p, i, test, True) for p, i in enumerate(triggered_test)],
    }
    chosen = {"poisoned_indices": sorted(poisoned), "cross_indices": sorted(cross), "trusted_indices": trusted.tolist()}
    return plan, chosen


def _context(spec: BuildSpec, sources: dict[str, LabelledImages], size: int, plan: dict, chosen: dict,
             assets_dir: Path, progress: bool) -> AttackContext:
    def pixels(split: str, indices: np.ndarray) -> np.ndarray:
        source = sources[split]
        if not len(indices):
            return np.zeros((0, size, size, 3), np.uint8)
        return np.stack([fit_image(source.load(source.refs[int(i)]), size, spec.crop_pct) for i in indices])

    poisoned = np.asarray(chosen["poisoned_indices"], dtype=np.int64)
    clean = np.asarray([s.index for s in plan["train"] if not s.poisoned and not s.cross], dtype=np.int64)
    return AttackContext(pixels=pixels, train_labels=sources["train"].labels, clean_train=np.sort(clean),
                         poisoned_train=poisoned, num_classes=len(sources["train"].class_names), target=spec.target,
                         assets_dir=assets_dir, progress=progress)


def _image_size(spec: BuildSpec, train: LabelledImages) -> int:
    """The size policy (module docstring): --image-size, else the first training image's side."""
    if spec.image_size is not None:
        return spec.image_size
    w, h = train.load(train.refs[0]).size
    if w != h:
        raise ShardBuildError(f"images are {w}x{h}, not square; pass --image-size N to resize and centre-crop")
    if w > MAX_IMAGE_SIZE:
        raise ShardBuildError(f"images are {w}x{h}, above the {MAX_IMAGE_SIZE} px limit of a shard image; "
                              "pass --image-size N (e.g. 224) to resize")
    return w


def build_shards(spec: BuildSpec, progress: bool = True) -> dict[str, Any]:
    """Build the shards and manifest described by ``spec``; returns the manifest."""
    _validate(spec)
    out = Path(os.path.abspath(spec.out))  # "." and "dir/.." have no name to hide siblings under
    out.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(out), _stop_on_signals():
        _recover(out)
        _check_output(spec)  # again under the lock: a build that finished meanwhile may have written it
        staging = Path(tempfile.mkdtemp(prefix=_hidden(out, "partial"), dir=out.parent))
        try:
            manifest = _build_into(spec, staging, progress)
            _swap_into_place(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return manifest


def _build_into(spec: BuildSpec, staging: Path, progress: bool) -> dict[str, Any]:
    """Write every shard and the manifest into ``staging``; returns the manifest."""
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
    fmt = spec.image_format if spec.image_format != "auto" else \
        ("png" if size <= LOSSLESS_MAX_SIDE or attack.lossless else "jpeg")
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
    state = {"sources": sources, "attack": attack, "image_size": size, "resize": spec.image_size is not None,
             "crop_pct": spec.crop_pct,
             "format": fmt, "jpeg_quality": spec.jpeg_quality}
    results = []
    with tqdm(total=total, unit="img", desc="writing shards", disable=not progress, smoothing=0.1) as bar:
        if workers == 1:
            _init_worker(state)
            for job in jobs:
                _stop_if_signalled()
                results.append(_write_shard(job))
                bar.update(results[-1]["count"])
        else:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            for r in _parallel_results(ctx, workers, state, jobs):
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
                            "size": r["size"]} for r in results if r["split"] == split],
            }
            for split in SPLITS
        },
        **chosen,
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
