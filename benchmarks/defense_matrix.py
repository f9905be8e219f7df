"""The defense matrix: for each attack, the undefended baseline and MCCI on the same shards.

    python -m benchmarks.defense_matrix --out runs/defense-matrix                  # embedded digits, CPU
    python -m benchmarks.defense_matrix --source cifar10-train.tar.gz --test-source cifar10-test.tar.gz \\
        --config configs/cifar10_resnet18.yaml --out runs/defense-matrix-cifar10 \\
        --attacks badnets badnets:all-to-all blended wanet sig lc trojan lf ftrojan issba refool

An attack is ``NAME`` (all-to-one, target ``--target``, default 0) or ``NAME:all-to-all``; ``--attack-params FILE`` is a
YAML mapping of attack name to parameters (default: the registry's BackdoorBench defaults). Writes
``<out>/defense_matrix.json``, ``<out>/defense_matrix.md`` and ``<out>/defense_matrix.png`` (CA / ASR / RA / DER per attack and
mode, and the AUROC of `mcci audit` against the recorded poison). Each attack's experiment lives in ``<out>/<attack>/`` and resumes where it stopped.
Each attack gets a verdict: "attack failed on the baseline" when the undefended model's ASR is below
0.5 (its MCCI rows then show no DER: there was no backdoor to remove), else "removed" (mind-control
ASR <= 0.10) or "not removed".

Variants and seeds: ``--variant "NAME: OVERRIDE ..."`` (one argument, repeatable) adds an MCCI run per
attack with those training overrides, on the same shards (``<out>/<attack>/variants/NAME/``; they can be added
to a finished matrix); ``--seeds 1,2`` trains MCCI, every variant and the undefended model again with each of
those ``train.seed`` values (the undefended ones in ``<out>/<attack>/baselines/seedN/``), and the table gives
mean ± standard deviation over the seeds. Each seed is a seed once: ``--seeds`` may not repeat one, nor name the
seed the runs without a suffix already have (the config's ``train.seed``, or the variant's own). Every run's DER
is against the undefended model of its own seed, and the verdict reads the undefended models of the seeds it
averages:

    python -m benchmarks.defense_matrix ... --variant "lowpass: model.ain_view=spectrum+lowpass" \\
        --variant "isolate: train.mcci_variant=isolate train.isolate_epoch=2" --seeds 1,2
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import yaml

from benchmarks.common import write_result
from pipeline.jobs.experiment import run_experiment, run_variant, seed_baselines
from pipeline.jobs.quickstart import QUICKSTART_OVERRIDES, QUICKSTART_SOURCE
from pipeline.support.config import load_config
from pipeline.support.plots import plot_defense_matrix
from shards.attacks import ATTACKS
from shards.build import MODES, BuildSpec

DIRTY_LABEL_RATE = 0.1
CLEAN_LABEL_RATE = 0.08  # 80 % of the target class when it is a tenth of the data
# Below this baseline ASR the attack did not backdoor the undefended model: there is nothing to
# defend, so a low ASR under MCCI says nothing and the row is no evidence for the defense.
BASELINE_ASR_MIN = 0.5
REMOVED_ASR_MAX = 0.10  # mind-control ASR at or below which a landed backdoor counts as removed
ATTACK_FAILED = "attack failed on the baseline"


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"NAME: OVERRIDE OVERRIDE"`` -> (NAME, overrides). One argument, so the matrix's own overrides after
    it cannot be taken for the variant's."""
    name, colon, overrides = text.partition(":")
    if not colon or not name.strip() or not all("=" in o for o in overrides.split()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected \"NAME: KEY=VALUE ...\", e.g. "
                                         "\"lowpass: model.ain_view=spectrum+lowpass\"")
    if name.strip() == "mcci":
        raise argparse.ArgumentTypeError("the variant name 'mcci' is plain MCCI's own (its seeds are mcci-seedN); "
                                         "give the variant another name")
    return name.strip(), overrides.split()


def seeded_runs(name: str, overrides: list[str], seeds: list[int]) -> list[tuple[str, list[str]]]:
    """(run name, overrides): the run with the config's seed, then one per extra seed."""
    return [(name, overrides)] + [(f"{name}-seed{s}", [*overrides, f"train.seed={s}"]) for s in seeds]


