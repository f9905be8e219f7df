"""Shard folders read from http:// and s3:// servers on 127.0.0.1 (no network): the same results as
from disk, retries through server faults, one clear line when a shard stays unreadable, and every
corruption (flipped byte, truncation, deletion, two shards swapped) detected and named."""
from __future__ import annotations

import dataclasses
import functools
import http.server
import io
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from conftest import TINY_TRAIN
from pipeline.cli import main
from pipeline.data.loaders import eval_loader
from pipeline.data.manifest import load_manifest
from pipeline.data.storage import DEFAULT_STREAM, StreamOptions
from pipeline.support.errors import ShardError

def stream_options(**changes) -> StreamOptions:
    return dataclasses.replace(DEFAULT_STREAM, **changes)


FAST = stream_options(retries=2, backoff=0.0, timeout=5.0)
SHARD = "/train/train-000001.tar"


class FaultyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``faults[path]`` lists what the next GETs of that path get instead of the file:
    "500", "drop" (headers with the full length, half the body, then the connection closed),
    "stall" (no answer for longer than the client's timeout, then the file) or "hold" (half the body, then
    ``holding`` is set and the rest waits for ``release``)."""
    faults: dict[str, list[str]] = {}
    gets: list[str] = []
    holding: threading.Event
    release: threading.Event

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.gets.append(self.path)
        fault = self.faults[self.path].pop(0) if self.faults.get(self.path) else None
        if fault == "500":
            self.send_error(500)
        elif fault in ("drop", "hold"):
            body = Path(self.directory, self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            if fault == "drop":
                time.sleep(0.5)  # the client reads the first half before the connection goes
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
            else:
                self.holding.set()
                self.release.wait(300)
                self.wfile.write(body[len(body) // 2:])
        else:
            if fault == "stall":
                time.sleep(2.0)
            super().do_GET()


@contextmanager
def serve(folder: Path, **faults: list[str]) -> Iterator[tuple[str, type[FaultyHandler]]]:
    """``http://127.0.0.1:PORT`` serving ``folder`` from a thread; faults keyed by path (``_`` for ``/``)."""
    handler = type("Handler", (FaultyHandler,), {"faults": {k.replace("_", "/"): v for k, v in faults.items()},
                                                 "gets": [], "holding": threading.Event(), "release": threading.Event()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        handler.release.set()
        server.shutdown()
        server.server_close()


def read_split(location: str, split: str = "train", stream: StreamOptions = FAST) -> list[int]:
    """The dataset indices of a split, in the order read."""
    return [int(i) for b in eval_loader(location, load_manifest(location, stream), split, 8, 0, stream=stream)
            for i in b.indices]


def test_http_train_and_eval_equal_the_local_run(tiny_shards, tmp_path):
    metrics = {}
    with serve(tiny_shards) as (url, handler):
        for name, location in (("local", str(tiny_shards)), ("http", url)):
            out = tmp_path / name
            main(["train", f"data.shards={location}", f"train.out={out}", *TINY_TRAIN])
            main(["eval", "--checkpoint", str(out), "--shards", location, "--out", str(tmp_path / f"{name}.json"),
                  "--num-workers", "0", "--device", "cpu"])
            metrics[name] = json.loads((tmp_path / f"{name}.json").read_text())
        assert "/manifest.json" in handler.gets and "/test-poisoned/test-poisoned-000000.tar" in handler.gets
    assert metrics["http"] == metrics["local"]
    assert (tmp_path / "http" / "model" / "model.safetensors").read_bytes() == \
           (tmp_path / "local" / "model" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("fault", ["500", "drop", "stall"])
def test_a_passing_fault_is_retried(tiny_shards, fault):
    expected = read_split(str(tiny_shards))
    with serve(tiny_shards, **{SHARD.replace("/", "_"): [fault]}) as (url, handler):
        stream = stream_options(retries=2, backoff=0.0, timeout=1.0)
        assert read_split(url, stream=stream) == expected  # resumed where it broke: no sample twice or lost
        # the fault, then our retry (aiohttp itself may retry a dropped keep-alive connection once more)
        assert handler.gets.count(SHARD) == 2 if fault == "500" else handler.gets.count(SHARD) >= 2


@pytest.mark.parametrize("fault", ["500", "drop"])
def test_a_lasting_fault_is_one_error_naming_the_url(tiny_shards, fault):
    with serve(tiny_shards, **{SHARD.replace("/", "_"): [fault] * 10}) as (url, handler):
        with pytest.raises(ShardError, match=rf"cannot read {url}{SHARD} after 3 attempts: .*data.retries"):
            read_split(url)
        assert handler.gets.count(SHARD) == 3 if fault == "500" else handler.gets.count(SHARD) >= 3


def test_a_missing_remote_shard_stops_mcci_with_one_line(tiny_shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(tiny_shards, folder)
    for shard in (folder / "train").glob("*.tar"):
        shard.unlink()
    with serve(folder) as (url, _):
        r = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", f"data.shards={url}",
                            f"train.out={tmp_path / 'run'}", *TINY_TRAIN,
                            "data.num_workers=2"],  # the error crosses from a loader worker
                           capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith(f"mcci train: error: {url}/train/train-0000") and "does not exist" in r.stderr


def test_a_missing_manifest_names_the_fix(tmp_path):
    with serve(tmp_path) as (url, _):
        with pytest.raises(ShardError, match=f"no manifest.json at {url}; point data.shards"):
            load_manifest(url, FAST)


def test_an_unreachable_server_is_a_fault_not_a_missing_manifest():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ShardError, match=rf"cannot read {url}/manifest.json after 3 attempts: .*data.retries"):
        load_manifest(url, FAST)


def _flip(path: Path, member: str = ".cls") -> None:
    """One byte of the first ``member`` file changed: a tar that still parses and decodes (``.cls``
    is not read), or an image that no longer decodes (``.png``)."""
    import tarfile

    with tarfile.open(path) as tar:
        offset = next(m.offset_data for m in tar.getmembers() if m.name.endswith(member))
    data = bytearray(path.read_bytes())
    data[offset + (0 if member == ".cls" else 40)] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1500])


