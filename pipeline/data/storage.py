"""Reading a shard folder wherever it lives: local paths, http(s)://, s3:// and gs://, through fsspec.

fsspec gives one file API over every store (s3fs and gcsfs are optional extras), so the manifest and
the shards take the same path whatever the URL. Credentials and endpoints come from the store's own
environment (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``),
never from the config file. What fsspec does not do is written here, small:

- retries with exponential backoff when a shard fails to open or breaks mid-read: the reader reopens
  the URL and resumes at the byte it had reached, so the tar parser above never sees the fault;
- verification while streaming: each shard's byte size and sha256 from manifest.json, and its sample
  count, checked as it is read (``verify="size"`` leaves out only the hash);
- a bounded local cache of verified shards, named by their sha256 (safe across shard folders);
- optional skipping of a shard that cannot be read, with a count of the samples lost.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterator, TypeVar

import fsspec
from webdataset.cache import LRUCleanup
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.support.config import DataConfig
from pipeline.support.errors import ShardError
from shards.upload import is_remote

T = TypeVar("T")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class StreamOptions:
    """How shards are read: the ``data.*`` keys of that name (their defaults and meaning are in
    pipeline/support/config.py)."""
    verify: str
    timeout: float
    retries: int
    backoff: float
    skip_bad_shards: bool
    cache_dir: str
    cache_gb: float

    @classmethod
    def from_config(cls, data: DataConfig) -> StreamOptions:
        return cls(verify=data.verify, timeout=data.timeout, retries=data.retries, backoff=data.retry_backoff,
                   skip_bad_shards=data.skip_bad_shards, cache_dir=data.cache_dir, cache_gb=data.cache_gb)


DEFAULT_STREAM = StreamOptions.from_config(DataConfig())


def with_overrides(options: StreamOptions, timeout: float | None = None, retries: int | None = None) -> StreamOptions:
    """``options`` with a job's ``--timeout`` / ``--retries`` where given (eval, audit, refit-head and preview read
    shards with the model's ``data.*`` settings, or the defaults, unless told otherwise)."""
    changes = {k: v for k, v in (("timeout", timeout), ("retries", retries)) if v is not None}
    return dataclasses.replace(options, **changes) if changes else options


def join(location: str, name: str) -> str:
    return location.rstrip("/") + "/" + name


