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
from pipeline.components import distributed, run_checks
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


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_a_bf16_training_step_runs_on_the_cpu(trained, tiny_shards, tmp_path):
    # its own process: Accelerate's state (and so the precision) is fixed once per process
    subprocess.run([sys.executable, "-m", "pipeline.cli", "train", f"data.shards={tiny_shards}",
                    f"train.out={tmp_path / 'bf16'}", *TINY_TRAIN, "train.mixed_precision=bf16"],
                   check=True, capture_output=True, timeout=300)
    bf16, fp32 = _losses(tmp_path / "bf16"), _losses(trained / "mcci")  # the same run in fp32
    # the same weights and batch at step 1, computed in bf16: close to the fp32 loss, and not it
    assert len(bf16) == 5 and bf16[0] != fp32[0] and bf16[0] == pytest.approx(fp32[0], rel=0.05)


def test_deepspeed_config_gets_the_configured_clip_and_batch():
    ds = json.loads((ROOT / "configs" / "deepspeed" / "zero2.json").read_text())
    assert ds["gradient_clipping"] == "auto"  # what Accelerate would fill with its own constant
    distributed.configure_deepspeed(ds, load_config(None, ["optim.grad_clip=2.5", "data.batch_size=48"]))
    assert ds["gradient_clipping"] == 2.5 and ds["train_micro_batch_size_per_gpu"] == 48
    distributed.configure_deepspeed(ds, load_config(None, ["optim.grad_clip=0"]))
    assert ds["gradient_clipping"] == 0  # off means off


def test_deepspeed_bf16_inputs_are_cast_after_fp32_spectra():
    from types import SimpleNamespace

    from pipeline.components.models import build_transform

    def fake(plugin, precision):
        return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), mixed_precision=precision)

    assert distributed.deepspeed_input_dtype(fake(None, "bf16")) is None  # autocast handles it without DeepSpeed
    assert distributed.deepspeed_input_dtype(fake(object(), "no")) is None
    dtype = distributed.deepspeed_input_dtype(fake(object(), "bf16"))
    assert dtype == torch.bfloat16
    cfg = load_config(None, ["data.augment.hflip=false"])
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    fp32 = train_job.model_inputs(build_transform(cfg), images, None)
    cast = train_job.model_inputs(build_transform(cfg), images, dtype)
    assert cast.images.dtype == cast.spectra.dtype == torch.bfloat16
    assert torch.equal(cast.spectra, fp32.spectra.to(torch.bfloat16))  # the DCT ran in fp32, then the cast


def test_ranks_draw_different_dropout_masks():
    def mask(rank: int) -> torch.Tensor:
        distributed.seed_rank_randomness(0, rank)
        return nn.functional.dropout(torch.ones(256), 0.5) > 0

    assert not torch.equal(mask(0), mask(1))
    assert torch.equal(mask(1), mask(1))  # still seeded: a resumed rank repeats itself


def test_mixed_precision_has_one_source(monkeypatch):
    said = []
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert distributed.resolve_mixed_precision(load_config(None, []), said.append) == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert distributed.resolve_mixed_precision(load_config(None, []), said.append) == "bf16"  # auto follows the launcher
    assert said == []
    assert distributed.resolve_mixed_precision(load_config(None, ["train.mixed_precision=no"]), said.append) == "no"
    assert "launcher asks for mixed precision 'bf16'" in said[0] and "train.mixed_precision='no'" in said[0]


