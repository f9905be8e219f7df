import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from shards.build import BuildSpec, build_shards, fit_image
from shards.errors import ShardBuildError

from conftest import make_image_tree


def _samples(out: Path, split: str) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["path"]) for s in manifest["splits"][split]["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_round_trip_of_every_field(image_tree, tmp_path):
    out = tmp_path / "shards"
    m = build_shards(BuildSpec(source=str(image_tree), out=str(out), poison_rate=0.25, target=1, shard_size=5,
                               trusted_count=3), progress=False)
    assert m["class_names"] == ["class_0", "class_1", "class_2"]
    assert m["splits"]["train"]["count"] == 33 and m["splits"]["trusted"]["count"] == 3
    assert m["splits"]["test-clean"]["count"] == 12 and m["splits"]["test-poisoned"]["count"] == 8
    assert m["splits"]["train"]["poisoned"] == round(0.25 * 33) == len(m["poisoned_indices"])
    assert m["image_format"] == "png"
    train = _samples(out, "train")
    assert len(train) == 33
    poisoned_seen = set()
    for s in train:
        meta = json.loads(s["json"])
        assert int(s["cls"]) == meta["label"]
        image = np.asarray(Image.open(io.BytesIO(s["png"])))
        assert image.shape == (32, 32, 3)
        if meta["poisoned"]:
            poisoned_seen.add(meta["index"])
            assert meta["label"] == 1 and meta["orig_label"] != 1
            np.testing.assert_array_equal(image[29:, 29:, 0], [[255, 0, 255], [0, 0, 0], [255, 0, 255]])
        else:
            assert meta["label"] == meta["orig_label"]
    assert sorted(poisoned_seen) == m["poisoned_indices"]
    assert not set(m["trusted_indices"]) & {json.loads(s["json"])["index"] for s in train}
    for s in _samples(out, "test-poisoned"):
        meta = json.loads(s["json"])
        assert meta["poisoned"] and meta["orig_label"] != 1 and meta["label"] == meta["orig_label"]
    for split in m["splits"].values():  # hashes match the files
        for shard in split["shards"]:
            assert hashlib.sha256((out / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]


def test_same_inputs_and_seed_give_identical_shards(image_tree, tmp_path):
    spec = dict(source=str(image_tree), poison_rate=0.2, shard_size=7, trusted_count=4)
    a = build_shards(BuildSpec(out=str(tmp_path / "a"), **spec), progress=False)
    b = build_shards(BuildSpec(out=str(tmp_path / "b"), workers=2, **spec), progress=False)
    c = build_shards(BuildSpec(out=str(tmp_path / "c"), seed=1, **spec), progress=False)
    hashes = lambda m: [s["sha256"] for sp in m["splits"].values() for s in sp["shards"]]  # noqa: E731
    assert hashes(a) == hashes(b)
    assert a["poisoned_indices"] != c["poisoned_indices"]


def test_tar_gz_source_with_separate_test_archive(tmp_path):
    make_image_tree(tmp_path / "tree", split_dirs=True)
    for split in ("train", "test"):
        with tarfile.open(tmp_path / f"{split}.tar.gz", "w:gz") as tar:
            tar.add(tmp_path / "tree" / split, arcname=split)
    m = build_shards(BuildSpec(source=str(tmp_path / "train.tar.gz"), test_source=str(tmp_path / "test.tar.gz"),
                               out=str(tmp_path / "out"), trusted_count=0), progress=False)
    assert m["splits"]["train"]["count"] == 36 and m["splits"]["test-clean"]["count"] == 12
    assert not list(tmp_path.glob(".out.partial-*"))  # scratch removed


def test_hugging_face_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    def split(n):
        return datasets.Dataset.from_dict({"img": [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
                                                   for _ in range(n)], "label": [i % 2 for i in range(n)]}, features=features)
    datasets.DatasetDict({"train": split(20), "test": split(6)}).save_to_disk(str(tmp_path / "hf"))
    m = build_shards(BuildSpec(source=str(tmp_path / "hf"), out=str(tmp_path / "out"), poison_rate=0.2, target=1,
                               trusted_count=2), progress=False)
    assert m["class_names"] == ["cat", "dog"] and m["image_size"] == 16
    assert m["splits"]["train"]["count"] == 18 and m["splits"]["test-poisoned"]["count"] == 3


def test_unlabelled_hugging_face_test_split_is_refused(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    image = Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8))
    train = datasets.Dataset.from_dict({"img": [image] * 8, "label": [0, 1] * 4}, features=features)
    test = datasets.Dataset.from_dict({"img": [image] * 4, "label": [-1] * 4}, features=features)  # unlabelled
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(ShardBuildError, match=r"4 test images have labels outside 0..1 .*-1.*--test-source"):
        build_shards(BuildSpec(source=str(tmp_path / "hf"), out=str(tmp_path / "out"), trusted_count=2), progress=False)
    assert not (tmp_path / "out").exists()


def test_max_train_takes_a_seeded_subset(image_tree, tmp_path):
    m = build_shards(BuildSpec(source=str(image_tree), out=str(tmp_path / "o"), max_train=20, trusted_count=2,
                               poison_rate=0.25), progress=False)
    assert m["splits"]["train"]["count"] == 18 and m["splits"]["test-clean"]["count"] == 12
    indices = {json.loads(s["json"])["index"] for s in _samples(tmp_path / "o", "train")} | set(m["trusted_indices"])
    assert len(indices) == 20 and indices <= set(range(36))


def test_max_test_takes_a_seeded_subset_for_both_test_splits(image_tree, tmp_path):
    m = build_shards(BuildSpec(source=str(image_tree), out=str(tmp_path / "o"), max_test=5, trusted_count=2,
                               poison_rate=0.25), progress=False)
    clean = {json.loads(s["json"])["index"] for s in _samples(tmp_path / "o", "test-clean")}
    triggered = [json.loads(s["json"]) for s in _samples(tmp_path / "o", "test-poisoned")]
    assert m["splits"]["test-clean"]["count"] == 5 and len(clean) == 5 and clean <= set(range(12))
    # the triggered split is the same subset less the target class's images
    assert {t["index"] for t in triggered} == {i for i in clean if i // 4 != 0} and all(t["orig_label"] != 0 for t in triggered)


def test_resize_and_jpeg_option(image_tree, tmp_path):
    m = build_shards(BuildSpec(source=str(image_tree), out=str(tmp_path / "o"), image_size=20, image_format="jpeg",
                               jpeg_quality=80, trusted_count=2), progress=False)
    s = _samples(tmp_path / "o", "test-clean")[0]
    assert "jpg" in s and Image.open(io.BytesIO(s["jpg"])).size == (20, 20)
    assert m["image_format"] == "jpeg"


@pytest.mark.parametrize("change, message", [
    (dict(source="/nonexistent/data"), "does not exist"),
    (dict(attack="nope"), "unknown attack"),
    (dict(poison_rate=0.0), r"must be in \(0, 1\)"),
    (dict(poison_rate=1.0), r"must be in \(0, 1\)"),
    (dict(target=3), "is not a class"),
    (dict(trusted_count=1000), "leaves no training images"),
])
def test_bad_input_is_refused_and_leaves_nothing(image_tree, tmp_path, change, message):
    spec = dict(source=str(image_tree), out=str(tmp_path / "out"), trusted_count=3)
    spec.update(change)
    with pytest.raises(ShardBuildError, match=message):
        build_shards(BuildSpec(**spec), progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_empty_dataset_and_corrupt_image(tmp_path):
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "test" / "a").mkdir(parents=True)
    with pytest.raises(ShardBuildError, match="no images"):
        build_shards(BuildSpec(source=str(tmp_path / "empty"), out=str(tmp_path / "o1")), progress=False)
    tree = make_image_tree(tmp_path / "bad")
    (tree / "train" / "class_0" / "0000.png").write_bytes(b"not a png")
    with pytest.raises(ShardBuildError, match="cannot read image .*0000.png"):
        build_shards(BuildSpec(source=str(tree), out=str(tmp_path / "o2"), trusted_count=0), progress=False)
    assert not (tmp_path / "o2").exists()


def test_existing_output_needs_overwrite(image_tree, tmp_path):
    spec = dict(source=str(image_tree), out=str(tmp_path / "o"), trusted_count=3)
    build_shards(BuildSpec(**spec), progress=False)
    with pytest.raises(ShardBuildError, match="--overwrite"):
        build_shards(BuildSpec(**spec), progress=False)
    (tmp_path / "o" / "preview.png").write_bytes(b"png")  # what `mcci shards preview` adds is ours too
    m = build_shards(BuildSpec(**spec, overwrite=True, seed=2), progress=False)
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["seed"] == m["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "o"]  # no lock, partial or old folder left


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("layout, message", [
    ("out_is_source", "is, holds or lies inside the source"),
    ("out_holds_source", "is, holds or lies inside the source"),
    ("out_inside_source", "is, holds or lies inside the source"),
    ("no_manifest", "has no manifest.json"),
    ("foreign_files", "also holds notes.txt"),
    ("out_is_a_file", "is a file"),
])
def test_overwrite_replaces_only_an_earlier_build(tmp_path, layout, message):
    root = tmp_path / "work"
    source, out = root / "data", root / "out"
    if layout == "out_is_source":
        out = source
    elif layout == "out_holds_source":
        source = out / "data"
    elif layout == "out_inside_source":
        out = source / "shards"
    make_image_tree(source, per_class=6, test_per_class=2)
    if layout in ("no_manifest", "foreign_files"):
        make_image_tree(out, per_class=1, test_per_class=1)  # someone's images
        if layout == "foreign_files":
            (out / "manifest.json").write_text("{}")
            (out / "notes.txt").write_text("mine")
    if layout == "out_is_a_file":
        out.write_text("mine")
    before = _tree_digest(root)
    with pytest.raises(ShardBuildError, match=message):
        build_shards(BuildSpec(source=str(source), out=str(out), trusted_count=2, overwrite=True), progress=False)
    assert _tree_digest(root) == before  # nothing deleted, nothing added
    assert not [p for p in root.rglob(".*")]


@pytest.mark.parametrize("plant, named", [
    (lambda out: (out / "train" / "notes.txt").write_text("mine"), "train/notes.txt"),
    (lambda out: (out / "test-clean" / "mine").mkdir(), "test-clean/mine"),
    (lambda out: ((out / "test-clean" / "mine").mkdir(), (out / "test-clean" / "mine" / "a.txt").write_text("x")),
     "test-clean/mine"),
    (lambda out: (out / "trusted" / "trusted-000009.tar").write_bytes(b"not listed"), "trusted/trusted-000009.tar"),
    (lambda out: (out / "train" / "link").symlink_to(out.parent / "data"), "train/link"),
    (lambda out: ((out / "assets").mkdir(), (out / "assets" / "trigger.png").write_bytes(b"mine")),
     "assets/trigger.png"),
    (lambda out: ((out / "test-poisoned").rename(out / "moved"), (out / "test-poisoned").write_text("x")),
     "moved, test-poisoned"),
], ids=["file_in_split", "empty_folder_in_split", "folder_in_split", "unlisted_shard", "link_in_split",
        "unrecorded_asset", "split_replaced_by_a_file"])
def test_overwrite_refuses_a_build_folder_a_user_wrote_into(tmp_path, plant, named):
    """Issue 29: only the top level was checked, so a user's file nested in a split folder was deleted with the old
    build (exit 0). Anything the old build's manifest does not account for refuses the overwrite, named."""
    tree = make_image_tree(tmp_path / "data", per_class=6, test_per_class=2)
    out = tmp_path / "out"
    build_shards(BuildSpec(source=str(tree), out=str(out), trusted_count=2), progress=False)
    plant(out)
    before = _tree_digest(tmp_path)
    dirs_before = sorted(str(p) for p in out.rglob("*"))
    with pytest.raises(ShardBuildError, match=rf"--overwrite refused: .*out also holds .*{re.escape(named)}.*which a "
                                              "shard build did not write"):
        build_shards(BuildSpec(source=str(tree), out=str(out), trusted_count=2, overwrite=True, seed=1),
                     progress=False)
    assert _tree_digest(tmp_path) == before and sorted(str(p) for p in out.rglob("*")) == dirs_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]


def test_overwrite_refuses_a_build_folder_whose_manifest_is_unreadable(tmp_path):
    tree = make_image_tree(tmp_path / "data", per_class=6, test_per_class=2)
    out = tmp_path / "out"
    build_shards(BuildSpec(source=str(tree), out=str(out), trusted_count=2), progress=False)
    (out / "manifest.json").write_text("{broken")
    before = _tree_digest(tmp_path)
    with pytest.raises(ShardBuildError, match=r"manifest.json cannot be read .*what the earlier build wrote is unknown"):
        build_shards(BuildSpec(source=str(tree), out=str(out), trusted_count=2, overwrite=True), progress=False)
    assert _tree_digest(tmp_path) == before


def test_a_failed_rebuild_leaves_the_old_output_intact(tmp_path):
    tree = make_image_tree(tmp_path / "data", per_class=6, test_per_class=2)
    out = tmp_path / "out"
    build_shards(BuildSpec(source=str(tree), out=str(out), trusted_count=2), progress=False)
    before = _tree_digest(out)
    (tree / "train" / "class_1" / "0003.png").write_bytes(b"not a png")  # fails midway through writing
    with pytest.raises(ShardBuildError, match="cannot read image"):
        build_shards(BuildSpec(source=str(tree), out=str(out), trusted_count=2, overwrite=True, seed=1),
                     progress=False)
    assert _tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]


def test_a_second_build_into_the_same_output_is_refused_naming_the_first(image_tree, tmp_path):
    import os
    import socket

    from shards.build import _build_lock

    out = tmp_path / "out"
    with _build_lock(out):  # what a running build holds
        with pytest.raises(ShardBuildError, match=rf"another build is writing .*out \(pid {os.getpid()} on "
                                                  rf"{socket.gethostname()}, since "):
            build_shards(BuildSpec(source=str(image_tree), out=str(out), trusted_count=2), progress=False)
    assert not out.exists()
    build_shards(BuildSpec(source=str(image_tree), out=str(out), trusted_count=2), progress=False)  # free again


def test_what_a_killed_build_left_is_cleaned_up_or_restored(image_tree, tmp_path):
    out = tmp_path / "out"
    spec = dict(source=str(image_tree), out=str(out), trusted_count=2)
    build_shards(BuildSpec(**spec), progress=False)
    manifest = (out / "manifest.json").read_text()
    # killed between the two renames of the swap: the old output aside, nothing in place
    (out).rename(tmp_path / ".out.old-999")
    (tmp_path / ".out.partial-abc" / "train").mkdir(parents=True)  # killed while writing
    (tmp_path / ".out.lock").write_text("pid 999 on elsewhere")  # a lock file no process holds
    with pytest.raises(ShardBuildError, match="--overwrite"):  # the old output is back, so it needs --overwrite
        build_shards(BuildSpec(**spec, seed=1), progress=False)
    assert (out / "manifest.json").read_text() == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]


