"""`mcci shards build --out s3://bucket/prefix` (or gs://): build in a local temporary folder, then upload.

manifest.json goes up last, and an existing one is removed first when overwriting, so a reader sees
either no data set or a complete one: a manifest is only ever next to every shard it lists. Uploads go
through fsspec (s3fs / gcsfs); credentials and endpoints come from the environment (AWS_PROFILE,
AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS).
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import fsspec

from shards.build import BuildSpec, build_shards
from shards.errors import ShardBuildError

MANIFEST = "manifest.json"


def is_remote(out: str) -> bool:
    return "://" in out and not out.startswith("file://")


def _refuse_existing(url: str, overwrite: bool) -> None:
    if not overwrite:
        raise ShardBuildError(f"{url} already holds a shard folder; pass --overwrite to replace it")


def upload_folder(local: Path, url: str, overwrite: bool) -> None:
    """Copy a finished shard folder to ``url``, its manifest last."""
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    if fs.exists(f"{root}/{MANIFEST}"):
        _refuse_existing(url, overwrite)
        fs.rm(f"{root}/{MANIFEST}")  # readers stop trusting the old folder before its shards change
    for path in sorted(p for p in local.rglob("*") if p.is_file() and p.name != MANIFEST):
        fs.put_file(str(path), f"{root}/{path.relative_to(local).as_posix()}")
    fs.put_file(str(local / MANIFEST), f"{root}/{MANIFEST}")


def build_and_upload(spec: BuildSpec, progress: bool = True) -> dict[str, Any]:
    """``build_shards`` for a remote ``spec.out``; returns the manifest."""
    fs, root = fsspec.core.url_to_fs(spec.out)
    if fs.exists(f"{root.rstrip('/')}/{MANIFEST}"):  # refused before the build, not after it
        _refuse_existing(spec.out, spec.overwrite)
    with tempfile.TemporaryDirectory(prefix="mcci-shards-") as tmp:
        local = Path(tmp) / "shards"
        manifest = build_shards(dataclasses.replace(spec, out=str(local)), progress)
        try:
            upload_folder(local, spec.out, spec.overwrite)
        except OSError as e:  # s3fs / gcsfs map refused access, missing buckets and endpoints to OSError
            raise ShardBuildError(f"cannot upload to {spec.out}: {e}; check the bucket and the credentials and "
                                  "endpoint in the environment (AWS_PROFILE, AWS_ENDPOINT_URL, ...)") from e
    return manifest
