"""Reading a shard folder wherever it lives: local paths, http(s)://, s3:// and gs://, through fsspec.

fsspec gives one file API over every store (s3fs and gcsfs are optional extras), so the manifest and
the shards take the same path whatever the URL. Credentials and endpoints come from the store's own
environment (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``),
never from the config file. What fsspec does not do is written here, small:

- retries with exponential backoff when a shard fails to open or breaks mid-read: the reader reopens
  the URL and resumes at the byte it had reached, so the tar parser above never sees the fault;
- verification before use: each shard's byte size and sha256 from manifest.json are checked on the whole
  shard before the first of its samples is passed on (a local shard is read through once, a remote one is
  fetched into the cache or a temporary file), so a shard read only partly (an epoch's cut, a reference's
  first images) is verified like one read to its end, and a damaged shard gives none of its samples; its
  sample count is checked as it is parsed (``verify="size"`` leaves out only the hash);
- a bounded local cache of verified shards, named by their sha256 (safe across shard folders), shared by
  every worker and rank that points at it: a download is written aside and renamed, only complete shards are
  evicted, a shard evicted while being opened is fetched again, and a cached copy that no longer matches its
  sha256 is evicted and fetched again;
- optional skipping of a shard that cannot be read, counted in a ``ShardTally`` that the jobs record.
"""
from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
import dataclasses
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterator, TypeVar

import fsspec
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.support.config import DataConfig
from pipeline.support.errors import ShardError
from shards.upload import is_remote

T = TypeVar("T")
_CHUNK = 1 << 20
_PARTIAL = ".partial-"  # a download in progress in the cache: <_PARTIAL><host>-<pid>-<random>


class ShardTally:
    """The shards a read skipped (``data.skip_bad_shards``) and the samples of theirs not read, counted in shared
    memory: a loader's worker processes inherit it and count into it, and the job reads the sums."""

    def __init__(self) -> None:
        self._counts = multiprocessing.Array("q", 2)  # shards, samples

    def add(self, shards: int, samples: int) -> None:
        with self._counts.get_lock():
            self._counts[0] += shards
            self._counts[1] += samples

    def counts(self) -> tuple[int, int]:
        """(shards skipped, samples not read) so far."""
        with self._counts.get_lock():
            return self._counts[0], self._counts[1]


@dataclass(frozen=True)
class StreamOptions:
    """How shards are read: the ``data.*`` keys of that name (their defaults and meaning are in
    pipeline/support/config.py), and the ``tally`` skipped shards are counted in (None: not counted)."""
    verify: str
    timeout: float
    retries: int
    backoff: float
    skip_bad_shards: bool
    cache_dir: str
    cache_gb: float
    tally: ShardTally | None = field(default=None, compare=False)

    @classmethod
    def from_config(cls, data: DataConfig, tally: ShardTally | None = None) -> StreamOptions:
        return cls(verify=data.verify, timeout=data.timeout, retries=data.retries, backoff=data.retry_backoff,
                   skip_bad_shards=data.skip_bad_shards, cache_dir=data.cache_dir, cache_gb=data.cache_gb, tally=tally)

    @classmethod
    def for_scoring(cls, data: DataConfig, skip_bad_shards: bool = False) -> StreamOptions:
        """How a job that reports figures (eval, audit, a head refit) reads: the run's retries, timeout and cache,
        but every shard's sha256 checked and, unless ``skip_bad_shards`` is asked for here, no shard skipped (a
        training run's ``data.skip_bad_shards`` is not inherited); skips are counted in a tally of its own."""
        options = cls.from_config(data, ShardTally())
        return dataclasses.replace(options, verify="hash", skip_bad_shards=skip_bad_shards)


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