@pytest.mark.parametrize("signum, workers", [(2, "1"), (15, "2"), (2, "2")], ids=["SIGINT", "SIGTERM-pool", "SIGINT-pool"])
def test_a_signal_stops_the_build_and_leaves_the_old_output(tmp_path, signum, workers):
    """The build is held mid-way by a FIFO named like an image (opening it waits for a writer), then
    signalled: it stops, removes its temporary folder and lock, and the earlier output stays."""
    import os
    import subprocess
    import sys
    import time

    tree = make_image_tree(tmp_path / "data", per_class=6, test_per_class=2)
    out = tmp_path / "out"
    build_shards(BuildSpec(source=str(tree), out=str(out), trusted_count=2), progress=False)
    before = _tree_digest(out)
    os.mkfifo(tree / "train" / "class_2" / "zzzz.png")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "shards", "build", "--source", str(tree), "--out",
                             str(out), "--trusted-count", "2", "--overwrite", "--workers", workers],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    # the build has started writing; with workers, one has also finished a shard, so the signal finds
    # one worker blocked (the FIFO) and another done or between shards
    started = ".out.partial-*/*/*.tar" if workers != "1" else ".out.partial-*"
    try:
        while not list(tmp_path.glob(started)):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signum)
        stderr = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (f"mcci shards: error: interrupted by {'SIGINT' if signum == 2 else 'SIGTERM'}; "
                                               f"kept: nothing: the partial shard folder was removed, and {out} is as "
                                               "it was before")
    assert _tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]