def test_resume_identity_names_every_changed_key(tiny_shards):
    from pipeline.data.manifest import load_manifest

    manifest = load_manifest(str(tiny_shards))
    cfg = load_config(None, [f"data.shards={tiny_shards}"])
    saved = run_checks.run_identity(cfg, manifest, world_size=2, mixed_precision="no")
    run_checks.check_resume_identity(saved, run_checks.run_identity(cfg, manifest, 2, "no"))
    run_checks.check_resume_identity(None, saved)  # checkpoints from before identities were recorded
    with pytest.raises(ConfigError, match=r"world_size: 2 -> 4"):
        run_checks.check_resume_identity(saved, run_checks.run_identity(cfg, manifest, 4, "no"))
    other = load_config(None, [f"data.shards={tiny_shards}", "train.epochs=20", "optim.lr=0.1"])
    with pytest.raises(ConfigError, match=r"optim.lr: 0.001 -> 0.1; train.epochs: 10 -> 20"):
        run_checks.check_resume_identity(saved, run_checks.run_identity(other, manifest, 2, "no"))
    changed = json.loads(json.dumps(manifest))
    changed["attack"]["name"] = "blended"
    with pytest.raises(ConfigError, match=r"data.attack: 'badnets' -> 'blended'; data.fingerprint"):
        run_checks.check_resume_identity(saved, run_checks.run_identity(cfg, changed, 2, "no"))


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
    from pipeline.components.variants import Variant

    real = Variant.loss

    def counted(*args, **kwargs):
        counted.calls += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if counted.calls >= 2 else loss

    counted.calls = 0
    monkeypatch.setattr(Variant, "loss", counted)
    with pytest.raises(SystemExit) as stop:
        main(["train", f"data.shards={tiny_shards}", f"train.out={tmp_path / 'nan'}", *TINY_TRAIN,
              "train.log_every=2"])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "loss is nan at step 2 (finite at step 0" in error[0] and "optim.lr" in error[0]


@pytest.mark.parametrize("overrides, message", [
    (["reference.count=50"], "reference.count=50 is more than the 6 images of reference.source='trusted'"),
    (["reference.source=test-clean", "reference.count=13"], "more than the 12 images"),
    (["data.augment.mixup_alpha=0.2", "data.batch_size=7"], "data.batch_size must be even, got 7"),
    (["data.augment.cutmix_alpha=1.0", "train.mcci_variant=lff"], "train.mcci_variant=lff needs each sample's own"),
])
def test_data_dependent_settings_are_refused_before_training(tiny_shards, tmp_path, capsys, overrides, message):
    with pytest.raises(SystemExit) as stop:
        main(["train", f"data.shards={tiny_shards}", f"train.out={tmp_path / 'x'}", *TINY_TRAIN, *overrides])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x" / "checkpoints").exists()  # refused before any step


def test_raw_spectra_in_fp16_above_256_px_are_refused():
    manifest = {"image_size": 320, "splits": {"trusted": {"count": 100}}}
    cfg = load_config(None, ["spectrum.normalisation=raw"])
    run_checks.check_data_for_run(cfg, {**manifest, "image_size": 256}, "fp16", 10)
    run_checks.check_data_for_run(cfg, manifest, "bf16", 10)
    with pytest.raises(ConfigError, match="overflows fp16 .* 255\\*320 = 81600"):
        run_checks.check_data_for_run(cfg, manifest, "fp16", 10)


