"""ISSBA-style sample-specific invisible trigger (Li et al. 2021): a StegaStamp-like encoder hides
a fixed code in each poisoned image, so every poisoned image carries a different perturbation.

The encoder (image + code -> bounded residual) is trained here together with a decoder that must
read the code back from the stored (rounded) image, on clean training images, with an L2 penalty on
the residual; or it is loaded from ``encoder_file`` (a safetensors file this attack wrote before, kept
in the shard folder's ``assets/``). The code is ``code_bits`` seeded bits, the same for every poisoned
image. Smaller than StegaStamp (no U-Net, no perceptual loss, ``max_residual`` bounds each pixel's
change instead), so it trains in a minute on a CPU at 32 px.

From some starts the decoder never leaves chance (seen at 128 px: bit loss ln 2 for all 1,000 steps, where another
draw of the data left it by step 75): training starts again from another initialisation when the bit loss is
still at chance a quarter of the way in (``restarts`` times), and an encoder whose code cannot be read back from
the poisoned images (``min_bit_accuracy``) is refused rather than written into shards that would carry no trigger.
"""
from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from mcci_models import default_device
from shards.attacks.base import Attack, AttackContext, register
from shards.attacks.surrogate import to_tensor, to_uint8
from shards.errors import ShardBuildError

CODE_GRID = 8  # the code is written onto an 8x8 map, upsampled to the image
AT_CHANCE = 0.68  # a bit loss above this is chance (ln 2 = 0.693): the decoder reads nothing yet


