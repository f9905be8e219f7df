"""The two MCCI variants with a switch or a model side (docs/VARIANTS.md): ``isolate`` (the audit's rule
isolates mid-training, the flagged samples are unlearned, the set survives a resume) and the AIN's
low-pass view (``model.ain_view=spectrum+lowpass``: what it keeps and drops, and every job rebuilds it).
The loss term of ``isolate`` is checked beside the other variants' in test_losses.py."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import TINY_TRAIN
from mcci_models import MCCI, create_model_from_config
from pipeline.cli import main
from pipeline.components.checkpoint import save_model
from pipeline.components.isolation import flagged_indices, isolation_rows
from pipeline.components.models import build_model, build_transform, load_trained
from pipeline.components.run_checks import check_resume_identity
from pipeline.components.scoring import COLUMNS, score_batches, score_samples, summarise
from pipeline.data.batches import Batch
from pipeline.data.transforms import InputTransform, lowpass_view
from pipeline.support.config import AugmentConfig, load_config, to_dict
from pipeline.support.errors import ConfigError


# --- isolate -------------------------------------------------------------------------------------------------------

class _ChannelMeans(nn.Module):
    """A hand-made SFRN: each channel's mean. The images below hold their class in one channel."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean((2, 3))


class _FineDetail(nn.Module):
    """A hand-made AIN: the energy of the spectrum's high-frequency quadrant, saturated, as a push to class 0
    (the target). Flat images have none; the 2x2 checkerboard trigger below has plenty."""

    def forward(self, spectra: torch.Tensor) -> torch.Tensor:
        detail = torch.tanh(spectra[:, :, 4:, 4:].abs().sum((1, 2, 3)))
        return torch.stack([20 * detail, torch.zeros_like(detail), torch.zeros_like(detail)], dim=1)


def _image(cls: int, trigger: bool) -> torch.Tensor:
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    image[cls] = 200
    if trigger:
        image[0, :2, :2] = torch.tensor([[255, 0], [0, 255]], dtype=torch.uint8)
    return image


def test_isolation_flags_exactly_the_samples_whose_label_only_the_ain_explains():
    model = MCCI(_ChannelMeans(), _FineDetail(), num_classes=3, feature_dim=3, spectrum_shape=(3, 8, 8)).eval()
    with torch.no_grad():  # the fused logit: 10 x the SFRN's class evidence, plus the AIN's push to class 0
        model.head.weight.copy_(torch.cat([10 * torch.eye(3), torch.eye(3)], dim=1))
        model.head.bias.zero_()
    transform = InputTransform((0.0,) * 3, (1.0,) * 3, AugmentConfig(), "log", "torch", with_spectra=True)
    model.set_reference("feature", transform(torch.stack([_image(c, False) for c in range(3)]), train=False).spectra)
    # (image class, trigger, training label, index)
    samples = [(0, False, 0, 10), (1, False, 1, 11), (2, False, 2, 12),  # clean
               (1, True, 0, 20), (2, True, 0, 21),  # poisoned: only the AIN explains the label -> flagged
               (0, True, 0, 30),  # a triggered target-class image: the SFRN explains it too -> kept
               (1, False, 0, 40)]  # a wrong label nothing explains -> kept
    batch = Batch(torch.stack([_image(c, t) for c, t, _, _ in samples]), torch.tensor([y for *_, y, _ in samples]),
                  torch.tensor([c for c, *_ in samples]), torch.tensor([t and y != c for c, t, y, _ in samples]),
                  torch.tensor([i for *_, i in samples]))
    rows = score_batches(model, [batch], transform, torch.device("cpu"))
    assert flagged_indices(rows) == [20, 21]

    # ABL's rule read off the AIN: the triggered images labelled 0, the target-class one included, are what the
    # AIN alone fits best (its push to class 0 saturated); without a trigger it says nothing (chance: log 3)
    ain_loss = dict(zip(rows[:, COLUMNS.index("index")].tolist(), rows[:, COLUMNS.index("ain_loss")].tolist()))
    assert max(ain_loss[i] for i in (20, 21, 30)) < 0.01
    assert [ain_loss[i] for i in (10, 11, 12, 40)] == pytest.approx([math.log(3)] * 4)
    assert flagged_indices(rows, isolation_rows(rows, "ain_loss", 3 / 7)) == [20, 21, 30]
    assert flagged_indices(rows, isolation_rows(rows, "audit")) == [20, 21]
    # ABL's plain rule reads the model's own cross-entropy
    with torch.no_grad():
        inputs = transform(batch.images, train=False)
        own_loss = torch.nn.functional.cross_entropy(model(inputs.images, inputs.spectra), batch.labels,
                                                     reduction="none")
    torch.testing.assert_close(rows[:, COLUMNS.index("loss")], own_loss.double())


