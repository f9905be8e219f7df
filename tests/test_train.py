"""The train job's parts: optimiser groups, schedule, mixed precision, DeepSpeed settings, per-rank
randomness, resume checks, and what stops a run."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TINY_TRAIN
from mcci_models import create_model, create_sfrn
from pipeline.cli import main
from pipeline.components.optim import build_optimizer, build_scheduler
from pipeline.jobs import train as train_job
from pipeline.support.config import OptimConfig, load_config
from pipeline.support.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _decayed(model: nn.Module) -> set[str]:
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.05))
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "mcci_convnet_tiny"])
def test_weight_decay_groups_are_timms_bare_and_inside_mcci(arch):
    bare = create_sfrn(arch, 10, 32)
    wrapped = create_model("mcci", arch, 10, 32, feature_dim=10, ain_widths=(4, 4, 4))
    decayed_bare = _decayed(bare)
    decayed_in_mcci = {n[len("sfrn."):] for n in _decayed(wrapped) if n.startswith("sfrn.")}
    assert decayed_bare == decayed_in_mcci  # one recipe for the baseline and MCCI's SFRN
    expected = {n for n, p in bare.named_parameters()
                if p.ndim > 1 and n not in getattr(bare, "no_weight_decay", lambda: set())()}
    assert decayed_bare == expected
    if arch.startswith("vit"):
        assert {"pos_embed", "cls_token"}.isdisjoint(decayed_bare)
    assert all(p.ndim > 1 for n, p in wrapped.named_parameters() if n in _decayed(wrapped))


def test_schedule_warms_up_per_step_then_ends_at_zero():
    weights = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(weights.parameters(), lr=1.0)
    scheduler = build_scheduler(optimizer, OptimConfig(lr=1.0, warmup_epochs=1.0, schedule="cosine"), 10, 50)
    lrs = []
    for _ in range(50):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:10] == pytest.approx([(k + 1) / 10 for k in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 39 / 40)))  # one step before the end: ~0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_a_bf16_training_step_runs_on_the_cpu(tiny_shards, tmp_path):
    # its own process: Accelerate's state (and so the precision) is fixed once per process
    subprocess.run([sys.executable, "-m", "pipeline.cli", "train", f"data.shards={tiny_shards}",
                    f"train.out={tmp_path / 'bf16'}", *TINY_TRAIN, "train.mixed_precision=bf16"],
                   check=True, capture_output=True, timeout=300)
    log = [json.loads(line) for line in (tmp_path / "bf16" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 5 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)


def test_deepspeed_config_gets_the_configured_clip_and_batch():
    ds = json.loads((ROOT / "configs" / "deepspeed" / "zero2.json").read_text())
    assert ds["gradient_clipping"] == "auto"  # what Accelerate would fill with its own constant
    train_job.configure_deepspeed(ds, load_config(None, ["optim.grad_clip=2.5", "data.batch_size=48"]))
    assert ds["gradient_clipping"] == 2.5 and ds["train_micro_batch_size_per_gpu"] == 48
    train_job.configure_deepspeed(ds, load_config(None, ["optim.grad_clip=0"]))
    assert ds["gradient_clipping"] == 0  # off means off


def test_deepspeed_bf16_inputs_are_cast_after_fp32_spectra():
    from types import SimpleNamespace

    from pipeline.components.models import build_transform

    def fake(plugin, precision):
        return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), mixed_precision=precision)

    assert train_job.deepspeed_input_dtype(fake(None, "bf16")) is None  # autocast handles it without DeepSpeed
    assert train_job.deepspeed_input_dtype(fake(object(), "no")) is None
    dtype = train_job.deepspeed_input_dtype(fake(object(), "bf16"))
    assert dtype == torch.bfloat16
    cfg = load_config(None, ["data.augment.hflip=false"])
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    fp32 = train_job.model_inputs(build_transform(cfg), images, None)
    cast = train_job.model_inputs(build_transform(cfg), images, dtype)
    assert cast.images.dtype == cast.spectra.dtype == torch.bfloat16
    assert torch.equal(cast.spectra, fp32.spectra.to(torch.bfloat16))  # the DCT ran in fp32, then the cast


def test_ranks_draw_different_dropout_masks():
    def mask(rank: int) -> torch.Tensor:
        train_job.seed_rank_randomness(0, rank)
        return nn.functional.dropout(torch.ones(256), 0.5) > 0

    assert not torch.equal(mask(0), mask(1))
    assert torch.equal(mask(1), mask(1))  # still seeded: a resumed rank repeats itself


def test_mixed_precision_has_one_source(monkeypatch):
    said = []
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert train_job.resolve_mixed_precision(load_config(None, []), said.append) == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert train_job.resolve_mixed_precision(load_config(None, []), said.append) == "bf16"  # auto follows the launcher
    assert said == []
    assert train_job.resolve_mixed_precision(load_config(None, ["train.mixed_precision=no"]), said.append) == "no"
    assert "launcher asks for mixed precision 'bf16'" in said[0] and "train.mixed_precision='no'" in said[0]


def test_resume_identity_names_every_changed_key(tiny_shards):
    from pipeline.data.manifest import load_manifest

    manifest = load_manifest(str(tiny_shards))
    cfg = load_config(None, [f"data.shards={tiny_shards}"])
    saved = train_job.run_identity(cfg, manifest, world_size=2, mixed_precision="no")
    train_job.check_resume_identity(saved, train_job.run_identity(cfg, manifest, 2, "no"))
    train_job.check_resume_identity(None, saved)  # checkpoints from before identities were recorded
    with pytest.raises(ConfigError, match=r"world_size: 2 -> 4"):
        train_job.check_resume_identity(saved, train_job.run_identity(cfg, manifest, 4, "no"))
    other = load_config(None, [f"data.shards={tiny_shards}", "train.epochs=20", "optim.lr=0.1"])
    with pytest.raises(ConfigError, match=r"optim.lr: 0.001 -> 0.1; train.epochs: 10 -> 20"):
        train_job.check_resume_identity(saved, train_job.run_identity(other, manifest, 2, "no"))
    changed = json.loads(json.dumps(manifest))
    changed["attack"]["name"] = "blended"
    with pytest.raises(ConfigError, match=r"data.attack: 'badnets' -> 'blended'; data.fingerprint"):
        train_job.check_resume_identity(saved, train_job.run_identity(cfg, changed, 2, "no"))


def test_resume_with_another_batch_size_is_refused(tiny_shards, tmp_path, capsys):
    run = [f"data.shards={tiny_shards}", f"train.out={tmp_path / 'r'}", *TINY_TRAIN, "train.epochs=2"]
    main(["train", *run])
    (tmp_path / "r" / "model").rename(tmp_path / "r" / "model-done")  # as if it had stopped before the end
    with pytest.raises(SystemExit) as stop:
        main(["train", *run, "data.batch_size=4", "train.resume=true"])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "data.batch_size: 8 -> 4" in error[0]


def test_a_non_finite_loss_stops_with_exit_2_naming_the_step(tiny_shards, tmp_path, monkeypatch, capsys):
    real = train_job.classification_loss

    def diverging(model, inputs, labels):
        loss = real(model, inputs, labels)
        return loss * float("nan") if diverging.calls >= 2 else loss

    def counted(*args):
        diverging.calls += 1
        return diverging(*args)

    diverging.calls = 0
    monkeypatch.setattr(train_job, "classification_loss", counted)
    with pytest.raises(SystemExit) as stop:
        main(["train", f"data.shards={tiny_shards}", f"train.out={tmp_path / 'nan'}", *TINY_TRAIN,
              "train.log_every=2"])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "loss is nan at step 2 (finite at step 0" in error[0] and "optim.lr" in error[0]


@pytest.mark.parametrize("overrides, message", [
    (["reference.count=50"], "reference.count=50 is more than the 6 images of reference.source='trusted'"),
    (["reference.source=test-clean", "reference.count=13"], "more than the 12 images"),
])
def test_data_dependent_settings_are_refused_before_training(tiny_shards, tmp_path, capsys, overrides, message):
    with pytest.raises(SystemExit) as stop:
        main(["train", f"data.shards={tiny_shards}", f"train.out={tmp_path / 'x'}", *TINY_TRAIN, *overrides])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x" / "checkpoints").exists()  # refused before any step


def test_raw_spectra_in_fp16_above_256_px_are_refused():
    manifest = {"image_size": 320, "splits": {"trusted": {"count": 100}}}
    cfg = load_config(None, ["spectrum.normalisation=raw"])
    train_job.check_data_for_run(cfg, {**manifest, "image_size": 256}, "fp16")
    train_job.check_data_for_run(cfg, manifest, "bf16")
    with pytest.raises(ConfigError, match="overflows fp16 .* 255\\*320 = 81600"):
        train_job.check_data_for_run(cfg, manifest, "fp16")