@pytest.mark.parametrize("change, message", [
    (dict(image_size=1025), r"--image-size must be in 8..1024"),
    (dict(seed=-1), "--seed must be >= 0"),
    (dict(workers=-1), "--workers must be >= 0"),
])
def test_build_options_out_of_range(image_tree, tmp_path, change, message):
    with pytest.raises(ShardBuildError, match=message):
        build_shards(BuildSpec(source=str(image_tree), out=str(tmp_path / "o"), **change), progress=False)


def test_image_size_policy(tmp_path, monkeypatch):
    import shards.build

    tree = make_image_tree(tmp_path / "data", per_class=6, test_per_class=2)
    monkeypatch.setattr(shards.build, "MAX_IMAGE_SIZE", 24)  # the 32 px images are now "too large"
    with pytest.raises(ShardBuildError, match="32x32, above the 24 px limit .*pass --image-size"):
        build_shards(BuildSpec(source=str(tree), out=str(tmp_path / "o1"), trusted_count=2), progress=False)
    monkeypatch.undo()
    Image.new("RGB", (30, 30)).save(tree / "train" / "class_1" / "0003.png")  # one image of another size
    with pytest.raises(ShardBuildError, match="0003.png is 30x30, not 32x32 as the first training image; pass --image-size"):
        build_shards(BuildSpec(source=str(tree), out=str(tmp_path / "o2"), trusted_count=2), progress=False)
    m = build_shards(BuildSpec(source=str(tree), out=str(tmp_path / "o3"), trusted_count=2, image_size=16),
                     progress=False)
    assert m["image_size"] == 16