def check_seeds(seeds: list[int], own_seed: int, name: str) -> None:
    """Refuse ``--seeds`` that would train one seed twice and count it as two: a repeated entry, or ``own_seed``,
    the ``train.seed`` the run without a suffix (``name``) already has."""
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"--seeds repeats {', '.join(map(str, repeated))}; give each seed once")
    if own_seed in seeds:
        raise ValueError(f"--seeds {own_seed} is the train.seed {name} is trained with already (its run without a "
                         f"-seedN suffix), so it would be one run counted as two seeds; leave {own_seed} out")


def baselines(row: dict) -> dict[int, dict]:
    """``train.seed`` -> the undefended model's figures: the experiment's own, then ``baseline_seeds``'."""
    return {row["seed"]: row["baseline"], **{b["seed"]: b["baseline"] for b in row.get("baseline_seeds", [])}}


def matched_baselines(row: dict, runs: list[dict] | None = None) -> list[dict]:
    """The undefended figures of the seeds ``runs`` (default: the row's MCCI runs) were trained with, each once;
    every seed of the attack's undefended model where none of those seeds has one (runs recorded before they had)."""
    by_seed = baselines(row)
    seeds = dict.fromkeys(m.get("seed") for m in runs or mcci_groups(row)[0][1])
    return [by_seed[s] for s in seeds if s in by_seed] or list(by_seed.values())


def verdict(row: dict, runs: list[dict] | None = None) -> str:
    """What one attack's rows show: the attack failed on the undefended model (its mean ASR over the seeds of the
    runs judged), or MCCI (mind control; with ``runs``, their mean; by default MCCI's runs) removed the backdoor,
    or it did not."""
    runs = runs or mcci_groups(row)[0][1]
    if statistics.fmean(b["asr"] for b in matched_baselines(row, runs)) < BASELINE_ASR_MIN:
        return ATTACK_FAILED
    asr = statistics.fmean(m["mcci"]["mind_control"]["asr"] for m in runs)
    return "removed" if asr <= REMOVED_ASR_MAX else "not removed"


def mcci_groups(row: dict) -> list[tuple[str, list[dict]]]:
    """The MCCI runs of one attack, grouped: ("MCCI", the experiment's run and its extra seeds), then
    ("MCCI NAME", the variant's runs, one per seed), each run as its metrics (``mcci``, ``audit``)."""
    groups = [("MCCI", [row, *row.get("mcci_seeds", [])])]
    return groups + [(f"MCCI {name}", runs) for name, runs in row.get("variants", {}).items()]


def cell(values: list[float], signed: bool = False) -> str:
    """One value, or mean ± standard deviation of several; ``signed``: the mean with its sign (a difference)."""
    spec = "+.3f" if signed else ".3f"
    mean = values[0] if len(values) == 1 else statistics.fmean(values)
    return f"{mean:{spec}}" + ("" if len(values) == 1 else f" ± {statistics.stdev(values):.3f}")


