"""The defense matrix: for each attack, the undefended baseline and MCCI on the same shards.

    python -m benchmarks.defense_matrix --out runs/defense-matrix                  # embedded digits, CPU
    python -m benchmarks.defense_matrix --source cifar10-train.tar.gz --test-source cifar10-test.tar.gz \\
        --config configs/cifar10_resnet18.yaml --out runs/defense-matrix-cifar10 \\
        --attacks badnets badnets:all-to-all blended wanet sig lc trojan lf ftrojan issba refool

An attack is ``NAME`` (all-to-one, target ``--target``, default 0) or ``NAME:all-to-all``; ``--attack-params FILE`` is a
YAML mapping of attack name to parameters (default: the registry's BackdoorBench defaults). Writes
``<out>/defense_matrix.json``, ``<out>/defense_matrix.md`` and ``<out>/defense_matrix.png`` (CA / ASR / RA / DER per attack and
mode, and the AUROC of `mcci audit` against the recorded poison). Each attack's experiment lives in ``<out>/<attack>/`` and resumes where it stopped.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from benchmarks.common import write_result
from pipeline.jobs.experiment import run_experiment
from pipeline.jobs.quickstart import QUICKSTART_OVERRIDES, QUICKSTART_SOURCE
from pipeline.support.plots import plot_defense_matrix
from shards.attacks import ATTACKS
from shards.build import MODES, BuildSpec

DIRTY_LABEL_RATE = 0.1
CLEAN_LABEL_RATE = 0.08  # 80 % of the target class when it is a tenth of the data


def table(rows: list[dict]) -> str:
    lines = ["| attack | rate | model | CA | ASR | RA | DER | audit AUROC | minutes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        truth = (r.get("audit") or {}).get("recorded_poisoned")  # absent in metrics written before the audit
        for label, m in (("baseline", r["baseline"]), ("MCCI own spectrum", r["mcci"]["own"]),
                         ("MCCI mind control", r["mcci"]["mind_control"])):
            der = f"{m['der']:.3f}" if "der" in m else ""
            auroc = f"{truth['auroc']:.3f}" if truth and label == "MCCI mind control" else ""
            minutes = f"{r['seconds'] / 60:.1f}" if label == "baseline" and "seconds" in r else ""
            lines.append(f"| {r['attack']} | {r['poison_rate']} | {label} | {m['clean_acc']:.3f} | {m['asr']:.3f} | "
                         f"{m['ra']:.3f} | {der} | {auroc} | {minutes} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=QUICKSTART_SOURCE)
    parser.add_argument("--test-source")
    parser.add_argument("--attacks", nargs="+", default=sorted(set(ATTACKS) - {"custom"}),
                        help="NAME or NAME:all-to-all (default: every attack but custom, which needs a trigger file)")
    parser.add_argument("--attack-params", help="YAML file: attack name -> parameters")
    parser.add_argument("--config", help="training config; default: the quickstart recipe")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--max-train", type=int, help="a seeded random subset of the training images")
    parser.add_argument("--max-test", type=int, help="a seeded random subset of the test images")
    parser.add_argument("--image-size", type=int, help="resize and centre-crop every image to N px (needed when "
                        "the source's images differ in size)")
    parser.add_argument("--target", type=int, default=0, help="the all-to-one target class")
    parser.add_argument("--out", default="runs/defense-matrix")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="training overrides, e.g. train.mixed_precision=bf16")
    args = parser.parse_args()
    overrides = [*([] if args.config else QUICKSTART_OVERRIDES), f"train.epochs={args.epochs}", *args.overrides]
    attack_params = yaml.safe_load(open(args.attack_params)) if args.attack_params else {}
    rows = []
    for entry in args.attacks:
        attack, _, mode = entry.partition(":")
        mode = mode or "all-to-one"
        if attack not in ATTACKS or mode not in MODES:
            parser.error(f"unknown attack {entry!r}; attacks: {sorted(ATTACKS)}, each optionally :all-to-all")
        clean_label = ATTACKS[attack].clean_label
        spec = BuildSpec(source=args.source, test_source=args.test_source, out="", attack=attack, mode=mode,
                         poison_rate=CLEAN_LABEL_RATE if clean_label else DIRTY_LABEL_RATE, target=args.target,
                         attack_params=attack_params.get(attack, {}), image_size=args.image_size,
                         shard_size=1000 if args.test_source else 256, max_train=args.max_train,
                         max_test=args.max_test)
        print(f"=== {entry} ===", flush=True)
        results = run_experiment(Path(args.out) / entry.replace(":", "-"), spec, args.config, overrides,
                                 references=(), num_workers=args.num_workers)
        rows.append({"attack": entry, "poison_rate": spec.poison_rate, "attack_params": spec.attack_params, **results})
    markdown = table(rows)
    print(markdown)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "defense_matrix.md").write_text(markdown + "\n")
    plot_defense_matrix(rows, Path(args.out) / "defense_matrix.png")
    write_result("defense_matrix", {"source": args.source, "max_train": args.max_train, "max_test": args.max_test,
                                    "image_size": args.image_size, "target": args.target, "epochs": args.epochs,
                                    "attack_params_file": args.attack_params,
                                    "config": args.config,
                                    "overrides": overrides, "rows": rows}, str(Path(args.out) / "defense_matrix.json"))


if __name__ == "__main__":
    main()
