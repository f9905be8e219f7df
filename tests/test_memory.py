"""data.in_memory: the train split decoded once onto the device, each epoch a seeded permutation cut into batches;
the samples are the shards' own, a resumed run is the uninterrupted one, and a split too large is refused first."""
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.data.batches import Batch
from pipeline.data.loaders import eval_loader
from pipeline.data.manifest import load_manifest
from pipeline.data.memory import DeviceSplit, check_fits, free_bytes
from pipeline.data.storage import DEFAULT_STREAM
from pipeline.support.errors import ConfigError

from conftest import TINY_TRAIN

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def split(tiny_shards) -> DeviceSplit:
    return DeviceSplit.load(str(tiny_shards), load_manifest(str(tiny_shards)), "train", CPU, 0, DEFAULT_STREAM)


def test_the_split_holds_each_sample_of_the_shards_once_as_the_loader_reads_it(split, tiny_shards):
    manifest = load_manifest(str(tiny_shards))
    streamed = Batch.concatenate(list(eval_loader(str(tiny_shards), manifest, "train", 5, 0, by_rank=False)))
    assert split.count == manifest["splits"]["train"]["count"] == 42
    assert split.samples.images.dtype == torch.uint8 and split.samples.images.shape == (42, 3, 32, 32)
    by_index = {int(i): n for n, i in enumerate(streamed.indices)}
    assert sorted(by_index) == sorted(int(i) for i in split.samples.indices)
    for n, index in enumerate(split.samples.indices.tolist()):
        m = by_index[index]
        assert torch.equal(split.samples.images[n], streamed.images[m])
        assert (split.samples.labels[n], split.samples.poisoned[n]) == (streamed.labels[m], streamed.poisoned[m])


def test_an_epoch_is_a_seeded_permutation_in_full_batches(split):
    first = list(split.epoch(batch_size=8, steps=5, seed=3, epoch=0))
    assert len(first) == 5 and all(len(b.labels) == 8 for b in first)
    seen = torch.cat([b.indices for b in first]).tolist()
    assert len(set(seen)) == 40  # 40 of the 42, none twice
    again = torch.cat([b.indices for b in split.epoch(8, 5, seed=3, epoch=0)]).tolist()
    assert again == seen  # a resume replays the same order
    assert torch.cat([b.indices for b in split.epoch(8, 5, seed=3, epoch=1)]).tolist() != seen
    assert torch.cat([b.indices for b in split.epoch(8, 5, seed=4, epoch=0)]).tolist() != seen  # another rank
    # a batch's fields stay with its images
    batch = first[0]
    rows = [int((split.samples.indices == i).nonzero()) for i in batch.indices]
    assert torch.equal(batch.images, split.samples.images[rows])
    assert torch.equal(batch.orig_labels, split.samples.orig_labels[rows])


def test_more_steps_than_the_split_holds_see_every_sample_before_any_twice(split):
    seen = torch.cat([b.indices for b in split.epoch(batch_size=10, steps=6, seed=0, epoch=0)]).tolist()
    assert len(set(seen[:42])) == 42 and len(seen) == 60


def test_a_split_larger_than_half_the_free_memory_is_refused_naming_the_fix():
    assert check_fits(100, 32, CPU, free=10**9) == 100 * 3 * 32 * 32
    with pytest.raises(ConfigError, match=r"50,000 images at 224 px.*set data.in_memory=false"):
        check_fits(50_000, 224, CPU, free=10**9)


def test_the_host_memory_checked_is_what_the_os_says_is_available(monkeypatch):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=3 * 2**30, total=4 * 2**30))
    assert free_bytes(CPU) == 3 * 2**30
    check_fits(20_000, 128, CPU)  # 0.92 GiB decoded: under half of 3 GiB
    with pytest.raises(ConfigError, match=r"1.83 GiB decoded .* more than 50% of the 3.00 GiB free on cpu"):
        check_fits(40_000, 128, CPU)


def test_an_in_memory_run_trains_and_resumes_to_the_uninterrupted_runs_weights(tiny_shards, tmp_path):
    run = [*TINY_TRAIN, "data.in_memory=true", "train.epochs=2", "train.checkpoint_every=2", "train.keep_checkpoints=10"]
    straight = tmp_path / "straight"
    main(["train", f"data.shards={tiny_shards}", f"train.out={straight}", *run])
    crashed = tmp_path / "crashed"
    shutil.copytree(straight, crashed, ignore=shutil.ignore_patterns("model", "*.png"))
    for later in sorted((crashed / "checkpoints").glob("step-*"))[2:]:  # keep steps 2 and 4: mid-epoch 1 of 2
        shutil.rmtree(later)
    main(["train", f"data.shards={tiny_shards}", f"train.out={crashed}", *run, "train.resume=true"])
    a = load_file(str(straight / "model" / "model.safetensors"))
    b = load_file(str(crashed / "model" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_the_fast_cifar_recipe_trains_at_tiny_scale_on_the_cpu(tiny_shards, tmp_path):
    """configs/cifar10_preact_fast.yaml as a GPU window runs it (in memory, bf16, channels-last, compiled), shrunk to
    the tiny shards and the CPU; the compile backend is aot_eager, which needs no C++ toolchain."""
    import json

    out = tmp_path / "fast"
    config = Path(__file__).resolve().parent.parent / "configs" / "cifar10_preact_fast.yaml"
    # its own process: Accelerate's state (and so the recipe's bf16) is fixed once per process
    subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--config", str(config), f"data.shards={tiny_shards}",
                    f"train.out={out}", "train.cpu=true", "train.compile=aot_eager", "data.batch_size=8",
                    "data.num_workers=0", "train.epochs=2", "train.eval_every=1", "optim.warmup_epochs=0.5",
                    "reference.count=4", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"],
                   check=True, capture_output=True, timeout=600)
    assert (out / "model" / "model.safetensors").is_file()
    epochs = [json.loads(line) for line in (out / "val_log.jsonl").read_text().splitlines()]
    assert {(r["epoch"], r["mode"]) for r in epochs} == {(e, m) for e in (1, 2) for m in ("own", "mind_control")}
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps[-1] == 10  # 42 images, batches of 8: 5 full batches an epoch