class _Check:
    """A shard's bytes against its manifest entry, fed as they are read: the byte size, and the sha256 under
    ``verify="hash"``."""

    def __init__(self, url: str, record: dict[str, Any], options: StreamOptions, digests: dict[str, str]):
        self.url, self.record, self.digests = url, record, digests
        self.size: int | None = record.get("size")
        if self.size is None and options.verify != "hash":
            raise ShardError(f"manifest.json next to {url} records no shard sizes (built before sizes were "
                             "recorded); set data.verify=hash or rebuild the shards")
        self.hash = hashlib.sha256() if options.verify == "hash" else None
        self.pos = 0

    def update(self, data: bytes) -> None:
        if self.pos == 0 and data:
            page = page_instead(data)
            if page:  # a 200 answer that is not the file: no retry or hash check will say this as plainly
                raise ShardError(f"{self.url} returned {page}, not a tar shard; the server answers with a page (an "
                                 "error, a login or a folder listing): check the URL and the server")
        self.advance(len(data))
        if self.hash is not None:
            self.hash.update(data)

    def advance(self, length: int) -> None:
        self.pos += length
        if self.size is not None and self.pos > self.size:
            raise damaged(self.url, f"it is longer than the {self.size} bytes recorded")

    def finish(self) -> None:
        """At the end of the bytes: refuse a short shard, or one whose sha256 is not the manifest's."""
        if self.size is not None and self.pos < self.size:
            raise damaged(self.url, f"it ends at byte {self.pos} of the {self.size} recorded (truncated)")
        if self.hash is not None and self.hash.hexdigest() != self.record["sha256"]:
            other = self.digests.get(self.hash.hexdigest())
            raise damaged(self.url, "its sha256 differs from manifest.json's" +
                          (f" and equals {other}'s (shards swapped or renamed)" if other else ""))


def _open_at(url: str, options: StreamOptions, pos: int) -> IO[bytes]:
    """``url`` opened at byte ``pos``: a seek where the store allows it, else the prefix read and dropped."""
    stream = open_url(url, options.timeout)
    if pos:
        try:
            stream.seek(pos)  # a range request on object stores
        except (ValueError, OSError):  # a streamed http body: read up to where the last attempt stopped
            left = pos
            while left:
                skipped = len(stream.read(min(left, _CHUNK)))
                if not skipped:
                    stream.close()
                    raise OSError(f"the reopened stream ended at byte {pos - left}")
                left -= skipped
    return stream


def _copy_checked(url: str, options: StreamOptions, check: _Check, sink: IO[bytes]) -> None:
    """Copy ``url`` to its end into ``sink`` through ``check``. A fault reopens the URL and resumes at the byte
    reached, retried as ``with_retries`` says, so the copy never repeats or loses a byte."""
    stream: IO[bytes] | None = None

    def attempt() -> bytes:
        nonlocal stream
        if stream is None:  # first, or broken by the last attempt: reopen, resuming at check.pos
            stream = _open_at(url, options, check.pos)
        try:
            return stream.read(_CHUNK)
        except Exception:
            stream.close()
            stream = None
            raise
    try:
        while data := with_retries(url, options, attempt):
            check.update(data)
            sink.write(data)
        check.finish()
    finally:
        if stream is not None:
            stream.close()


def _cache_path(url: str, record: dict[str, Any], options: StreamOptions) -> str | None:
    if not options.cache_dir or not is_remote(url):
        return None
    return os.path.join(options.cache_dir, record["sha256"] + ".tar")


def _check_file(f: IO[bytes], check: _Check) -> None:
    """Check a seekable file from byte 0 (its size alone when there is no hash to take), and leave it at byte 0."""
    if check.hash is None:
        check.advance(f.seek(0, os.SEEK_END))
    else:
        while data := f.read(_CHUNK):
            check.update(data)
    check.finish()
    f.seek(0)


def _open_cached(path: str, url: str, record: dict[str, Any], options: StreamOptions) -> IO[bytes] | None:
    """The cache's copy of a shard, checked again, at byte 0; None when there is none. The file is opened once and
    checked through that handle: evicted before the open, it is simply not there (fetched again); evicted after, the
    handle still reads it. A copy that no longer matches the manifest (a disk fault, a write cut short outside this
    code) is evicted, said, and fetched again, instead of failing every later read."""
    check = _Check(path, record, options, {})  # a manifest it cannot check against is the shards' fault, not the copy's
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    try:
        _check_file(f, check)
    except ShardError as e:
        f.close()
        _unlink(path)
        print(f"warning: evicted the cached copy of {url}, fetching it again: {e}", file=sys.stderr)
        return None
    try:
        os.utime(path)  # used now: the last to be evicted
    except FileNotFoundError:
        pass
    return f


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:  # another process removed it first
        pass