class StegaEncoder(nn.Module):
    """Residual = max_residual * tanh(code plane + image-dependent correction). The code plane alone
    makes the code readable from the first step; the correction (zero at the start) learns to shape
    the residual to each image, which makes every poisoned image's perturbation different."""

    def __init__(self, code_bits: int, width: int, max_residual: float):
        super().__init__()
        self.max_residual = max_residual
        self.code_map = nn.Linear(code_bits, 3 * CODE_GRID * CODE_GRID)
        self.net = nn.Sequential(nn.Conv2d(6, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(width, 3, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, images: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] and [N, bits] in {0, 1} -> the encoded images in [0, 1]."""
        plane = self.code_map(code * 2 - 1).view(-1, 3, CODE_GRID, CODE_GRID)
        plane = F.interpolate(plane, size=images.shape[-2:], mode="bilinear", align_corners=False)
        residual = torch.tanh(plane + self.net(torch.cat([images * 2 - 1, plane], 1))) * self.max_residual
        return (images + residual).clamp(0, 1)


class StegaDecoder(nn.Module):
    def __init__(self, code_bits: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(CODE_GRID // 2), nn.Flatten(),
                                 nn.Linear(2 * width * (CODE_GRID // 2) ** 2, code_bits))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1)  # logits of the bits


@register("issba")
class ISSBA(Attack):
    defaults = {"encoder_file": None, "code_bits": 32, "width": 16, "max_residual": 16 / 255, "l2_weight": 3.0,
                "steps": 1000, "batch": 32, "lr": 2e-3, "max_images": 20000, "restarts": 2, "min_bit_accuracy": 0.9}

    def __init__(self, params, image_size, seed):
        super().__init__(params, image_size, seed)
        if not 0 < float(self.params["max_residual"]) <= 1:
            raise ShardBuildError(f"issba max_residual must be in (0, 1], got {self.params['max_residual']}")
        self.encoder: StegaEncoder | None = None
        self.decoder: StegaDecoder | None = None
        if self.params["encoder_file"] is not None:
            self._load(self.asset_path("encoder_file"))
        self.code = self.rng(0x155BA).integers(0, 2, size=int(self.params["code_bits"])).astype(np.float32)

    def _networks(self) -> tuple[StegaEncoder, StegaDecoder]:
        p = self.params
        return (StegaEncoder(int(p["code_bits"]), int(p["width"]), float(p["max_residual"])),
                StegaDecoder(int(p["code_bits"]), int(p["width"])))

    def _load(self, path) -> None:
        with safe_open(str(path), framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get("issba", "{}"))
        if not stored:
            raise ShardBuildError(f"issba encoder_file {path} was not written by this attack (no 'issba' metadata)")
        self.params.update({k: stored[k] for k in ("code_bits", "width", "max_residual")})
        self.encoder, self.decoder = self._networks()
        weights = load_file(str(path))
        self.encoder.load_state_dict({k[8:]: v for k, v in weights.items() if k.startswith("encoder.")})
        self.decoder.load_state_dict({k[8:]: v for k, v in weights.items() if k.startswith("decoder.")})
        self.encoder.eval()
        self.decoder.eval()

    def prepare(self, context: AttackContext) -> None:
        if self.encoder is None:
            self._train(context)
        sample = context.clean_train[:256]
        clean = context.pixels("train", sample)
        poisoned = np.stack([self.apply(image, int(i)) for image, i in zip(clean, sample)])
        self.params["resolved_bit_accuracy"] = round(self.bit_accuracy(poisoned), 4)
        self.params["resolved_mean_abs_change"] = round(float(np.abs(poisoned.astype(int) - clean).mean()), 3)
        if self.params["resolved_bit_accuracy"] < float(self.params["min_bit_accuracy"]):
            # the poisoned images would carry no code: shards that look attacked but hold no trigger
            raise ShardBuildError(
                f"issba: the decoder reads back {self.params['resolved_bit_accuracy']:.1%} of the code's bits from the "
                f"poisoned images (chance: 50 %, needed: {float(self.params['min_bit_accuracy']):.0%}), so they carry "
                "no trigger; train the encoder longer or harder (--attack-params with issba: {steps: 3000} or "
                "{lr: 0.005}), on more images, or give an encoder_file that worked")

    def _train(self, context: AttackContext) -> None:
        p, rng = self.params, self.rng(0x155BB)
        chosen = context.clean_train
        if len(chosen) > int(p["max_images"]):
            chosen = np.sort(rng.choice(chosen, size=int(p["max_images"]), replace=False))
        images = to_tensor(context.pixels("train", chosen), torch.device("cpu"))
        for attempt in range(int(p["restarts"]) + 1):
            torch.manual_seed(self.seed + attempt)
            encoder, decoder = self._networks()
            if self._fit(encoder, decoder, images, rng, context.progress, attempt):
                break
            print(f"issba: the encoder's bit loss is still at chance after {int(p['steps']) // 4} steps (attempt "
                  f"{attempt + 1} of {int(p['restarts']) + 1}); starting again from another initialisation", flush=True)
        self.encoder, self.decoder = encoder.cpu().eval(), decoder.cpu().eval()
        context.assets_dir.mkdir(parents=True, exist_ok=True)
        path = context.assets_dir / "issba_encoder.safetensors"
        weights = {**{f"encoder.{k}": v for k, v in self.encoder.state_dict().items()},
                   **{f"decoder.{k}": v for k, v in self.decoder.state_dict().items()}}
        stored_params = {k: p[k] for k in ("code_bits", "width", "max_residual")}
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path), metadata={"issba": json.dumps(stored_params)})
        self.record_asset("encoder", path)

    def _fit(self, encoder: StegaEncoder, decoder: StegaDecoder, images: torch.Tensor, rng: np.random.Generator,
             progress: bool, attempt: int) -> bool:
        """Train the pair in place; False (stopped early) when the bit loss is still at chance a quarter of the way
        in: the decoder found nothing to read, which more steps of the same start rarely change (seen at 128 px)."""
        p, dev = self.params, default_device()
        encoder.to(dev), decoder.to(dev)
        optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=float(p["lr"]))
        steps, recent = int(p["steps"]), []
        bar = tqdm(range(steps), desc=f"ISSBA: training the encoder (attempt {attempt + 1})", disable=not progress)
        for step in bar:
            if step == steps // 4 and attempt < int(p["restarts"]) and recent and min(recent) > AT_CHANCE:
                return False
            x = images[torch.from_numpy(rng.choice(len(images), size=int(p["batch"])))].to(dev)
            code = torch.from_numpy(rng.integers(0, 2, size=(len(x), int(p["code_bits"]))).astype(np.float32)).to(dev)
            encoded = encoder(x, code)
            stored = encoded + (torch.rand_like(encoded) - 0.5) / 255  # what rounding to uint8 does, differentiably
            loss_bits = F.binary_cross_entropy_with_logits(decoder(stored), code)
            # The residual penalty ramps up over the first half, as StegaStamp's does: at full weight
            # from the start it silences the encoder before the decoder has learnt to read anything.
            ramp = min(1.0, 2 * step / max(1, steps))
            loss = loss_bits + ramp * float(p["l2_weight"]) * (encoded - x).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            recent = [*recent[-19:], loss_bits.item()]
            bar.set_postfix(bits=f"{recent[-1]:.3f}")
        return True

    @torch.no_grad()
    def apply(self, image: np.ndarray, index: int) -> np.ndarray:
        if self.encoder is None:
            raise ShardBuildError("issba has no encoder: prepare() was not run and no encoder_file was given")
        x = to_tensor(image[None], torch.device("cpu"))
        return to_uint8(self.encoder(x, torch.from_numpy(self.code)[None]))[0]

    @torch.no_grad()
    def bit_accuracy(self, images: np.ndarray) -> float:
        """Fraction of the code's bits the decoder reads back from [N, H, W, 3] uint8 images."""
        bits = (self.decoder(to_tensor(images, torch.device("cpu"))) > 0).float()
        return float((bits == torch.from_numpy(self.code)).float().mean())
