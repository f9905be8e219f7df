"""The AIN's low-pass view (``model.ain_view=spectrum+lowpass``, docs/VARIANTS.md): what it keeps and drops,
and every job rebuilds it."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import TINY_TRAIN
from mcci_models import create_model_from_config
from pipeline.cli import main
from pipeline.components.checkpoint import save_model
from pipeline.components.models import build_model, build_transform, load_trained
from pipeline.components.run_checks import check_resume_identity
from pipeline.data.transforms import lowpass_view
from pipeline.support.config import load_config, to_dict
from pipeline.support.errors import ConfigError


def test_a_checkpoint_without_a_key_added_since_resumes_while_the_key_keeps_its_default(tiny_shards):
    from pipeline.components.run_checks import run_identity
    from pipeline.data.manifest import load_manifest

    manifest = load_manifest(str(tiny_shards))
    saved = run_identity(load_config(None, []), manifest, 1, "no")
    for key in ("model.ain_view", "model.ain_lowpass_size"):
        del saved[key]  # as a checkpoint written before these keys existed holds it
    check_resume_identity(saved, run_identity(load_config(None, []), manifest, 1, "no"))
    with pytest.raises(ConfigError, match=r"model.ain_view: None -> 'spectrum\+lowpass'"):
        check_resume_identity(saved, run_identity(load_config(None, ["model.ain_view=spectrum+lowpass"]), manifest, 1,
                                                  "no"))


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
    assert {r["mode"]: {k: r[k] for k in ("clean_acc", "asr", "ra")} for r in validated} == \
        json.loads((tmp_path / "metrics.json").read_text())["mcci"]
    main(["audit", *common, "--out", str(tmp_path / "audit")])
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["samples"] == 42
    main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "export")])  # checks its logits against MCCI's
    assert (tmp_path / "export" / "model.safetensors").is_file()
