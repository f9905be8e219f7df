"""A shard folder's manifest and the URLs of its shards: local paths, http(s), s3:// and gs://."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.data.storage import DEFAULT_STREAM, MissingFile, StreamOptions, join, read_bytes
from pipeline.support.errors import ShardError

MANIFEST = "manifest.json"
SUPPORTED_FORMAT = 1


def load_manifest(location: str, stream: StreamOptions = DEFAULT_STREAM) -> dict[str, Any]:
    """Read ``manifest.json`` from a shard folder or URL prefix (local, http(s)://, s3://, gs://)."""
    url = join(location, MANIFEST)
    try:
        manifest = json.loads(read_bytes(url, stream))
    except MissingFile as e:
        raise ShardError(f"no {MANIFEST} at {location}; point data.shards at a folder made by `mcci shards build`") from e
    except ShardError:
        raise
    except ValueError as e:
        raise ShardError(f"cannot read {url}: {e}; rebuild the shards with `mcci shards build`") from e
    if manifest.get("format_version") != SUPPORTED_FORMAT:
        raise ShardError(f"{url} has format_version {manifest.get('format_version')}, this mcci reads "
                         f"{SUPPORTED_FORMAT}; rebuild the shards with this version")
    names = manifest.get("class_names", [])
    if manifest.get("num_classes") != len(names):  # an edited manifest would build a model of the wrong width
        raise ShardError(f"{url} says num_classes {manifest.get('num_classes')} but names {len(names)} classes; the "
                         "manifest was edited or damaged: rebuild the shards with `mcci shards build`")
    return manifest


def shard_records(location: str, manifest: dict[str, Any], split: str) -> dict[str, dict[str, Any]]:
    """Each shard's URL -> its manifest entry (path, sha256, count, size), in order; the counts must
    add up to the split's, so that reading every shard (each one's count checked) reads the split."""
    if split not in manifest["splits"]:
        raise ShardError(f"split {split!r} is not in {location}; it has {sorted(manifest['splits'])}")
    entry = manifest["splits"][split]
    records = {join(location, s["path"]): s for s in entry["shards"]}
    if not records:
        raise ShardError(f"split {split!r} of {location} has no shards (0 samples)")
    if sum(s["count"] for s in records.values()) != entry["count"]:
        raise ShardError(f"{join(location, MANIFEST)}: the shards of {split!r} hold {sum(s['count'] for s in records.values())} "
                         f"samples, the split records {entry['count']}; rebuild the shards")
    return records


def fingerprint(manifest: dict[str, Any]) -> str:
    """A short id of a shard folder's content: the sha256 of its manifest, which holds every shard's
    sha256, the attack and its parameters, the seed and the class names."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
