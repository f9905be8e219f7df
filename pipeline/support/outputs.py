"""Output paths, checked before a job does any work: writable (``shards.outputs.unwritable``), never one of the
job's inputs, and never an existing file of another kind than the job writes (a picture is not replaced by JSON).
Every refusal names the path as the user gave it, with the option that gave it."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

from pipeline.support.errors import JobError
from shards.outputs import unwritable

TMP_SUFFIX = len(".tmp.png")  # the longest of write_text's NAME.tmp and save_figure's NAME.tmp.png


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def is_metrics_json(text: str) -> bool:
    """What `mcci eval --out` writes: a JSON object of an evaluation."""
    value = _json_object(text)
    return value is not None and bool({"baseline", "mcci", "by_weights"} & set(value))


def is_predictions_jsonl(text: str) -> bool:
    """What `mcci predict --out` writes: one JSON object per line with its path and predictions (or nothing)."""
    rows = [_json_object(line) for line in text.splitlines() if line.strip()]
    return all(row is not None and {"path", "predictions"} <= set(row) for row in rows)


def is_png(data: bytes) -> bool:
    return data.startswith(b"\x89PNG\r\n\x1a\n")


# kind -> (what it is called, a test of an existing file's bytes)
KINDS: dict[str, tuple[str, Callable[[bytes], bool]]] = {
    "metrics": ("the metrics JSON of `mcci eval`", lambda b: is_metrics_json(b.decode(errors="replace"))),
    "predictions": ("the predictions JSONL of `mcci predict`", lambda b: is_predictions_jsonl(b.decode(errors="replace"))),
    "png": ("a PNG", is_png),
    "audit": ("the audit's summary JSON", lambda b: {"flagged", "samples"} <= set(_json_object(b.decode(errors="replace")) or {})),
    "safetensors": ("a safetensors file", lambda b: len(b) > 8 and b[8:9] == b"{"),
    "weights_sidecar": ("the JSON sidecar of `mcci weights import`", lambda b: "source_sha256" in (
        _json_object(b.decode(errors="replace")) or {})),
    "audit_samples": ("the audit's samples JSONL", lambda b: all(
        {"index", "score"} <= set(_json_object(line) or {}) for line in b.decode(errors="replace").splitlines()
        if line.strip())),
}


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))
    except OSError:
        return False


def check_output_file(path: str | Path, option: str, kind: str, inputs: Iterable[str | Path] = ()) -> None:
    """``path`` may receive the job's ``kind`` of file: it is writable, none of ``inputs``, and if it exists, a file
    of that kind (which the job then replaces)."""
    shown = f"{option} {path}"
    if str(path) == "":
        raise JobError(f"{option} is empty; name a file")
    target = Path(path)
    for source in inputs:
        if _same(target, Path(source)):
            raise JobError(f"{shown} is one of this job's inputs; writing there would destroy it: choose another file")
    if os.path.isdir(target):  # os.path: never raises, where Path does on a name too long
        raise JobError(f"{shown} is a folder; name a file")
    if os.path.exists(target):
        name, test = KINDS[kind]
        try:
            ours = target.is_file() and test(target.read_bytes())
        except OSError as e:
            raise JobError(f"{shown}: cannot read the file already there ({e.strerror or e}); choose another file") from e
        if not ours:
            raise JobError(f"{shown} exists and is not {name}, so it is not replaced; choose another file, or move it "
                           "away first")
    problem = unwritable(target, TMP_SUFFIX)
    if problem:
        raise JobError(f"{shown} cannot be written: {problem}")


def check_output_folder(path: str | Path, option: str, own: dict[str, str] | None = None, extra_name: int = 4) -> None:
    """``path`` may be a folder the job writes into: writable, not a file, and of the files it would replace
    (``own``: file name -> kind), each is of its kind."""
    shown = f"{option} {path}"
    if str(path) == "":
        raise JobError(f"{option} is empty; name a folder")
    target = Path(path)
    if os.path.exists(target) and not os.path.isdir(target):
        raise JobError(f"{shown} is a file; name a folder")
    for name, kind in (own or {}).items():
        if os.path.exists(target / name):
            check_output_file(target / name, option, kind)
    problem = unwritable(target, extra_name)
    if problem:
        raise JobError(f"{shown} cannot be written: {problem}")