def test_loss_isolation_takes_the_lowest_losses_of_its_column_breaks_ties_by_index_and_is_summarised_by_them():
    # index, label, orig_label, poisoned, own_pred, mind_control_pred, score, loss, ain_loss
    rows = torch.tensor([[7, 0, 0, 1, 0, 0, 0.0, 0.9, 0.05],  # a clean-label poisoned sample: the audit misses it
                         [3, 0, 0, 1, 0, 0, 0.0, 0.9, 0.10],
                         [5, 0, 0, 1, 0, 0, 0.0, 0.2, 0.10],  # ties with index 3: the lower index goes first
                         [2, 1, 1, 0, 1, 1, 0.0, 0.1, 2.00],
                         [9, 2, 2, 0, 2, 2, 0.0, 0.3, 1.50]], dtype=torch.float64)
    flagged = isolation_rows(rows, "ain_loss", 0.4)
    assert flagged_indices(rows, flagged) == [3, 7]
    assert flagged_indices(rows.flip(0), isolation_rows(rows.flip(0), "ain_loss", 0.4)) == [3, 7]  # any row order
    assert flagged_indices(rows, isolation_rows(rows, "loss", 0.4)) == [2, 5]  # each rule reads its own column
    assert isolation_rows(rows, "audit").sum() == 0  # no label conflict: nothing for the audit's rule
    summary = summarise(rows, flagged, -rows[:, COLUMNS.index("ain_loss")])
    truth = summary["recorded_poisoned"]
    assert (summary["flagged"], truth["flagged"], truth["precision"]) == (2, 2, 1.0)
    assert truth["recall"] == pytest.approx(2 / 3, abs=1e-4) and truth["auroc"] == 1.0  # every poisoned fitted best


ISOLATE = [*TINY_TRAIN, "train.mcci_variant=isolate", "train.epochs=5", "train.isolate_epoch=4", "train.eval_every=0",
           "train.checkpoint_every=3", "train.keep_checkpoints=20"]  # 5 steps an epoch: the switch at step 20


def _trainer_state(run, step):
    return json.loads((run / "checkpoints" / f"step-{step:08d}" / "trainer.json").read_text())


def test_isolate_trains_switches_once_and_a_resume_reproduces_the_flagged_set(tiny_shards, tmp_path, capsys):
    run = [f"data.shards={tiny_shards}", *ISOLATE]
    straight = tmp_path / "straight"
    main(["train", *run, f"train.out={straight}"])
    assert "isolation after epoch 4 (audit):" in capsys.readouterr().out
    record = json.loads((straight / "isolation.json").read_text())
    assert record["epoch"] == 4 and record["step"] == 20 and record["samples"] == 42  # every training sample once
    assert 0 < record["flagged"] == len(record["flagged_indices"])  # this recipe fits some poison through the AIN
    assert {"count", "precision", "recall"} <= set(record["recorded_poisoned"])
    assert _trainer_state(straight, 18)["variant_state"] is None
    assert _trainer_state(straight, 20)["variant_state"] == _trainer_state(straight, 25)["variant_state"] == record

    # before the switch the run is plain MCCI; after it the isolated samples change the steps
    main(["train", f"data.shards={tiny_shards}", *TINY_TRAIN, "train.epochs=5", "train.eval_every=0",
          f"train.out={tmp_path / 'plain'}"])
    logs = [[r["loss"] for r in map(json.loads, (tmp_path / d / "train_log.jsonl").read_text().splitlines())]
            for d in ("straight", "plain")]
    assert logs[0][:20] == logs[1][:20] and logs[0][20:] != logs[1][20:]

    final = load_file(str(straight / "model" / "model.safetensors"))
    for step in (21, 18):  # a resume after the switch takes the set from the checkpoint; one before makes it again
        crashed = tmp_path / f"from-{step}"
        shutil.copytree(straight / "checkpoints" / f"step-{step:08d}", crashed / "checkpoints" / f"step-{step:08d}")
        main(["train", *run, f"train.out={crashed}", "train.resume=true"])
        assert json.loads((crashed / "isolation.json").read_text()) == record
        assert _trainer_state(crashed, 25)["variant_state"] == record
        resumed = load_file(str(crashed / "model" / "model.safetensors"))
        for key in final:  # deterministic on the CPU: the resumed run is the uninterrupted run
            torch.testing.assert_close(resumed[key], final[key], rtol=0, atol=0, msg=key)