def test_layer_decay_head_scale_and_probe_shape_the_learning_rates():
    model = create_model("mcci", "vit_tiny_patch16_224", 10, 32, feature_dim=10, ain_widths=(4, 4, 4))
    cfg = OptimConfig(lr=1e-3, layer_decay=0.5, head_lr_scale=10.0, probe_epochs=1.0, warmup_epochs=0.0)
    optimizer = build_optimizer(model, cfg)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert lr_of[id(params["sfrn.blocks.11.mlp.fc1.weight"])] == pytest.approx(1e-3 * 0.5)  # last block
    assert lr_of[id(params["sfrn.blocks.0.mlp.fc1.weight"])] == pytest.approx(1e-3 * 0.5 ** 12)
    assert lr_of[id(params["sfrn.patch_embed.proj.weight"])] == pytest.approx(1e-3 * 0.5 ** 13)  # the stem: deepest
    for name in ("sfrn.head.weight", "ain.net.0.0.weight", "head.weight"):  # new at fine-tuning
        assert lr_of[id(params[name])] == pytest.approx(1e-2)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=4, total_steps=12)
    role_lrs = []
    for _ in range(6):
        role_lrs.append({g["role"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    assert all(r["body"] == 0 for r in role_lrs[:4]) and role_lrs[4]["body"] > 0  # the probe, then the body
    assert all(r["new"] > 0 for r in role_lrs)


def test_validation_each_epoch_matches_eval_of_the_saved_model(trained, tiny_shards, tmp_path):
    records = [json.loads(line) for line in (trained / "mcci" / "val_log.jsonl").read_text().splitlines()]
    assert {(r["epoch"], r["weights"], r["mode"]) for r in records} == {(1, "raw", "own"), (1, "raw", "mind_control")}
    assert (trained / "mcci" / "val_curves.png").read_bytes()[:4] == b"\x89PNG"
    main(["eval", "--checkpoint", str(trained / "mcci"), "--shards", str(tiny_shards), "--num-workers", "0",
          "--device", "cpu", "--out", str(tmp_path / "m.json")])
    evaluated = json.loads((tmp_path / "m.json").read_text())["mcci"]
    # the last validation used the reference the saved model keeps: the same figures as `mcci eval`
    figures = ("clean_acc", "asr", "ra", "clean_acc_by_class")
    assert {r["mode"]: {k: r[k] for k in figures} for r in records} == evaluated


def test_frozen_bn_stats_keep_the_sfrns_and_train_the_ains(tiny_shards, tmp_path):
    from safetensors.torch import load_file

    main(["train", f"data.shards={tiny_shards}", f"train.out={tmp_path / 'f'}", *TINY_TRAIN, "train.freeze_bn_stats=true",
          "train.eval_every=0"])
    weights = load_file(str(tmp_path / "f" / "model" / "model.safetensors"))
    sfrn_means = [v for k, v in weights.items() if k.startswith("sfrn.") and k.endswith("running_mean")]
    ain_means = [v for k, v in weights.items() if k.startswith("ain.") and k.endswith("running_mean")]
    assert sfrn_means and all(torch.equal(v, torch.zeros_like(v)) for v in sfrn_means)  # as initialised
    assert ain_means and all(v.abs().sum() > 0 for v in ain_means)
    assert not (tmp_path / "f" / "val_log.jsonl").read_text()  # eval_every=0: no validation


def test_ema_is_validated_saved_and_resumed_exactly(tiny_shards, tmp_path):
    from safetensors.torch import load_file

    run = [f"data.shards={tiny_shards}", *TINY_TRAIN, "train.epochs=2", "train.ema_decay=0.5",
           "train.checkpoint_every=3", "train.keep_checkpoints=10"]
    main(["train", *run, f"train.out={tmp_path / 'straight'}"])
    records = [json.loads(line) for line in (tmp_path / "straight" / "val_log.jsonl").read_text().splitlines()]
    assert {r["weights"] for r in records} == {"raw", "ema"}
    assert (tmp_path / "straight" / "checkpoints" / "step-00000003" / "ema.safetensors").is_file()
    (tmp_path / "crashed" / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-00000003",
                    tmp_path / "crashed" / "checkpoints" / "step-00000003")
    main(["train", *run, f"train.out={tmp_path / 'crashed'}", "train.resume=true"])
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "model" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    ema = load_file(str(tmp_path / "straight" / "checkpoints" / "step-00000010" / "ema.safetensors"))
    assert all(torch.equal(ema[k].float(), a[k].float()) for k in ema if k in a and not k.startswith("reference")
               and k != "has_reference")  # the saved model is the EMA


def test_the_ema_keeps_the_raw_weights_beside_it_and_eval_scores_both(tiny_shards, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "ema"
    main(["train", f"data.shards={tiny_shards}", *TINY_TRAIN, "train.epochs=2", "train.ema_decay=0.9",
          f"train.out={run}"])
    meta = json.loads((run / "model" / "model.json").read_text())
    assert meta["weights"] == "ema" and meta["other_weights"] == {"raw": "raw.safetensors"}
    raw = load_file(str(run / "model" / "raw.safetensors"))
    final = load_file(str(run / "checkpoints" / "step-00000010" / "model.safetensors"))  # Accelerate's raw weights
    assert all(torch.equal(raw[k], final[k]) for k in final if not k.startswith("reference") and k != "has_reference")
    assert bool(raw["has_reference"])  # each weight set has a reference of its own AIN

    # a run whose raw weights are backdoored: every input to the target under mind control. The EMA (clean) is
    # the model's own weights; eval's default report still shows the raw weights' figures
    target = json.loads((tiny_shards / "manifest.json").read_text())["target"]
    raw["head.bias"] = torch.full_like(raw["head.bias"], -1e4)
    raw["head.bias"][target] = 1e4
    from safetensors.torch import save_file
    save_file(raw, str(run / "model" / "raw.safetensors"))
    out = tmp_path / "eval.json"
    main(["eval", "--checkpoint", str(run), "--shards", str(tiny_shards), "--out", str(out), "--num-workers", "0"])
    report = json.loads(out.read_text())
    assert report["weights"] == "ema" and set(report["by_weights"]) == {"ema", "raw"}
    assert report["by_weights"]["raw"]["mcci"]["mind_control"]["asr"] == 1.0
    assert report["by_weights"]["raw"]["mcci"]["mind_control"]["clean_acc"] < 0.5
    main(["eval", "--checkpoint", str(run), "--shards", str(tiny_shards), "--out", str(out), "--weights", "raw",
          "--num-workers", "0"])
    assert json.loads(out.read_text())["weights"] == "raw" and "by_weights" not in json.loads(out.read_text())


def test_eval_refuses_weights_the_model_does_not_hold(trained, tiny_shards, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--checkpoint", str(trained / "mcci"), "--shards", str(tiny_shards), "--weights", "ema"])
    assert stop.value.code == 2
    assert "holds raw weights, not ema (its run kept no EMA" in capsys.readouterr().err


def test_an_ema_that_would_still_be_its_first_weights_is_refused(tiny_shards, tmp_path, capsys):
    from pipeline.components.ema import start_share

    assert start_share(0.999, False, 600) == pytest.approx(0.999 ** 599)  # the 55 %
    assert start_share(0.999, True, 600) < 1e-6  # timm's warm-up forgets the start
    with pytest.raises(SystemExit) as stop:
        main(["train", f"data.shards={tiny_shards}", *TINY_TRAIN, "train.ema_decay=0.999", "train.ema_warmup=false",
              f"train.out={tmp_path / 'x'}"])
    assert stop.value.code == 2
    assert "leaves 100% of the first step's weights" in capsys.readouterr().err
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_the_ain_warms_up_alone_then_the_sfrn_joins(tiny_shards, tmp_path):
    from accelerate.utils import set_seed
    from safetensors.torch import load_file

    from pipeline.components.models import build_model

    run = tmp_path / "warm"
    overrides = [f"data.shards={tiny_shards}", *TINY_TRAIN, "train.epochs=2", "optim.ain_warmup_epochs=1",
                 "train.mcci_variant=residual", f"train.out={run}", "train.keep_checkpoints=0"]
    main(["train", *overrides])
    set_seed(0)
    start = build_model(load_config(None, overrides), 3, 32).state_dict()
    after_warmup = load_file(str(run / "checkpoints" / "step-00000005" / "model.safetensors"))
    end = load_file(str(run / "checkpoints" / "step-00000010" / "model.safetensors"))
    sfrn = [k for k in start if k.startswith("sfrn.") and start[k].is_floating_point()]
    ain = [k for k in start if k.startswith("ain.") and "weight" in k]
    assert sfrn and all(torch.equal(after_warmup[k], start[k]) for k in sfrn)  # the SFRN waited, BatchNorm too
    assert all(not torch.equal(after_warmup[k], start[k]) for k in ain)  # the AIN learned alone
    split = start["head.weight"].shape[1] // 2
    shrink = after_warmup["head.weight"][0, 0] / start["head.weight"][0, 0]  # the SFRN's half: weight decay alone
    torch.testing.assert_close(after_warmup["head.weight"][:, :split], start["head.weight"][:, :split] * shrink,
                               rtol=1e-5, atol=0)
    assert 0.99 < shrink < 1
    assert any(not torch.equal(end[k], after_warmup[k]) for k in sfrn)  # then it joined
    with pytest.raises(ConfigError, match="must be less than train.epochs"):
        load_config(None, ["optim.ain_warmup_epochs=2", "train.epochs=2"])


def test_trackers_auto_named_and_refused(tiny_shards, tmp_path, monkeypatch):
    from pipeline.components.trackers import resolve_trackers

    assert resolve_trackers(("none",)) == []
    with pytest.raises(ConfigError, match="train.trackers names 'neptune'"):
        resolve_trackers(("neptune",))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="'wandb', which is not installed; pip install wandb"):
        resolve_trackers(("wandb",))
    if real("tensorboard") is None:
        assert resolve_trackers(("auto",)) == []
        return
    assert resolve_trackers(("auto",)) == ["tensorboard"]
    main(["train", f"data.shards={tiny_shards}", f"train.out={tmp_path / 'tb'}", *TINY_TRAIN])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents.*")).parent)).Reload()
    # a per-class figure is one scalar a class
    assert {"train/loss", "val/raw/mind_control/asr", "val/raw/own/clean_acc_by_class/0"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]


def test_grad_accumulation_of_two_halves_is_one_whole_batch_step():
    from accelerate import Accelerator

    from pipeline.data.transforms import ModelInputs

    def run(accumulation: int, chunks: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Linear(6, 3)
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
        optimizer = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.0))
        scheduler = build_scheduler(optimizer, OptimConfig(lr=0.1, schedule="constant"), 10, 10)
        model, optimizer = accelerator.prepare(model, optimizer)
        images = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
        labels = torch.arange(8) % 3
        for _ in range(2):  # two optimiser steps
            for part in range(chunks):
                rows = slice(part * 8 // chunks, (part + 1) * 8 // chunks)
                train_job.train_step(accelerator, lambda x: model(x), optimizer, scheduler,
                                     ModelInputs(images[rows], None), labels[rows], grad_clip=0)
        return accelerator.unwrap_model(model).weight.detach().clone()

    torch.testing.assert_close(run(2, 2), run(1, 1))
    assert not torch.allclose(run(1, 2), run(1, 1))  # without accumulation two half-batches are two steps


def test_grad_accumulation_must_divide_epochs_and_checkpoints():
    manifest = {"image_size": 32, "splits": {"trusted": {"count": 100}}}
    run_checks.check_data_for_run(load_config(None, ["train.grad_accumulation=2"]), manifest, "no", 10)
    with pytest.raises(ConfigError, match="must divide the 9 batches of an epoch"):
        run_checks.check_data_for_run(load_config(None, ["train.grad_accumulation=2"]), manifest, "no", 9)
    with pytest.raises(ConfigError, match="train.checkpoint_every=5"):
        run_checks.check_data_for_run(load_config(None, ["train.grad_accumulation=2", "train.checkpoint_every=5"]),
                                      manifest, "no", 10)


def test_frozen_bn_stats_reach_the_sfrn_inside_a_ddp_style_wrapper():
    model = create_model("mcci", "mcci_convnet_tiny", 3, 32, feature_dim=6, ain_widths=(4, 4, 4))

    class Wrapper(nn.Module):  # as DDP: the network under .module, no .sfrn on the wrapper
        def __init__(self, module: nn.Module):
            super().__init__()
            self.module = module

    wrapped = Wrapper(model)
    train_job.set_train_mode(wrapped, model, freeze_bn_stats=True)
    norms = {name: m.training for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert norms and not any(t for n, t in norms.items() if n.startswith("sfrn."))
    assert all(t for n, t in norms.items() if n.startswith("ain."))  # the AIN's statistics still learn


def test_mixup_mixes_pixels_before_the_spectrum_and_trains(trained, tiny_shards, tmp_path):
    """timm's Mixup in batch mode: image i becomes lam * x_i + (1 - lam) * x_(B-1-i), its label the same
    mix of one-hots (smoothed by label_smoothing), and the AIN's spectrum is that of the mixed pixels."""
    from pipeline.components.models import build_transform
    from pipeline.data.spectra import spectrum

    cfg = load_config(None, ["data.augment.hflip=false", "data.augment.mixup_alpha=1.0", "optim.label_smoothing=0",
                             "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"])
    transform = build_transform(cfg, num_classes=3)
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 1])
    inputs = transform(pixels, train=True, labels=labels)
    lam = float(inputs.targets[0, 0])  # sample 0 (label 0) is mixed with sample 3 (label 1)
    assert 0 < lam < 1 and torch.allclose(inputs.targets.sum(1), torch.ones(4))
    expected = lam * pixels.float() + (1 - lam) * pixels.float().flip(0)
    torch.testing.assert_close(inputs.images, expected / 127.5 - 1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(inputs.spectra, spectrum(expected), atol=1e-3, rtol=1e-3)
    assert transform(pixels, train=False, labels=labels).targets is None  # evaluation never mixes
    main(["train", f"data.shards={tiny_shards}", f"train.out={tmp_path / 'mixed'}", *TINY_TRAIN,
          "data.augment.mixup_alpha=0.2", "data.augment.cutmix_alpha=1.0"])
    # the run of the same weights and batches without mixing: the first step's loss is already another
    mixed, plain = _losses(tmp_path / "mixed"), _losses(trained / "mcci")
    assert len(mixed) == 5 and mixed[0] != plain[0]


def test_drop_path_reaches_timms_blocks_and_is_refused_where_there_is_none():
    from mcci_models import ModelError

    model = create_model("mcci", "vit_tiny_patch16_224", 3, 32, drop_path_rate=0.2)
    rates = [m.drop_prob for m in model.sfrn.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)  # timm's linear rule: the last block drops most
    with pytest.raises(ModelError, match="no stochastic depth"):
        create_model("none", "mcci_convnet_tiny", 3, 32, drop_path_rate=0.1)


def _steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_a_run_that_died_before_its_first_checkpoint_logs_each_step_once_when_started_again(tiny_shards, tmp_path,
                                                                                            monkeypatch):
    from pipeline.components.variants import Variant

    run = [f"data.shards={tiny_shards}", f"train.out={tmp_path / 'r'}", *TINY_TRAIN]  # one checkpoint: at step 5
    real = Variant.loss

    def dies_at_step_3(self, *args, **kwargs):
        dies_at_step_3.calls += 1
        if dies_at_step_3.calls == 3:
            raise RuntimeError("killed")  # as a lost node: steps 1 and 2 are logged, no checkpoint written
        return real(self, *args, **kwargs)

    dies_at_step_3.calls = 0
    monkeypatch.setattr(Variant, "loss", dies_at_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        main(["train", *run])
    assert _steps_logged(tmp_path / "r") == [1, 2] and not (tmp_path / "r" / "checkpoints").exists()
    monkeypatch.setattr(Variant, "loss", real)
    main(["train", *run, "train.resume=true"])  # nothing to resume: it starts again at step 0
    assert _steps_logged(tmp_path / "r") == [1, 2, 3, 4, 5]


def test_a_run_resumed_from_an_epoch_end_checkpoint_logs_each_epochs_validation_once(tiny_shards, tmp_path,
                                                                                      monkeypatch):
    run = [f"data.shards={tiny_shards}", f"train.out={tmp_path / 'r'}", *TINY_TRAIN, "train.epochs=3",
           "train.checkpoint_every=5", "train.keep_checkpoints=10"]  # 5 steps an epoch: every epoch's end is due
    real = train_job.save_training_state

    def dies_saving_epoch_2(accelerator, out, state, *args, **kwargs):
        if (state["step"], state["epoch"]) == (10, 2):  # killed while epoch 2's own checkpoint was being written
            raise RuntimeError("killed")
        return real(accelerator, out, state, *args, **kwargs)

    monkeypatch.setattr(train_job, "save_training_state", dies_saving_epoch_2)
    with pytest.raises(RuntimeError, match="killed"):
        main(["train", *run])
    monkeypatch.setattr(train_job, "save_training_state", real)
    main(["train", *run, "train.resume=true"])
    validated = [(r["epoch"], r["mode"]) for r in map(json.loads, (tmp_path / "r" / "val_log.jsonl").read_text().splitlines())]
    assert validated == [(epoch, mode) for epoch in (1, 2, 3) for mode in ("own", "mind_control")]
    assert _steps_logged(tmp_path / "r") == list(range(1, 16))


@pytest.mark.parametrize("edited_size", [64, 16])
def test_a_manifest_that_disagrees_with_its_shards_is_refused_before_the_first_step(tiny_shards, tmp_path, capsys,
                                                                                     edited_size):
    """Issue 29: an edited image_size trained a whole epoch, then crashed with a traceback, saving neither a model
    nor a checkpoint. The shards are checked against the manifest before the first step: one line, exit 2."""
    import shutil

    shards = shutil.copytree(tiny_shards, tmp_path / "shards")
    manifest = json.loads((shards / "manifest.json").read_text())
    (shards / "manifest.json").write_text(json.dumps({**manifest, "image_size": edited_size}))
    with pytest.raises(SystemExit) as stop:
        main(["train", f"data.shards={shards}", f"train.out={tmp_path / 'run'}", *TINY_TRAIN])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"is 32x32 px, but manifest.json says image_size {edited_size}" in error[0], error
    assert "rebuild the shards" in error[0]
    log = tmp_path / "run" / "train_log.jsonl"
    assert not (log.exists() and log.read_text().strip()) and not (tmp_path / "run" / "checkpoints").exists()


def test_a_failure_after_steps_keeps_them_and_the_resume_continues_without_repeating_a_step(tiny_shards, tmp_path,
                                                                                           capsys):
    """A test shard damaged at its end passes the first-sample check and fails the epoch's validation, after the
    epoch's steps: the checkpoint of those steps is written before the error, the line says so, and once the shard
    is restored the resumed run validates that epoch, goes on, and its logs hold each step once."""
    import shutil

    shards = shutil.copytree(tiny_shards, tmp_path / "shards")
    shard = sorted((shards / "test-clean").glob("*.tar"))[-1]
    good = shard.read_bytes()
    shard.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # tar padding: only the sha256 sees it, at the end
    run = [f"data.shards={shards}", f"train.out={tmp_path / 'run'}", *TINY_TRAIN, "train.epochs=2"]
    with pytest.raises(SystemExit) as stop:
        main(["train", *run])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "sha256 differs" in error[0] and "test-clean" in error[0], error
    assert "kept checkpoint step-00000005" in error[0] and "train.resume=true" in error[0], error
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    shard.write_bytes(good)
    main(["train", *run, "train.resume=true"])
    assert "resumed from step 5 (epoch 0)" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 11))
    val = [json.loads(line) for line in (tmp_path / "run" / "val_log.jsonl").read_text().splitlines()]
    assert sorted({(r["step"], r["weights"], r["mode"]) for r in val}) == sorted((r["step"], r["weights"], r["mode"])
                                                                             for r in val)  # no row twice
    assert {r["step"] for r in val} == {5, 10} and (tmp_path / "run" / "model" / "model.safetensors").is_file()