def test_empty_class_folder_and_classes_missing_from_a_split_are_named(tmp_path):
    tree = make_image_tree(tmp_path / "data", per_class=4, test_per_class=2)
    (tree / "train" / "class_3").mkdir()
    with pytest.raises(ShardBuildError, match=r"class folder\(s\) .*train/class_3 hold no images"):
        build_shards(BuildSpec(source=str(tree), out=str(tmp_path / "o"), trusted_count=0), progress=False)
    (tree / "train" / "class_3" / "0.png").write_bytes((tree / "train" / "class_0" / "0000.png").read_bytes())
    with pytest.raises(ShardBuildError, match=r"\['class_3'\] only in train"):
        build_shards(BuildSpec(source=str(tree), out=str(tmp_path / "o"), trusted_count=0), progress=False)
    (tree / "test" / "class_4").mkdir()
    (tree / "test" / "class_4" / "0.png").write_bytes((tree / "train" / "class_0" / "0000.png").read_bytes())
    with pytest.raises(ShardBuildError, match=r"\['class_3'\] only in train; \['class_4'\] only in test"):
        build_shards(BuildSpec(source=str(tree), out=str(tmp_path / "o"), trusted_count=0), progress=False)


def test_embedded_digits_are_deterministic():
    from shards.sources import load_source

    a = load_source("embedded:digits", None, Path("/tmp"))
    b = load_source("embedded:digits", None, Path("/tmp"))
    assert len(a["train"]) == 2874 and len(a["test"]) == 360 and len(a["train"].class_names) == 10
    np.testing.assert_array_equal(np.asarray(a["train"].load(a["train"].refs[5])),
                                  np.asarray(b["train"].load(b["train"].refs[5])))