def _writer_gone(name: str) -> bool:
    """Whether a ``.partial-`` file's writer, a process on this host, has ended (a download it left behind)."""
    writer = name[len(_PARTIAL):].rsplit("-", 2)  # host, pid, tempfile's random part (no "-" in it)
    if len(writer) != 3 or writer[0] != socket.gethostname() or not writer[1].isdigit():
        return False  # another host's: its writer cannot be asked
    try:
        os.kill(int(writer[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def evict(cache_dir: str, bound_bytes: int) -> None:
    """Bring the cache under ``bound_bytes``: the least recently used complete shards (``<sha256>.tar``) go first.
    A ``.partial-`` file is a download in progress, another worker's or rank's, and is never a candidate (deleting
    it would fail that download); one whose writer on this host has ended is removed."""
    shards = []
    for entry in os.scandir(cache_dir):
        try:
            if entry.name.startswith(_PARTIAL):
                if _writer_gone(entry.name):
                    _unlink(entry.path)
            elif entry.name.endswith(".tar"):
                stat = entry.stat()
                shards.append((stat.st_mtime, entry.path, stat.st_size))
        except FileNotFoundError:  # renamed or evicted by another process meanwhile
            continue
    total = sum(size for _, _, size in shards)
    for _, path, size in sorted(shards):
        if total <= bound_bytes:
            break
        _unlink(path)
        total -= size


@contextmanager
def verified_shard(url: str, record: dict[str, Any], options: StreamOptions,
                   digests: dict[str, str]) -> Iterator[IO[bytes]]:
    """The shard's bytes as an open file at byte 0, checked in full against its manifest entry before it is given:
    a local shard is read through once first; a remote one comes from the cache, or is fetched (with retries) into
    the cache when there is one, else into a temporary file. A shard that fails raises ShardError before any of its
    bytes reach the parser; nothing is left behind in the cache."""
    cached = _cache_path(url, record, options)
    if not is_remote(url):  # checked through the handle it is then parsed from
        with with_retries(url, options, lambda: open_url(url, options.timeout)) as f:
            _check_file(f, _Check(url, record, options, digests))
            yield f
        return
    hit = _open_cached(cached, url, record, options) if cached else None
    if hit is not None:
        with hit:
            yield hit
        return
    if cached:
        os.makedirs(options.cache_dir, exist_ok=True)
        sink = tempfile.NamedTemporaryFile(dir=options.cache_dir, delete=False,
                                           prefix=f"{_PARTIAL}{socket.gethostname()}-{os.getpid()}-")
    else:
        sink = tempfile.TemporaryFile()
    with sink:
        try:
            _copy_checked(url, options, _Check(url, record, options, digests), sink)
            if cached:
                # renamed while open: this reader keeps its bytes whatever another process evicts from now on
                os.replace(sink.name, cached)
                evict(options.cache_dir, int(options.cache_gb * 1e9))
        except BaseException:
            if cached:
                _unlink(sink.name)
            raise
        sink.seek(0)
        yield sink


def shard_samples(src: Iterator[dict[str, Any]], records: dict[str, dict[str, Any]],
                  options: StreamOptions) -> Iterator[dict[str, Any]]:
    """webdataset stage: ``{"url": ...}`` shard entries -> samples (``__key__``, ``__url__``, one entry
    per file), each shard verified before its first sample (``verified_shard``) and its sample count as it ends.
    ``records`` maps each URL to its manifest entry. With ``options.skip_bad_shards`` a shard that fails is skipped,
    said, and counted in ``options.tally``."""
    digests = {r["sha256"]: r["path"] for r in records.values()}
    for entry in src:
        url, record = entry["url"], records[entry["url"]]
        count = 0
        try:
            with verified_shard(url, record, options, digests) as stream:
                for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
                    count += 1
                    yield sample
            if count != record["count"]:
                raise damaged(url, f"it holds {count} samples, manifest.json records {record['count']}")
        except Exception as e:
            error = e if isinstance(e, ShardError) else damaged(url, f"{type(e).__name__}: {e}")
            if not options.skip_bad_shards:
                raise error from (None if error is e else e)
            if options.tally is not None:
                options.tally.add(1, record["count"] - count)
            print(f"warning: skipped {url}, {record['count'] - count} of its {record['count']} samples not read "
                  f"(data.skip_bad_shards=true): {error}", file=sys.stderr)
