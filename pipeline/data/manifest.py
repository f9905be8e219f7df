"""A shard folder's manifest and the URLs of its shards: local paths, http(s), s3:// and gs://."""
from __future__ import annotations

import hashlib
import json
from pathlib import PurePosixPath
from typing import Any

from pipeline.data.storage import DEFAULT_STREAM, MissingFile, StreamOptions, join, page_instead, read_bytes
from pipeline.support.errors import ShardError
from shards.build import MAX_IMAGE_SIZE

MANIFEST = "manifest.json"
SUPPORTED_FORMAT = 1


def load_manifest(location: str, stream: StreamOptions = DEFAULT_STREAM) -> dict[str, Any]:
    """Read ``manifest.json`` from a shard folder or URL prefix (local, http(s)://, s3://, gs://)."""
    url = join(location, MANIFEST)
    body = b""
    try:
        body = read_bytes(url, stream)
        manifest = json.loads(body)
    except MissingFile as e:
        raise ShardError(f"no {MANIFEST} at {location}; point data.shards at a folder made by `mcci shards build`") from e
    except ShardError:
        raise
    except ValueError as e:
        page = page_instead(body)
        if page:  # a server's page where the manifest should be: the URL is wrong, not the shards
            raise ShardError(f"{url} returned {page}, not a manifest; check the URL: it must be the shard folder made "
                             "by `mcci shards build`") from e
        raise ShardError(f"cannot read {url}: {e}; rebuild the shards with `mcci shards build`") from e
    if not isinstance(manifest, dict) or "splits" not in manifest:
        raise ShardError(f"{url} holds JSON that is not a shard manifest (no splits); check the URL: it must be the "
                         "shard folder made by `mcci shards build`")
    if manifest.get("format_version") != SUPPORTED_FORMAT:
        raise ShardError(f"{url} has format_version {manifest.get('format_version')}, this mcci reads "
                         f"{SUPPORTED_FORMAT}; rebuild the shards with this version")
    names = manifest.get("class_names", [])
    if manifest.get("num_classes") != len(names):  # an edited manifest would build a model of the wrong width
        raise ShardError(f"{url} says num_classes {manifest.get('num_classes')} but names {len(names)} classes; the "
                         "manifest was edited or damaged: rebuild the shards with `mcci shards build`")
    problem = _inconsistency(manifest)
    if problem:
        raise ShardError(f"{url} {problem}; the manifest was edited or damaged: rebuild the shards with "
                         "`mcci shards build`")
    return manifest


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _inconsistency(manifest: dict[str, Any]) -> str | None:
    """What in a manifest cannot be what `mcci shards build` wrote, checked before a job reads any shard: a model
    would be built of the wrong size, a path could leave the shard folder (``../``, absolute, a URL), one shard be
    read twice, or counts disagree."""
    size, names = manifest.get("image_size"), manifest.get("class_names")
    if not (isinstance(size, int) and not isinstance(size, bool) and 8 <= size <= MAX_IMAGE_SIZE):
        return f"has image_size {size!r}, not a whole number of pixels in 8..{MAX_IMAGE_SIZE}"
    if manifest.get("image_format") not in ("png", "jpeg"):
        return f"has image_format {manifest.get('image_format')!r}, not png or jpeg"
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
        return "has no list of class names (class_names)"
    if len(set(names)) != len(names):
        return f"names a class twice ({sorted({n for n in names if names.count(n) > 1})[:3]})"
    target = manifest.get("target")
    if not (_is_count(target) and target < len(names)):
        return f"has target {target!r}, not a class index in 0..{len(names) - 1}"
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not splits:
        return "has no splits"
    seen: dict[str, str] = {}
    for split, entry in splits.items():
        if not (isinstance(entry, dict) and _is_count(entry.get("count")) and isinstance(entry.get("shards"), list)):
            return f"has split {split!r} without a count and a list of shards"
        for shard in entry["shards"]:
            path = shard.get("path") if isinstance(shard, dict) else None
            if not isinstance(path, str) or not path:
                return f"lists a shard of {split!r} without a path"
            parts = PurePosixPath(path).parts
            if path.startswith(("/", "\\")) or "://" in path or ".." in parts or ":" in parts[0]:
                return f"lists shard {path!r} of {split!r}, outside the shard folder"
            if path in seen:
                return f"lists shard {path!r} twice (in {seen[path]!r} and {split!r})"
            seen[path] = split
            if not _is_count(shard.get("count")) or ("size" in shard and not _is_count(shard["size"])):
                return f"gives shard {path!r} a count or size that is not a whole number >= 0"
            if not (isinstance(shard.get("sha256"), str) and len(shard["sha256"]) == 64):
                return f"gives shard {path!r} no sha256"
        total = sum(s["count"] for s in entry["shards"])
        if total != entry["count"]:
            return f"is inconsistent: the shards of {split!r} hold {total} samples, the split records {entry['count']}"
    return None


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