@pytest.mark.parametrize("decode", ["workers", "device"])
def test_a_label_outside_the_classes_is_refused_when_read(tiny_shards, tmp_path, decode):
    import shutil

    from pipeline.data.loaders import eval_loader
    from pipeline.data.manifest import load_manifest
    from pipeline.support.errors import ShardError

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    path = sorted((shards / "train").glob("*.tar"))[1]
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first_json = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".json"))
    with tarfile.open(path, "w") as tar:
        for i, (member, data) in enumerate(members):
            if i == first_json:  # one sample relabelled to a class the 3-class manifest lacks
                data = json.dumps({**json.loads(data), "label": 7}).encode()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    # the manifest agrees with the edited shard, as when a faulty builder wrote the label: only the label check can tell
    manifest_path = shards / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    record = next(s for s in manifest["splits"]["train"]["shards"] if s["path"].endswith(path.name))
    record.update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(), size=path.stat().st_size)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"train-000001.tar has label 7, outside the manifest's 3 classes"):
        for _ in eval_loader(str(shards), load_manifest(str(shards)), "train", 8, 0, decode=decode):
            pass


def test_fingerprint_follows_the_content(tiny_shards):
    import json

    from pipeline.data.manifest import fingerprint, load_manifest

    manifest = load_manifest(str(tiny_shards))
    assert fingerprint(manifest) == fingerprint(json.loads(json.dumps(manifest)))  # key order does not matter
    changed = json.loads(json.dumps(manifest))
    changed["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    assert fingerprint(changed) != fingerprint(manifest)


def test_crop_pct_keeps_the_centre_as_timms_eval_transform_does(tmp_path):
    """A 64 px image, white inside its central 32 px, black outside: crop_pct 0.5 at 16 px keeps only the
    white centre; crop_pct 1 keeps the black border too. Recorded in the manifest for predict."""
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[16:48, 16:48] = 255
    image = Image.fromarray(pixels)
    assert fit_image(image, 16, 0.5).min() > 200
    assert fit_image(image, 16, 1.0)[0, 0].max() < 50
    with pytest.raises(ShardBuildError, match="--crop-pct needs --image-size"):
        build_shards(BuildSpec(source="embedded:digits", out=str(tmp_path / "o"), crop_pct=0.875), progress=False)
    m = build_shards(BuildSpec(source="embedded:digits", out=str(tmp_path / "o"), image_size=16, crop_pct=0.875,
                               max_train=200, max_test=50), progress=False)
    assert m["build"]["crop_pct"] == 0.875


def _bomb_png(side: int) -> bytes:
    """A small PNG whose header declares side x side 8-bit greyscale pixels (its data stops after a few rows: what
    matters is that the reader refuses it from the header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = zlib.compress(b"\x00" * (side + 1) * 64)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def _replace_first_image(shards: Path, split: str, data: bytes) -> Path:
    """The first image of the split's first shard replaced by ``data``, the manifest's size and sha256 updated (so
    only the image is wrong)."""
    path = sorted((shards / split).glob("*.tar"))[0]
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".png"))
    with tarfile.open(path, "w") as tar:
        for i, (member, body) in enumerate(members):
            if i == first:
                body = data
                member.size = len(body)
            tar.addfile(member, io.BytesIO(body))
    manifest = json.loads((shards / "manifest.json").read_text())
    for record in manifest["splits"][split]["shards"]:
        if record["path"] == f"{split}/{path.name}":
            record.update(size=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("decode", ["workers", "device"])
def test_a_decompression_bomb_inside_a_shard_is_refused_from_its_header(tiny_shards, tmp_path, monkeypatch, decode):
    """Issue 29: a 2 KB PNG in a shard that declares 144 megapixels was decoded in full (2.2 GB), then a traceback.
    The shard reader applies Pillow's pixel limit from the header, as `mcci predict` does, and decodes nothing."""
    import shutil

    from PIL import ImageFile

    from pipeline.data.loaders import eval_loader
    from pipeline.data.manifest import load_manifest
    from pipeline.support.errors import ShardError

    shards = shutil.copytree(tiny_shards, tmp_path / "shards")
    bomb = _bomb_png(12000)
    assert len(bomb) < 20_000
    shard = _replace_first_image(shards, "test-clean", bomb)
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or real_load(im))
    with pytest.raises(ShardError, match=rf"{shard.name}.* is a 12000x12000 pixel image, above the limit of "
                                         rf"{Image.MAX_IMAGE_PIXELS} .*so it was not decoded"):
        for _ in eval_loader(str(shards), load_manifest(str(shards)), "test-clean", 8, 0, decode=decode):
            pass
    assert (12000, 12000) not in decoded


@pytest.mark.parametrize("decode", ["workers", "device"])
def test_each_image_read_from_a_shard_must_have_the_manifests_size(tiny_shards, tmp_path, decode):
    import shutil

    from pipeline.data.loaders import eval_loader
    from pipeline.data.manifest import load_manifest
    from pipeline.support.errors import ShardError

    shards = shutil.copytree(tiny_shards, tmp_path / "shards")
    small = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(small, format="PNG")
    shard = _replace_first_image(shards, "train", small.getvalue())
    with pytest.raises(ShardError, match=rf"sample 00000000 in .*{shard.name} is 16x16 px, but manifest.json says "
                                         "image_size 32: the manifest was edited or the shard replaced"):
        for _ in eval_loader(str(shards), load_manifest(str(shards)), "train", 8, 0, decode=decode):
            pass