def table(rows: list[dict]) -> str:
    """Markdown: the baseline, then own spectrum and mind control of MCCI and of each variant; over several
    seeds, mean ± standard deviation (each run's DER against the undefended model of its seed). Where the attack
    failed on the baseline, the MCCI rows get no DER (it would credit MCCI for a backdoor that was never there) and
    the verdict says so."""
    lines = ["| attack | rate | model | CA | ASR | RA | DER | audit AUROC | minutes | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        failed = verdict(r) == ATTACK_FAILED
        b = list(baselines(r).values())
        seeds = f" ({len(b)} seeds)" if len(b) > 1 else ""
        minutes = f"{r['seconds'] / 60:.1f}" if "seconds" in r else ""
        lines.append(f"| {r['attack']} | {r['poison_rate']} | baseline{seeds} | "
                     + " | ".join(cell([m[k] for m in b]) for k in ("clean_acc", "asr", "ra"))
                     + f" |  |  | {minutes} | {ATTACK_FAILED if failed else ''} |")
        for label, runs in mcci_groups(r):
            seeds = f" ({len(runs)} seeds)" if len(runs) > 1 else ""
            aurocs = [m["audit"]["recorded_poisoned"]["auroc"] for m in runs
                      if (m.get("audit") or {}).get("recorded_poisoned")]  # absent in metrics written before the audit
            for mode, name in (("own", "own spectrum"), ("mind_control", "mind control")):
                ms = [m["mcci"][mode] for m in runs]
                der = cell([m["der"] for m in ms]) if all("der" in m for m in ms) and not failed else ""
                auroc = cell(aurocs) if aurocs and mode == "mind_control" else ""
                shown = verdict(r, runs) if mode == "mind_control" else ""
                lines.append(f"| {r['attack']} | {r['poison_rate']} | {label} {name}{seeds} | "
                             f"{cell([m['clean_acc'] for m in ms])} | {cell([m['asr'] for m in ms])} | "
                             f"{cell([m['ra'] for m in ms])} | {der} | {auroc} |  | {shown} |")
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
    parser.add_argument("--trusted-count", type=int, default=100,
                        help="clean training images held out as the defender's trusted split (mcci refit-head)")
    parser.add_argument("--out", default="runs/defense-matrix")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--variant", type=parse_variant, action="append", default=[], metavar='"NAME: OVERRIDE ..."',
                        help="one more MCCI run per attack on the same shards and baseline, with these training "
                        'overrides (one argument: --variant "lowpass: model.ain_view=spectrum+lowpass"); repeatable')
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=[], metavar="N,N",
                        help="train MCCI and each variant again with each of these train.seed values (e.g. 1,2)")
    parser.add_argument("overrides", nargs="*", help="training overrides, e.g. train.mixed_precision=bf16")
    args = parser.parse_args()
    variants = dict(args.variant)
    if len(variants) < len(args.variant):
        parser.error("each --variant needs a name of its own")
    overrides = [*([] if args.config else QUICKSTART_OVERRIDES), f"train.epochs={args.epochs}", *args.overrides]
    try:  # the seed each run without a suffix has: the config's, or a variant's own train.seed
        for name, extra in [("mcci", []), *variants.items()]:
            check_seeds(args.seeds, load_config(args.config, [*overrides, *extra]).train.seed, name)
    except ValueError as e:
        parser.error(str(e))
    attack_params = yaml.safe_load(open(args.attack_params)) if args.attack_params else {}
    for entry in args.attacks:  # all checked before hours of training, not when the loop reaches them
        attack, _, mode = entry.partition(":")
        if "=" in entry:
            parser.error(f"{entry!r} in --attacks is a training override: --attacks takes every word after it, so "
                         "give the overrides before --attacks or end its list with another option")
        if attack not in ATTACKS or (mode or "all-to-one") not in MODES:
            parser.error(f"unknown attack {entry!r}; attacks: {sorted(ATTACKS)}, each optionally :all-to-all")
    rows = []
    for entry in args.attacks:
        attack, _, mode = entry.partition(":")
        mode = mode or "all-to-one"
        params = attack_params.get(attack, {})
        clean_label = ATTACKS[attack].is_clean_label(params)
        spec = BuildSpec(source=args.source, test_source=args.test_source, out="", attack=attack, mode=mode,
                         poison_rate=CLEAN_LABEL_RATE if clean_label else DIRTY_LABEL_RATE, target=args.target,
                         attack_params=params, image_size=args.image_size,
                         shard_size=1000 if args.test_source else 256, max_train=args.max_train,
                         max_test=args.max_test, trusted_count=args.trusted_count)
        print(f"=== {entry} ===", flush=True)
        folder = Path(args.out) / entry.replace(":", "-")
        results = run_experiment(folder, spec, args.config, overrides, references=(), num_workers=args.num_workers)
        row = {"attack": entry, "poison_rate": spec.poison_rate, "attack_params": spec.attack_params, **results}
        extra = dict(config=args.config, overrides=overrides, num_workers=args.num_workers)
        row["mcci_seeds"] = [run_variant(folder, n, o, **extra) for n, o in seeded_runs("mcci", [], args.seeds)[1:]]
        row["variants"] = {name: [run_variant(folder, n, o, **extra) for n, o in seeded_runs(name, variant, args.seeds)]
                           for name, variant in variants.items()}
        row["baseline_seeds"] = list(seed_baselines(folder).values())  # those the runs above trained or found
        row["verdict"] = verdict(row)
        rows.append(row)
    markdown = table(rows)
    print(markdown)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "defense_matrix.md").write_text(markdown + "\n")
    plot_defense_matrix(rows, Path(args.out) / "defense_matrix.png")
    write_result("defense_matrix", {"source": args.source, "max_train": args.max_train, "max_test": args.max_test,
                                    "image_size": args.image_size, "target": args.target, "epochs": args.epochs,
                                    "trusted_count": args.trusted_count,
                                    "attack_params_file": args.attack_params,
                                    "config": args.config,
                                    "overrides": overrides, "variants": variants, "seeds": args.seeds,
                                    "rows": rows}, str(Path(args.out) / "defense_matrix.json"))


if __name__ == "__main__":
    main()
