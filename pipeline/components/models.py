"""The model and input transform a config describes, and a trained model loaded back with its config:
what every job builds, kept apart from the train loop."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from torch import nn

from mcci_models import ain_in_chans, create_model_from_config, fit_ain, load_saved_model, sfrn_data_config
from mcci_models.saved import CONFIG, model_folder
from pipeline.data.manifest import fingerprint, load_manifest
from pipeline.data.storage import DEFAULT_STREAM, StreamOptions
from pipeline.data.transforms import InputTransform, build_mixup
from pipeline.support.config import Config, from_dict, to_dict
from pipeline.support.errors import CheckpointError, ConfigError, JobError


def fill_input_stats(cfg: Config) -> None:
    """Set the ``data.mean``/``data.std`` the user left unset, in place, to what the SFRN's pretrained
    weights expect (timm's ``resolve_model_data_config``), so the transform, the saved config and
    an export all use the same figures."""
    if cfg.data.mean is None or cfg.data.std is None:
        data = sfrn_data_config(cfg.model.sfrn)
        cfg.data.mean = cfg.data.mean or tuple(data["mean"])
        cfg.data.std = cfg.data.std or tuple(data["std"])


def fit_ain_to_budget(cfg: Config, image_size: int) -> None:
    """With ``model.ain_budget`` > 0, replace ``model.ain_widths``/``ain_stem_stride`` in place by the
    sizes that fit it and set the budget to 0: the config then describes the network built, and a
    saved model loads without counting FLOPs again (a newer torch may count differently)."""
    if cfg.model.ain_budget > 0 and cfg.train.defense == "mcci":
        m = cfg.model
        try:
            m.ain_widths, m.ain_stem_stride, line = fit_ain(m.ain_budget, m.sfrn, image_size, m.feature_dim,
                                                            m.ain_widths, m.ain_dropouts, ain_in_chans(m.ain_view))
        except ValueError as e:
            raise ConfigError(f"model.ain_budget={m.ain_budget}: {e}; raise the budget or set it to 0") from e
        m.ain_budget = 0.0
        PartialState().print(line)


def build_model(cfg: Config, num_classes: int, image_size: int, load_pretrained: bool = True) -> nn.Module:
    """The network the config describes; ``load_pretrained=False`` for one whose weights come from
    a saved model (no hub download, no weights file). Fills unset input statistics (``fill_input_stats``)
    and sizes the AIN to ``model.ain_budget`` (``fit_ain_to_budget``)."""
    fill_input_stats(cfg)
    fit_ain_to_budget(cfg, image_size)
    return create_model_from_config(to_dict(cfg), num_classes, image_size, load_pretrained,
                                    log=PartialState().print)  # what was loaded, once per job


def build_transform(cfg: Config, seed: int = 0, spectra: bool = True,
                    device: torch.device | str = "cpu", num_classes: int | None = None) -> InputTransform:
    """``spectra=False`` for jobs that only run mind control, which never reads an input's spectrum;
    ``device``: where training batches will be, for the augmentation's random numbers; ``num_classes``:
    for training, where mixup/cutmix (when configured) make soft labels. The AIN's input is the view
    ``model.ain_view`` names, as the model was built for (``ain_in_chans``)."""
    fill_input_stats(cfg)
    mixup = None if num_classes is None else build_mixup(cfg.data.augment, num_classes, cfg.optim.label_smoothing)
    lowpass = cfg.model.ain_lowpass_size if cfg.model.ain_view == "spectrum+lowpass" else None
    return InputTransform(cfg.data.mean, cfg.data.std, cfg.data.augment, cfg.spectrum.normalisation,
                          cfg.spectrum.backend, with_spectra=spectra and cfg.train.defense == "mcci", seed=seed,
                          channels_last=cfg.train.channels_last, device=device, mixup=mixup, lowpass=lowpass)


def model_meta(cfg: Config, manifest: dict[str, Any]) -> dict[str, Any]:
    """What ``model.json`` records beside the weights; ``sfrn_input`` is the preprocessing the SFRN's
    pretrained config names (interpolation, crop): shards are resized when built, not by it."""
    return {"defense": cfg.train.defense, "class_names": manifest["class_names"],
            "num_classes": manifest["num_classes"], "image_size": manifest["image_size"],
            "target": manifest["target"], "mode": manifest.get("mode", "all-to-one"),
            "attack": manifest["attack"]["name"], "data_fingerprint": fingerprint(manifest), "reference": None,
            "crop_pct": manifest.get("build", {}).get("crop_pct", 1.0),  # how predict fits a new image
            "sfrn_input": sfrn_data_config(cfg.model.sfrn)}


def load_trained(checkpoint: str | Path, device: torch.device, weights: str | None = None,
                 ) -> tuple[nn.Module, Config, dict[str, Any]]:
    """A saved model in eval mode on ``device``, its validated config and its metadata; ``weights``: ``raw`` or
    ``ema`` (None: the model's own)."""
    model, config, meta = load_saved_model(checkpoint, device, weights)
    try:
        cfg = from_dict(config)
    except ConfigError as e:  # an edited config.yaml: name the file, not only the key
        raise CheckpointError(f"{model_folder(checkpoint) / CONFIG}: {e}; the model folder was edited or damaged: copy "
                              "it again from the run that saved it") from e
    return model, cfg, meta


def load_matching_manifest(shards: str, meta: dict[str, Any], same_data: bool = False,
                           stream: StreamOptions = DEFAULT_STREAM) -> dict[str, Any]:
    """The shard folder's manifest (read with the job's ``stream`` settings: its timeout applies to the manifest too),
    if its classes (names, in order) and image size are the model's; ``same_data``: and it is the very data set the
    model was trained on (its fingerprint)."""
    manifest = load_manifest(shards, stream)
    if manifest["num_classes"] != meta["num_classes"] or manifest["image_size"] != meta["image_size"]:
        raise JobError(f"{shards} has {manifest['num_classes']} classes at {manifest['image_size']} px; the model "
                       f"expects {meta['num_classes']} at {meta['image_size']} px")
    if manifest["class_names"] != meta["class_names"]:
        raise JobError(f"{shards} names its classes {manifest['class_names'][:5]}..., the model "
                       f"{meta['class_names'][:5]}...: another data set; evaluate on shards of the model's classes")
    trained_on = meta.get("data_fingerprint")  # absent in models saved before fingerprints
    if same_data and trained_on and fingerprint(manifest) != trained_on:
        raise JobError(f"{shards} (data fingerprint {fingerprint(manifest)}) is not the data the model was trained on "
                       f"({trained_on}); give the shard folder it was trained on")
    return manifest


def job_device(state: PartialState, device: str | None) -> torch.device:
    """The device a job runs on: the one the user named when it runs alone, else its rank's."""
    return torch.device(device) if device and state.num_processes == 1 else state.device