def test_isolate_by_a_loss_flags_its_fraction_and_records_its_rule(tiny_shards, tmp_path, capsys):
    run = tmp_path / "ain-loss"
    main(["train", f"data.shards={tiny_shards}", *ISOLATE, "train.isolate_by=ain_loss", "train.isolate_fraction=0.1",
          f"train.out={run}"])
    assert "isolation after epoch 4 (ain_loss): 4 of 42" in capsys.readouterr().out
    record = json.loads((run / "isolation.json").read_text())
    assert (record["rule"], record["fraction"], record["flagged"]) == ("ain_loss", 0.1, 4)
    # the model the switch scored (step 20's checkpoint), with the reference the switch gave it, scored again here:
    # the flags are the four samples the AIN's half fits best (round(0.1 * 42)), ranked by hand
    from pipeline.components.evaluation import set_model_reference
    from pipeline.data.manifest import load_manifest

    cfg = load_config(None, [f"data.shards={tiny_shards}", *ISOLATE])
    model = build_model(cfg, 3, 32, load_pretrained=False)
    model.load_state_dict(load_file(str(run / "checkpoints" / "step-00000020" / "model.safetensors")))
    manifest, transform = load_manifest(str(tiny_shards)), build_transform(cfg)
    r = cfg.reference
    set_model_reference(model.eval(), str(tiny_shards), manifest, r.kind, r.source, r.count, transform, torch.device("cpu"))
    rows = score_samples(model, str(tiny_shards), manifest, "train", transform, torch.device("cpu"), 16, 0).tolist()
    fitted_best = sorted(rows, key=lambda r: (r[COLUMNS.index("ain_loss")], r[COLUMNS.index("index")]))[:4]
    assert record["flagged_indices"] == sorted(int(r[COLUMNS.index("index")]) for r in fitted_best)
    poisoned = [r[COLUMNS.index("ain_loss")] for r in rows if r[COLUMNS.index("poisoned")]]
    clean = [r[COLUMNS.index("ain_loss")] for r in rows if not r[COLUMNS.index("poisoned")]]
    ordered = sum((p < c) + 0.5 * (p == c) for p in poisoned for c in clean)  # a lower AIN loss is more suspect
    assert record["recorded_poisoned"]["auroc"] == pytest.approx(ordered / (len(poisoned) * len(clean)), abs=1e-4)


@pytest.mark.parametrize("overrides, message", [
    (["train.mcci_variant=isolate", "train.epochs=2", "train.isolate_epoch=2"], "must be less than train.epochs"),
    (["train.mcci_variant=isolate", "train.defense=none"], "needs train.defense=mcci"),
])
def test_isolate_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_checkpoint_without_a_key_added_since_resumes_while_the_key_keeps_its_default(tiny_shards):
    from pipeline.components.run_checks import run_identity
    from pipeline.data.manifest import load_manifest

    manifest = load_manifest(str(tiny_shards))
    saved = run_identity(load_config(None, []), manifest, 1, "no")
    for key in ("model.ain_view", "model.ain_lowpass_size", "train.isolate_epoch"):
        del saved[key]  # as a checkpoint written before these keys existed holds it
    check_resume_identity(saved, run_identity(load_config(None, []), manifest, 1, "no"))
    with pytest.raises(ConfigError, match=r"model.ain_view: None -> 'spectrum\+lowpass'"):
        check_resume_identity(saved, run_identity(load_config(None, ["model.ain_view=spectrum+lowpass"]), manifest, 1,
                                                  "no"))


# --- the low-pass view ---------------------------------------------------------------------------------------------