def _storage_options(url: str, timeout: float) -> dict[str, Any]:
    """The timeout in each store's own terms; everything else is the store's default from the environment."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("http", "https"):
        import aiohttp

        # block_size=0 streams the body: plain servers (and many CDNs) do not serve byte ranges
        return {"block_size": 0, "client_kwargs": {"timeout": aiohttp.ClientTimeout(
            total=None, sock_connect=timeout, sock_read=timeout)}}
    if protocol == "s3":
        return {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout}}
    if protocol in ("gs", "gcs"):
        return {"requests_timeout": timeout}
    return {}


def open_url(url: str, timeout: float) -> IO[bytes]:
    """A binary stream of ``url`` (local path or any fsspec URL)."""
    return fsspec.open(url, "rb", **_storage_options(url, timeout)).open()


class MissingFile(ShardError):
    """A file a shard folder should hold is not there (a definite answer, not a fault: not retried)."""


def _is_missing(e: BaseException | None) -> bool:
    """fsspec's http raises FileNotFoundError whenever its size probe fails, with the real cause
    (a refused connection, a 500, a 404) chained: only a 404 or a bare FileNotFoundError is a missing file."""
    cause = e.__cause__ if e is not None else None
    return isinstance(e, FileNotFoundError) and (cause is None or _is_missing(cause) or
                                                 getattr(cause, "status", None) in (404, 410))


def with_retries(url: str, options: StreamOptions, attempt: Callable[[], T]) -> T:
    """``attempt()`` until it succeeds, sleeping ``backoff * 2**i`` between tries; a missing file or
    refused access is final at once, anything else (timeouts, 5xx, dropped connections) is retried,
    and the last failure becomes one ShardError naming the URL."""
    for i in range(options.retries + 1):
        try:
            return attempt()
        except ShardError:
            raise
        except ImportError as e:  # fsspec names the package a protocol needs
            raise ShardError(f"cannot read {url}: {e}; install the extra for it: pip install -e '.[http]', "
                             "'.[s3]' or '.[gcs]'") from e
        except PermissionError as e:
            raise ShardError(f"access to {url} denied ({e}); check the store's credentials in the environment "
                             "(AWS_PROFILE, AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS)") from e
        except IsADirectoryError as e:  # final: a folder stays a folder however often it is read
            raise ShardError(f"{url} is a folder, not a file; point at the shard folder made by `mcci shards build` "
                             "(the one holding manifest.json)") from e
        except Exception as e:  # noqa: BLE001 - every store raises its own types; all of them are retried
            if _is_missing(e):
                raise MissingFile(f"{url} does not exist; it is listed in the shard folder, so copy or upload "
                                  "the folder again (`mcci shards build`)") from e
            problem = f"{type(e).__name__}: {' '.join(str(e).split()) or 'no answer'}"
            if i == options.retries:
                raise ShardError(f"cannot read {url} after {options.retries + 1} attempts: {problem}; check the "
                                 "server, or raise data.retries / data.timeout (--retries / --timeout)") from e
            delay = options.backoff * 2 ** i
            # said while it happens: a slow or failing server otherwise looks like a job that hangs
            print(f"warning: reading {url} failed ({problem[:200]}); retry {i + 1} of {options.retries} in "
                  f"{delay:g} s", file=sys.stderr, flush=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


def read_bytes(url: str, options: StreamOptions) -> bytes:
    """The whole content of a small file (the manifest), with retries."""
    def attempt() -> bytes:
        with open_url(url, options.timeout) as f:
            return f.read()
    return with_retries(url, options, attempt)


def page_instead(data: bytes) -> str | None:
    """What a body that should be a tar or a manifest is instead, from its first bytes: an HTML page or a JSON error
    body (a shard's tar never starts with either: its first member is named by a sample key), else None."""
    head = data[:2048].lstrip()
    shown = " ".join(head[:60].decode(errors="replace").split())
    if head[:1] == b"<":
        return f"an HTML page (it begins {shown!r})"
    if head[:1] in (b"{", b"["):
        return f"JSON (it begins {shown!r})"
    return None


def damaged(url: str, problem: str) -> ShardError:
    """The one error for a shard whose bytes are not what the manifest says."""
    return ShardError(f"cannot read {url}: {problem}; compare the file with its size and sha256 in manifest.json "
                      "and rebuild or re-upload the shards (`mcci shards build`) if it differs")


class VerifiedShard:
    """A shard's bytes as a stream for the tar parser: reopened and resumed on a fault, checked
    against the manifest's size and sha256, and written to the cache once verified."""

    def __init__(self, url: str, record: dict[str, Any], options: StreamOptions, digests: dict[str, str]):
        self.url, self.record, self.options, self.digests = url, record, options, digests
        self.size: int | None = record.get("size")
        if self.size is None and options.verify != "hash":
            raise ShardError(f"manifest.json next to {url} records no shard sizes (built before sizes were "
                             "recorded); set data.verify=hash or rebuild the shards")
        self.hash = hashlib.sha256() if options.verify == "hash" else None
        self.pos = 0
        self.error: ShardError | None = None
        self.cached = self._cache_path()
        self.tee: IO[bytes] | None = None
        if self.cached and not os.path.exists(self.cached):
            os.makedirs(options.cache_dir, exist_ok=True)
            self.tee = tempfile.NamedTemporaryFile(dir=options.cache_dir, prefix=".partial-", delete=False)
        self.stream: IO[bytes] | None = with_retries(url, options, self._open)

    def _cache_path(self) -> str | None:
        if not self.options.cache_dir or not is_remote(self.url):
            return None
        return os.path.join(self.options.cache_dir, self.record["sha256"] + ".tar")

    def _open(self) -> IO[bytes]:
        """Open at ``self.pos``: from the cache when it holds the shard, else the URL, skipping what
        was already read (a seek where the store allows it)."""
        if self.cached and os.path.exists(self.cached):
            stream = open(self.cached, "rb")
        else:
            stream = open_url(self.url, self.options.timeout)
        if self.pos:
            try:
                stream.seek(self.pos)  # a range request on object stores
            except (ValueError, OSError):  # a streamed http body: read up to where the last attempt stopped
                left = self.pos
                while left:
                    skipped = len(stream.read(min(left, _CHUNK)))
                    if not skipped:
                        stream.close()
                        raise OSError(f"the reopened stream ended at byte {self.pos - left}")
                    left -= skipped
        return stream

    def read(self, n: int = -1) -> bytes:
        n = _CHUNK if n is None or n < 0 else n

        def attempt() -> bytes:
            if self.stream is None:  # broken by the last attempt: reopen, resuming at self.pos
                self.stream = self._open()
            try:
                return self.stream.read(n)
            except Exception:
                self.stream.close()
                self.stream = None
                raise
        try:
            data = with_retries(self.url, self.options, attempt)
            self._account(data)
        except ShardError as e:  # a copy: webdataset's tar stages append their context to the raised one's args
            self.error = ShardError(*e.args)
            raise
        return data

    def _account(self, data: bytes) -> None:
        if self.pos == 0 and data:
            page = page_instead(data)
            if page:  # a 200 answer that is not the file: no retry or hash check will say this as plainly
                raise ShardError(f"{self.url} returned {page}, not a tar shard; the server answers with a page (an "
                                 "error, a login or a folder listing): check the URL and the server")
        self.pos += len(data)
        if self.size is not None:
            if not data and self.pos < self.size:
                raise damaged(self.url, f"it ends at byte {self.pos} of the {self.size} recorded (truncated)")
            if self.pos > self.size:
                raise damaged(self.url, f"it is longer than the {self.size} bytes recorded")
        if self.hash is not None:
            self.hash.update(data)
        if self.tee is not None:
            self.tee.write(data)

    def finish(self, samples: int) -> None:
        """After the tar parser is done: read the rest (tar padding), then check count, size and hash."""
        while self.read(_CHUNK):
            pass
        self.error = self._mismatch(samples)
        if self.error:
            raise ShardError(*self.error.args)
        if self.tee is not None:
            self.tee.close()
            os.replace(self.tee.name, self.cached)
            self.tee = None
            LRUCleanup(self.options.cache_dir, int(self.options.cache_gb * 1e9), interval=None).cleanup()

    def _mismatch(self, samples: int) -> ShardError | None:
        if samples != self.record["count"]:
            return damaged(self.url, f"it holds {samples} samples, manifest.json records {self.record['count']}")
        if self.hash is not None and self.hash.hexdigest() != self.record["sha256"]:
            other = self.digests.get(self.hash.hexdigest())
            return damaged(self.url, "its sha256 differs from manifest.json's" +
                           (f" and equals {other}'s (shards swapped or renamed)" if other else ""))
        return None

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        if self.tee is not None:  # not read to the end: nothing verified to keep
            self.tee.close()
            os.unlink(self.tee.name)


def shard_samples(src: Iterator[dict[str, Any]], records: dict[str, dict[str, Any]],
                  options: StreamOptions) -> Iterator[dict[str, Any]]:
    """webdataset stage: ``{"url": ...}`` shard entries -> samples (``__key__``, ``__url__``, one entry
    per file), each shard verified as it is read. ``records`` maps each URL to its manifest entry."""
    digests = {r["sha256"]: r["path"] for r in records.values()}
    for entry in src:
        url, record = entry["url"], records[entry["url"]]
        count, shard = 0, None
        try:
            shard = VerifiedShard(url, record, options, digests)
            for sample in group_by_keys(tar_file_expander([{"url": url, "stream": shard}])):
                count += 1
                yield sample
            shard.finish(count)
        except Exception as e:
            error = (shard and shard.error) or (e if isinstance(e, ShardError) else damaged(url, f"{type(e).__name__}: {e}"))
            if not options.skip_bad_shards:
                raise error from (None if error is e else e)
            print(f"warning: skipped {url}, {record['count'] - count} of its {record['count']} samples not read "
                  f"(data.skip_bad_shards=true): {error}", file=sys.stderr)
        finally:
            if shard is not None:
                shard.close()
