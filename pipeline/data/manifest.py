"""A shard folder's manifest and the URLs of its shards: local paths, http(s), s3:// and gs://."""
from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import webdataset as wds

from pipeline.support.errors import ShardError

MANIFEST = "manifest.json"
SUPPORTED_FORMAT = 1


def _join(location: str, name: str) -> str:
    return location.rstrip("/") + "/" + name


def resolve_url(url: str) -> str:
    """Local paths and http(s) URLs open as they are (webdataset's gopen, curl for http); cloud
    object stores stream through their CLIs: s3:// with ``aws s3 cp``, gs:// with ``gsutil cat``."""
    if url.startswith("s3://"):
        return f"pipe:aws s3 cp {url} -"
    if url.startswith("gs://"):
        return f"pipe:gsutil cat {url}"
    return url


def load_manifest(location: str) -> dict[str, Any]:
    """Read ``manifest.json`` from a shard folder or URL prefix (anything ``wds.gopen`` opens)."""
    url = _join(location, MANIFEST)
    try:
        with wds.gopen(resolve_url(url), "rb") as stream:
            manifest = json.load(io.TextIOWrapper(stream, encoding="utf-8"))
    except FileNotFoundError as e:
        raise ShardError(f"no {MANIFEST} at {location}; point data.shards at a folder made by `mcci shards build`") from e
    except (OSError, ValueError) as e:
        raise ShardError(f"cannot read {url}: {e}; rebuild the shards with `mcci shards build`") from e
    if manifest.get("format_version") != SUPPORTED_FORMAT:
        raise ShardError(f"{url} has format_version {manifest.get('format_version')}, this mcci reads "
                         f"{SUPPORTED_FORMAT}; rebuild the shards with this version")
    return manifest


def shard_urls(location: str, manifest: dict[str, Any], split: str) -> list[str]:
    if split not in manifest["splits"]:
        raise ShardError(f"split {split!r} is not in {location}; it has {sorted(manifest['splits'])}")
    urls = [resolve_url(_join(location, s["path"])) for s in manifest["splits"][split]["shards"]]
    if not urls:
        raise ShardError(f"split {split!r} of {location} has no shards (0 samples)")
    return urls


def fingerprint(manifest: dict[str, Any]) -> str:
    """A short id of a shard folder's content: the sha256 of its manifest, which holds every shard's
    sha256, the attack and its parameters, the seed and the class names."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