def test_lowpass_view_drops_a_fine_patch_and_keeps_smooth_stripes():
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    patch = torch.zeros(32, 32)
    patch[4:8, 4:8] = torch.tensor([[1.0, -1.0] * 2, [-1.0, 1.0] * 2] * 2)  # a checkerboard on 2x2 cells (16 a side)
    torch.testing.assert_close(lowpass_view(images + 3 * patch, 16), lowpass_view(images, 16), rtol=0, atol=1e-5)
    stripes = 0.5 * torch.sin(2 * math.pi * 6 * torch.arange(32) / 32).expand(32, 32)  # SIG's, 6 periods a side
    kept = lowpass_view(images + stripes, 16) - lowpass_view(images, 16)
    assert torch.nn.functional.cosine_similarity(kept.flatten(1), stripes.expand_as(kept).flatten(1)).min() > 0.9
    assert kept.norm() > 0.5 * stripes.expand_as(kept).norm()  # softened (cell means, then bilinear), not removed


def _lowpass_config(*extra: str):
    return load_config(None, ["model.sfrn=mcci_convnet_tiny", "model.ain_widths=[4,4,4]", "model.feature_dim=6",
                              "model.ain_view=spectrum+lowpass", *extra])


def test_the_lowpass_view_is_the_ains_extra_channels_and_the_saved_model_rebuilds_it(tmp_path):
    cfg = _lowpass_config()
    torch.manual_seed(0)
    model = build_model(cfg, 3, 32, load_pretrained=False).eval()
    first_conv = next(m for m in model.ain.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 6 and model.reference_spectrum.shape == (6, 32, 32)

    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    inputs = build_transform(cfg)(pixels, train=False)
    spectrum_only = build_transform(_lowpass_config("model.ain_view=spectrum"))(pixels, train=False)
    torch.testing.assert_close(inputs.spectra[:, :3], spectrum_only.spectra)
    torch.testing.assert_close(inputs.spectra[:, 3:], lowpass_view(inputs.images, 16))
    model.set_reference("feature", inputs.spectra)

    save_model(tmp_path / "model", model.state_dict(), cfg, {"num_classes": 3, "image_size": 32})
    loaded, loaded_cfg, _ = load_trained(tmp_path / "model", torch.device("cpu"))
    assert loaded_cfg.model.ain_view == "spectrum+lowpass"
    again = build_transform(loaded_cfg)(pixels, train=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(again.images, again.spectra), model(inputs.images, inputs.spectra))
        torch.testing.assert_close(loaded(again.images), model(inputs.images))  # mind control
    old = to_dict(cfg)  # a config saved before the view existed: the spectrum alone
    del old["model"]["ain_view"], old["model"]["ain_lowpass_size"]
    assert next(m for m in create_model_from_config(old, 3, 32, False).ain.modules()
                if isinstance(m, nn.Conv2d)).in_channels == 3


def test_the_ain_size_rule_counts_the_views_channels():
    from mcci_models.flops import forward_flops

    cfg = _lowpass_config("model.ain_widths=[32,64,128]", "model.ain_budget=0.3")
    model = build_model(cfg, 3, 32, load_pretrained=False)
    assert next(m for m in model.ain.modules() if isinstance(m, nn.Conv2d)).in_channels == 6
    assert forward_flops(model.ain, (1, 6, 32, 32)) <= 0.3 * forward_flops(model.sfrn, (1, 3, 32, 32))


def test_a_lowpass_model_trains_end_to_end_and_eval_audit_export_rebuild_it(tiny_shards, tmp_path):
    out = tmp_path / "lowpass"
    main(["train", f"data.shards={tiny_shards}", f"train.out={out}", *TINY_TRAIN, "model.ain_view=spectrum+lowpass",
          "model.ain_lowpass_size=8"])
    assert (out / "model" / "model.safetensors").is_file()
    assert load_file(str(out / "model" / "model.safetensors"))["reference_spectrum"].shape == (6, 32, 32)
    common = ["--checkpoint", str(out), "--shards", str(tiny_shards), "--num-workers", "0", "--device", "cpu"]
    main(["eval", *common, "--out", str(tmp_path / "metrics.json")])
    validated = [json.loads(line) for line in (out / "val_log.jsonl").read_text().splitlines()]
    # the last validation used the training job's view and reference: eval's figures only if it rebuilt both
    assert {r["mode"]: {k: r[k] for k in ("clean_acc", "asr", "ra", "clean_acc_by_class")} for r in validated} == \
        json.loads((tmp_path / "metrics.json").read_text())["mcci"]
    main(["audit", *common, "--out", str(tmp_path / "audit")])
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["samples"] == 42
    main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "export")])  # checks its logits against MCCI's
    assert (tmp_path / "export" / "model.safetensors").is_file()