def _swap(path: Path) -> None:
    other = path.with_name("train-000002.tar")
    a, b = path.read_bytes(), other.read_bytes()
    path.write_bytes(b)
    other.write_bytes(a)


CORRUPTIONS = {
    "flip": (_flip, r"train-000001.tar: its sha256 differs from manifest.json's;"),
    # the hash is checked before any sample is parsed: a damaged image never reaches the decoder
    "flip-image": (functools.partial(_flip, member=".png"), r"train-000001.tar: its sha256 differs from manifest.json's;"),
    "truncate": (_truncate, r"train-000001.tar: it ends at byte 1500 of the \d+ recorded \(truncated\)"),
    "delete": (Path.unlink, r"train-000001.tar does not exist"),
    "swap": (_swap, r"train-000001.tar: its sha256 differs from manifest.json's and equals "
                    r"train/train-000002.tar's \(shards swapped or renamed\)"),
}


@pytest.mark.parametrize("where", ["local", "http"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corruption_is_detected_and_named(tiny_shards, tmp_path, where, corruption):
    folder = tmp_path / "shards"
    shutil.copytree(tiny_shards, folder)
    damage, message = CORRUPTIONS[corruption]
    damage(folder / "train" / "train-000001.tar")
    with serve(folder) as (url, _):
        location = url if where == "http" else str(folder)
        with pytest.raises(ShardError, match=message) as error:
            read_split(location)
    assert f"{location}/train/train-000001.tar" in str(error.value) and "\n" not in str(error.value)


def test_without_the_hash_an_image_that_does_not_decode_is_named(tiny_shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(tiny_shards, folder)
    _flip(folder / "train" / "train-000001.tar", member=".png")
    with pytest.raises(ShardError, match=r"train-000001.tar: sample \S+'s png does not decode"):
        read_split(str(folder), stream=stream_options(verify="size", retries=0))


def test_verify_size_skips_only_the_hash(tiny_shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(tiny_shards, folder)
    _flip(folder / "train" / "train-000001.tar")
    size_only = stream_options(verify="size", retries=0)
    read_split(str(folder), stream=size_only)  # same size, same count: accepted without the hash
    _truncate(folder / "train" / "train-000001.tar")
    with pytest.raises(ShardError, match="truncated"):
        read_split(str(folder), stream=size_only)


def test_the_sample_count_is_checked_even_without_the_hash(tiny_shards, tmp_path):
    import tarfile

    folder = tmp_path / "shards"
    shutil.copytree(tiny_shards, folder)
    path = folder / "train" / "train-000001.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:  # one sample (its files) left out, the size recorded anew
        first_key = members[0][0].name.split(".")[0]
        for member, data in members:
            if not member.name.startswith(first_key + "."):
                tar.addfile(member, io.BytesIO(data))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][1]["size"] = path.stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"train-000001.tar: it holds 8 samples, manifest.json records 9"):
        read_split(str(folder), stream=stream_options(verify="size", retries=0))


def test_a_split_whose_shards_do_not_add_up_is_refused(tiny_shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(tiny_shards, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["splits"]["test-clean"]["count"] += 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"the shards of 'test-clean' hold 12 samples, the split records 13"):
        read_split(str(folder), "test-clean")


def test_skipping_is_off_by_default_and_counted_when_on(tiny_shards, tmp_path, capsys):
    folder = tmp_path / "shards"
    shutil.copytree(tiny_shards, folder)
    (folder / "train" / "train-000001.tar").unlink()
    with pytest.raises(ShardError):
        read_split(str(folder))
    indices = read_split(str(folder), stream=stream_options(skip_bad_shards=True, retries=0))
    assert len(indices) == 42 - 9
    assert "skipped " + str(folder / "train" / "train-000001.tar") + ", 9 of its 9 samples not read" in capsys.readouterr().err


def test_eval_never_skips_a_shard_unless_asked_and_then_counts_it(trained, tiny_shards, tmp_path, capsys):
    import yaml

    model = shutil.copytree(trained / "mcci" / "model", tmp_path / "model")
    config = yaml.safe_load((model / "config.yaml").read_text())
    (model / "config.yaml").write_text(yaml.safe_dump({**config, "data": {**config["data"], "skip_bad_shards": True}}))
    folder = tmp_path / "shards"
    shutil.copytree(tiny_shards, folder)
    damaged = folder / "test-clean" / "test-clean-000000.tar"  # 9 of the 12 clean test images
    _damage_the_end(damaged)
    common = ["eval", "--checkpoint", str(model), "--shards", str(folder), "--num-workers", "0", "--device", "cpu"]
    with pytest.raises(SystemExit) as stop:  # the run skipped bad shards; its evaluation does not follow it
        main([*common, "--out", str(tmp_path / "refused.json")])
    assert stop.value.code == 2 and "test-clean-000000.tar: its sha256 differs" in capsys.readouterr().err
    assert not (tmp_path / "refused.json").exists()

    main([*common, "--skip-bad-shards", "--out", str(tmp_path / "skipped.json")])
    assert "1 shard(s) skipped, 9 samples not scored" in capsys.readouterr().out
    skipped = json.loads((tmp_path / "skipped.json").read_text())
    assert skipped["data"]["skipped"] == {"shards": 1, "samples": 9}
    damaged.unlink()  # none of the damaged shard's samples were scored: the figures are those without it
    main([*common, "--skip-bad-shards", "--out", str(tmp_path / "without.json")])
    assert json.loads((tmp_path / "without.json").read_text())["mcci"] == skipped["mcci"]


def test_training_that_skips_shards_records_the_samples_lost_in_its_logs_and_model(tiny_shards, tmp_path):
    from pipeline.jobs.train import TRAIN_LOG

    folder = tmp_path / "shards"
    shutil.copytree(tiny_shards, folder)
    for i in (1, 2, 3):  # 9 samples each, of the 42
        (folder / "train" / f"train-00000{i}.tar").unlink()
    run = [f"data.shards={folder}", *TINY_TRAIN, "data.skip_bad_shards=true", "train.epochs=2",
           "train.keep_checkpoints=10"]
    main(["train", *run, f"train.out={tmp_path / 'straight'}"])
    log = [json.loads(line) for line in (tmp_path / "straight" / TRAIN_LOG).read_text().splitlines()]
    lost = [r["skipped_samples"] for r in log]
    assert lost == sorted(lost) and lost[-1] > 0 and lost[-1] % 9 == 0  # a running count, whole shards
    validated = [json.loads(line) for line in (tmp_path / "straight" / "val_log.jsonl").read_text().splitlines()]
    assert validated and all(r["skipped_samples"] == 0 for r in validated)  # the test shards are whole
    meta = json.loads((tmp_path / "straight" / "model" / "model.json").read_text())
    assert meta["skipped"] == {"shards": lost[-1] // 9, "samples": lost[-1]}

    # resumed from the first epoch's checkpoint, the count goes on from what the checkpoint holds
    resumed = tmp_path / "resumed" / "checkpoints"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-00000005", resumed / "step-00000005")
    main(["train", *run, f"train.out={tmp_path / 'resumed'}", "train.resume=true"])
    assert json.loads((tmp_path / "resumed" / "model" / "model.json").read_text())["skipped"] == meta["skipped"]


def test_the_cache_serves_later_epochs_and_stays_bounded(tiny_shards, tmp_path):
    cache = tmp_path / "cache"
    stream = stream_options(retries=0, cache_dir=str(cache))
    with serve(tiny_shards) as (url, handler):
        first = read_split(url, stream=stream)
        shard_gets = [p for p in handler.gets if p.endswith(".tar")]
        assert read_split(url, stream=stream) == first
        assert [p for p in handler.gets if p.endswith(".tar")] == shard_gets  # the second pass came from the cache
    manifest = load_manifest(str(tiny_shards))
    assert {p.name for p in cache.iterdir()} == {s["sha256"] + ".tar" for s in manifest["splits"]["train"]["shards"]}
    largest = max(s["size"] for s in manifest["splits"]["train"]["shards"])
    bounded = tmp_path / "bounded"
    with serve(tiny_shards) as (url, _):
        read_split(url, stream=stream_options(retries=0, cache_dir=str(bounded), cache_gb=2.5 * largest / 1e9))
    assert 0 < sum(p.stat().st_size for p in bounded.iterdir()) <= 2.5 * largest


@pytest.fixture
def s3_endpoint(monkeypatch) -> Iterator[str]:
    """moto's S3 server on a free loopback port, with the environment s3fs reads pointing at it."""
    server_module = pytest.importorskip("moto.server", reason="S3 tests need `pip install -e '.[test]'` (moto[server])")
    pytest.importorskip("s3fs", reason="S3 tests need `pip install -e '.[test]'` (s3fs)")
    import fsspec

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # moto keeps its buckets in the process, across servers: start every test from an empty store
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    fsspec.filesystem("s3").clear_instance_cache()  # no client made for another endpoint
    fsspec.filesystem("s3").mkdir("mcci-test")
    yield endpoint
    fsspec.filesystem("s3").clear_instance_cache()
    server.stop()


def test_s3_build_upload_train_and_eval_equal_the_local_run(s3_endpoint, tmp_path):
    from conftest import make_image_tree

    data = make_image_tree(tmp_path / "data", classes=3, per_class=16, test_per_class=4)
    build = ["shards", "build", "--source", str(data), "--poison-rate", "0.2", "--shard-size", "9", "--trusted-count", "6"]
    url = "s3://mcci-test/tiny"
    main([*build, "--out", url])
    main([*build, "--out", str(tmp_path / "local")])
    metrics = {}
    for name, location in (("local", str(tmp_path / "local")), ("s3", url)):
        main(["train", f"data.shards={location}", f"train.out={tmp_path / name}", *TINY_TRAIN])
        main(["eval", "--checkpoint", str(tmp_path / name), "--shards", location, "--out", str(tmp_path / f"{name}.json"),
              "--num-workers", "0", "--device", "cpu"])
        metrics[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert metrics["s3"] == metrics["local"]
    with pytest.raises(SystemExit) as exit_:  # an existing data set is not replaced without --overwrite
        main([*build, "--out", url])
    assert exit_.value.code == 2


def test_s3_upload_writes_the_manifest_last(s3_endpoint, tiny_shards, monkeypatch):
    import fsspec
    from s3fs import S3FileSystem

    from shards.upload import upload_folder

    order = []
    put_file = S3FileSystem._put_file

    async def recorded(self, lpath, rpath, *args, **kwargs):
        order.append(rpath)
        return await put_file(self, lpath, rpath, *args, **kwargs)
    monkeypatch.setattr(S3FileSystem, "_put_file", recorded)
    fsspec.filesystem("s3").clear_instance_cache()  # the next instance wraps the recording method
    upload_folder(tiny_shards, "s3://mcci-test/order", overwrite=False)
    assert len(order) == sum(1 for p in tiny_shards.rglob("*") if p.is_file())
    assert order[-1].endswith("mcci-test/order/manifest.json")


# --- the cache, shared by processes (a loader's workers, the ranks of a node) -----------------------------------------

def _read_in_a_process(url: str, stream: StreamOptions, results) -> None:
    """``read_split`` in a process of its own, as a loader worker or another rank reads: its indices, or its error."""
    try:
        results.put(("read", read_split(url, stream=stream)))
    except Exception as e:  # noqa: BLE001 - the parent asserts on it
        results.put(("error", str(e)))


def _partials(cache: Path) -> list[Path]:
    return sorted(cache.glob(".partial-*"))


def test_a_download_in_progress_survives_another_process_filling_the_cache(tiny_shards, tmp_path):
    cache = tmp_path / "cache"
    expected = read_split(str(tiny_shards))
    one_shard = max(s["size"] for s in load_manifest(str(tiny_shards))["splits"]["train"]["shards"]) / 1e9
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    with serve(tiny_shards, **{SHARD.replace("/", "_"): ["hold"]}) as (url, handler):
        slow = spawn.Process(target=_read_in_a_process, args=(url, stream_options(retries=0, timeout=300,
                                                                                  cache_dir=str(cache)), results))
        slow.start()
        assert handler.holding.wait(300)  # the slow reader is half-way through the shard: its download is in the cache
        [partial] = _partials(cache)
        # another process reads the split with room for one shard: it evicts what it can, but not another's download
        fast = spawn.Process(target=_read_in_a_process, args=(url, stream_options(retries=0, cache_dir=str(cache),
                                                                                  cache_gb=one_shard), results))
        fast.start()
        fast.join(300)
        assert results.get(timeout=10) == ("read", expected)
        assert partial.exists()
        handler.release.set()
        slow.join(300)
        assert results.get(timeout=10) == ("read", expected)
    assert not _partials(cache)


def test_processes_reading_through_one_small_cache_all_read_every_sample(tiny_shards, tmp_path):
    cache = tmp_path / "cache"
    expected = read_split(str(tiny_shards))
    two_shards = 2 * max(s["size"] for s in load_manifest(str(tiny_shards))["splits"]["train"]["shards"]) / 1e9
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    with serve(tiny_shards) as (url, _):
        readers = [spawn.Process(target=_read_in_a_process, args=(url, stream_options(
            retries=0, cache_dir=str(cache), cache_gb=two_shards), results)) for _ in range(3)]
        for reader in readers:
            reader.start()
        outcomes = [results.get(timeout=300) for _ in readers]
        for reader in readers:
            reader.join(60)
    assert outcomes == [("read", expected)] * 3
    assert not _partials(cache) and sum(p.stat().st_size for p in cache.iterdir()) <= two_shards * 1e9


def test_a_cached_shard_evicted_as_it_is_opened_is_fetched_again(tiny_shards, tmp_path, monkeypatch):
    from pipeline.data import storage

    cache = tmp_path / "cache"
    stream = stream_options(retries=0, cache_dir=str(cache))
    with serve(tiny_shards) as (url, handler):
        expected = read_split(url, stream=stream)  # every shard cached

        def evicted_as_opened(path, *args, **kwargs):  # another process's eviction, as this one looks for the file
            if Path(path).parent == cache:
                Path(path).unlink(missing_ok=True)
            return open(path, *args, **kwargs)
        monkeypatch.setattr(storage, "open", evicted_as_opened, raising=False)
        gets = len(handler.gets)
        assert read_split(url, stream=stream) == expected
        assert SHARD in handler.gets[gets:]  # fetched from the store again, not refused as missing there


def test_a_cached_copy_that_no_longer_matches_is_evicted_and_fetched_again(tiny_shards, tmp_path, capsys):
    cache = tmp_path / "cache"
    stream = stream_options(retries=0, cache_dir=str(cache))
    with serve(tiny_shards) as (url, handler):
        expected = read_split(url, stream=stream)
        record = load_manifest(str(tiny_shards))["splits"]["train"]["shards"][1]
        cached = cache / (record["sha256"] + ".tar")
        _flip(cached)  # a disk fault in the cache
        assert read_split(url, stream=stream) == expected
    assert cached.read_bytes() == (tiny_shards / record["path"]).read_bytes()
    assert f"evicted the cached copy of {url}/{record['path']}, fetching it again" in capsys.readouterr().err


@pytest.mark.parametrize("fault", ["404", "500"])
def test_a_shard_that_cannot_be_fetched_leaves_nothing_in_the_cache(tiny_shards, tmp_path, fault):
    folder = tmp_path / "shards"
    shutil.copytree(tiny_shards, folder)
    faults = {}
    if fault == "404":
        (folder / SHARD.lstrip("/")).unlink()
    else:
        faults = {SHARD.replace("/", "_"): ["500"] * 10}
    cache = tmp_path / "cache"
    with serve(folder, **faults) as (url, _):
        indices = read_split(url, stream=stream_options(retries=1, backoff=0.0, cache_dir=str(cache),
                                                        skip_bad_shards=True))
    assert len(indices) == 42 - 9
    assert not _partials(cache) and len(list(cache.iterdir())) == 4  # the four shards read, nothing of the fifth


def test_a_download_whose_process_has_ended_is_cleared_from_the_cache(tiny_shards, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    left_behind = cache / f".partial-{host}-{int(ended.stdout)}-abc123"
    in_progress = [cache / f".partial-{host}-{os.getpid()}-def456", cache / ".partial-otherhost-1-ghi789"]
    for path in (left_behind, *in_progress):
        path.write_bytes(b"x" * 100)
    with serve(tiny_shards) as (url, _):
        read_split(url, stream=stream_options(retries=0, cache_dir=str(cache)))
    assert not left_behind.exists() and all(p.exists() for p in in_progress)


# --- verification of shards read only in part --------------------------------------------------------------------------

def _damage_the_end(path: Path) -> None:
    """One byte of the tar's end-of-archive padding changed: every sample still parses, only the sha256 tells."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _damaged_split(tiny_shards: Path, tmp_path: Path, split: str) -> tuple[Path, dict]:
    """A copy of the shards whose every ``split`` shard has its end damaged, and its manifest."""
    folder = tmp_path / "shards"
    shutil.copytree(tiny_shards, folder)
    manifest = load_manifest(str(folder))
    for record in manifest["splits"][split]["shards"]:
        _damage_the_end(folder / record["path"])
    return folder, manifest


def test_a_reference_taken_from_the_first_images_of_a_damaged_shard_is_refused(tiny_shards, tmp_path):
    import torch

    from pipeline.components.evaluation import reference_spectra
    from pipeline.components.models import build_transform
    from pipeline.support.config import load_config

    folder, manifest = _damaged_split(tiny_shards, tmp_path, "trusted")
    transform = build_transform(load_config(None, []))
    with pytest.raises(ShardError, match="trusted-000000.tar: its sha256 differs"):
        # one image of the shard's six, read a batch of one at a time: the read stops after the first
        reference_spectra(str(folder), manifest, "trusted", 1, transform, torch.device("cpu"), batch_size=1)


def test_an_epoch_cut_inside_a_damaged_shard_is_refused(tiny_shards, tmp_path):
    from pipeline.data.loaders import train_loader

    folder, manifest = _damaged_split(tiny_shards, tmp_path, "train")
    loader = train_loader(str(folder), manifest, batch_size=4, steps=1, num_workers=0, shuffle_buffer=1, seed=0,
                          epoch=0, stream=stream_options(retries=0))
    with pytest.raises(ShardError, match="its sha256 differs"):
        list(loader)  # one batch of 4: the epoch ends inside the first shard read


class PageHandler(FaultyHandler):
    """Answers every GET with 200 and a page: what a login portal, a catch-all web app or a misconfigured proxy does."""
    body = b"<!DOCTYPE html>\n<html><body>Please sign in</body></html>"

    def do_GET(self) -> None:
        self.gets.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


@contextmanager
def serve_with(handler_class: type, folder: Path) -> Iterator[str]:
    handler = type("Handler", (handler_class,), {"faults": {}, "gets": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_page_where_the_manifest_should_be_is_named(tmp_path):
    with serve_with(PageHandler, tmp_path) as url:
        with pytest.raises(ShardError, match=rf"{url}/manifest.json returned an HTML page \(it begins '<!DOCTYPE html> "
                                             r"<html><body>Please sign in.*'\), not a manifest; check the URL"):
            load_manifest(url, FAST)
    (tmp_path / "manifest.json").write_text('{"error": "NoSuchBucket"}')
    with pytest.raises(ShardError, match="holds JSON that is not a shard manifest"):
        load_manifest(str(tmp_path), FAST)


class BodyInsteadHandler(FaultyHandler):
    """Serves the folder, except the shard ``SHARD``: 200 with an error page or JSON error body instead."""
    replacement = b""

    def do_GET(self) -> None:
        if self.path != SHARD:
            return super().do_GET()
        self.gets.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.replacement)))
        self.end_headers()
        self.wfile.write(self.replacement)


@pytest.mark.parametrize("body, what", [(b"<html><head><title>502 Bad Gateway</title></head></html>", "an HTML page"),
                                        (b'{"Code": "SlowDown", "Message": "Reduce your request rate."}', "JSON")])
def test_an_error_body_where_a_shard_should_be_is_named(tiny_shards, body, what):
    handler = type("Handler", (BodyInsteadHandler,), {"replacement": body})
    with serve_with(handler, tiny_shards) as url:
        with pytest.raises(ShardError, match=rf"{url}{SHARD} returned {what} \(it begins .*\), not a tar shard; the "
                                             "server answers with a page"):
            read_split(url)


def test_a_folder_where_a_file_should_be_is_final_at_once(tiny_shards, tmp_path, capsys):
    folder = shutil.copytree(tiny_shards, tmp_path / "shards")
    shard = sorted((folder / "train").glob("*.tar"))[1]
    shard.unlink()
    shard.mkdir()
    with pytest.raises(ShardError, match=rf"{shard} is a folder, not a file"):
        read_split(str(folder), stream=stream_options(retries=3, backoff=30.0))  # a retry would wait 30 s
    (folder / "manifest.json").rename(folder / "m.json")
    (folder / "manifest.json").mkdir()
    with pytest.raises(ShardError, match=rf"{folder / 'manifest.json'} is a folder, not a file"):
        load_manifest(str(folder), stream_options(retries=3, backoff=30.0))
    assert "retry" not in capsys.readouterr().err


@contextmanager
def hanging_server() -> Iterator[str]:
    """A server that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


@pytest.mark.parametrize("job", ["eval", "audit", "refit-head", "preview"])
def test_a_server_that_hangs_is_retried_aloud_then_named_under_the_jobs_timeout(trained, tmp_path, capsys, job):
    """Every job that reads shards takes --timeout and --retries (the manifest read included), says each retry in a
    line while it waits, and ends in one line naming the URL."""
    with hanging_server() as url:
        model = ["--checkpoint", str(trained / "mcci"), "--device", "cpu", "--shards", url]
        argv = {"eval": ["eval", *model], "audit": ["audit", *model, "--out", str(tmp_path / "a")],
                "refit-head": ["refit-head", *model, "--out", str(tmp_path / "r")],
                "preview": ["shards", "preview", url, "--out", str(tmp_path / "p.png")]}[job]
        with pytest.raises(SystemExit) as stop:
            main([*argv, "--timeout", "0.3", "--retries", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 2, err
    assert err[0].startswith(f"warning: reading {url}/manifest.json failed (") and err[0].endswith("retry 1 of 1 in 1 s")
    assert f"error: cannot read {url}/manifest.json after 2 attempts" in err[1] and "--timeout" in err[1]
    assert not list(tmp_path.iterdir())
