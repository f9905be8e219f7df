"""A trusted head refit across a defense matrix: is the gain MCCI's, or any last-layer refit's?

    python -m benchmarks.trusted_refit --matrix runs/defense-matrix-cifar10 [--variants ain20] [--out JSON]

For every finished attack experiment under ``--matrix`` (``benchmarks.defense_matrix``'s folders), the
undefended model, plain MCCI and each named variant are refitted by ``mcci refit-head`` on the shards'
trusted split (into ``<attack>/refit/<model>-<cv or wdPENALTY>[-nIMAGES]/``; a finished refit is reused) and scored on the test shards
as ``mcci eval`` scores them (MCCI: mind control). Writes beside the matrix ``trusted_refit.md`` (CA / ASR /
RA of each model as trained and refitted) and the JSON result. Only heads are trained.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from benchmarks.common import write_result
from benchmarks.defense_matrix import ATTACK_FAILED, BASELINE_ASR_MIN
from pipeline.jobs.evaluate import evaluate_checkpoint
from pipeline.jobs.refit_head import CROSS_VALIDATE, DEFAULT_WEIGHT_DECAY, REFIT_FILE, refit_head
from pipeline.support.report import write_json

METRICS = ("clean_acc", "asr", "ra")


def _predicting(metrics: dict[str, Any]) -> dict[str, float]:
    """The figures of the model as it predicts: the undefended model's, or MCCI's under mind control."""
    chosen = metrics["baseline"] if "baseline" in metrics else metrics["mcci"]["mind_control"]
    return {k: round(chosen[k], 4) for k in METRICS}


def model_folders(attack_folder: Path, variants: list[str]) -> dict[str, Path]:
    """Model name -> its training run: the undefended model, plain MCCI, then each variant run there."""
    runs = {"undefended": attack_folder / "baseline", "MCCI": attack_folder / "mcci"}
    runs.update({name: attack_folder / "variants" / name / "mcci" for name in variants
                 if (attack_folder / "variants" / name / "metrics.json").is_file()})
    return runs


def refitted(run: Path, shards: Path, out: Path, weight_decay: float | str, max_images: int | None,
             num_workers: int, device: str) -> dict[str, Any]:
    """Refit ``run``'s head into ``out`` and score it, or read what an earlier call wrote there."""
    if not (out / "metrics.json").is_file():
        if not (out / REFIT_FILE).is_file():
            shutil.rmtree(out, ignore_errors=True)  # a refit stopped before its record: this benchmark's own folder
            refit_head(run, str(shards), out, weight_decay, max_images, num_workers=num_workers, device=device)
        write_json(out / "metrics.json", evaluate_checkpoint(out, str(shards), num_workers=num_workers, device=device))
    return {"refit": json.loads((out / REFIT_FILE).read_text()),
            "metrics": _predicting(json.loads((out / "metrics.json").read_text()))}


def attack_row(folder: Path, variants: list[str], weight_decay: float | str, max_images: int | None,
               num_workers: int, device: str) -> dict[str, Any]:
    experiment = json.loads((folder / "metrics.json").read_text())
    shards = folder / "shards"
    models = {}
    for name, run in model_folders(folder, variants).items():
        print(f"== {folder.name}: {name}", flush=True)
        metrics = {"undefended": {"baseline": experiment["baseline"]}, "MCCI": {"mcci": experiment["mcci"]}}.get(name)
        trained = _predicting(metrics or json.loads((run.parent / "metrics.json").read_text()))  # a variant's own
        penalty = weight_decay if weight_decay == CROSS_VALIDATE else f"wd{weight_decay:g}"
        images = "" if max_images is None else f"-n{max_images}"
        refit = refitted(run, shards, folder / "refit" / f"{name}-{penalty}{images}", weight_decay, max_images,
                         num_workers, device)
        models[name] = {"trained": trained, "refitted": refit["metrics"],
                        "weight_decay": refit["refit"]["weight_decay"], "trusted_samples": refit["refit"]["samples"]}
    return {"attack": folder.name, "baseline_asr": experiment["baseline"]["asr"],
            "attack_failed": experiment["baseline"]["asr"] < BASELINE_ASR_MIN, "models": models}


def markdown(rows: list[dict[str, Any]]) -> str:
    """One line per attack and model: CA / ASR / RA as trained, then refitted, and the chosen penalty."""
    lines = ["| attack | model | as trained: CA / ASR / RA | trusted refit: CA / ASR / RA | weight decay | trusted images |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        attack = row["attack"] + (f" ({ATTACK_FAILED})" if row["attack_failed"] else "")
        for name, m in row["models"].items():
            shown = [" / ".join(f"{m[k][metric]:.3f}" for metric in METRICS) for k in ("trained", "refitted")]
            lines.append(f"| {attack} | {name} | {shown[0]} | {shown[1]} | {m['weight_decay']:g} | "
                         f"{m['trusted_samples']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--matrix", required=True, help="a benchmarks.defense_matrix --out folder")
    parser.add_argument("--attacks", nargs="+", help="attack folders to refit (default: every finished one)")
    parser.add_argument("--variants", nargs="+", default=[], help="variant runs to refit beside plain MCCI")
    parser.add_argument("--weight-decay", type=lambda t: t if t == CROSS_VALIDATE else float(t),
                        default=DEFAULT_WEIGHT_DECAY, help="the refit's L2 penalty, or cv (cross-validated)")
    parser.add_argument("--max-images", type=int, help="refit on a seeded random N of the trusted images (default: all)")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="the JSON result (default: docs/results/trusted_refit-DATE.json)")
    args = parser.parse_args()
    matrix = Path(args.matrix)
    folders = sorted(p for p in matrix.iterdir() if (p / "metrics.json").is_file()
                     and (args.attacks is None or p.name in args.attacks))
    if not folders:
        raise SystemExit(f"{matrix}: no finished attack experiment to refit; run benchmarks.defense_matrix there first")
    rows = [attack_row(f, args.variants, args.weight_decay, args.max_images, args.num_workers, args.device)
            for f in folders]
    table = markdown(rows)
    print(table)
    (matrix / "trusted_refit.md").write_text(table + "\n")
    write_result("trusted_refit", {"matrix": str(matrix), "weight_decay": args.weight_decay, "max_images": args.max_images,
                                   "variants": args.variants, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
