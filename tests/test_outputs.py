"""Output paths (issue 29): no command writes over one of its inputs, none replaces an existing file of another kind
than it writes, and every output path is checked before any work (a name too long once a temporary or lock name is
made from it, a place the system refuses), the message naming the path as the user gave it."""
import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_main
from pipeline.cli import main


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 90, 200 - 50 * i)).save(folder / f"{i:03d}.png")
    return folder


def test_predict_never_writes_over_one_of_its_images(trained, photos, capsys):
    """Issue 29: `mcci predict DIR --out DIR/000.png` replaced an input image with JSONL and exited 0."""
    before = digest(photos.parent)
    code, line = run_main(["predict", "--checkpoint", str(trained / "mcci"), str(photos), "--out",
                           str(photos / "000.png"), "--device", "cpu"], capsys)
    assert code == 2 and f"--out {photos / '000.png'} is one of this job's inputs" in line
    assert digest(photos.parent) == before
    # the same file named through another path (a file given directly, with ..) is the same input
    code, line = run_main(["predict", "--checkpoint", str(trained / "mcci"), str(photos / "001.png"), "--out",
                           str(photos / "sub" / ".." / "001.png"), "--device", "cpu"], capsys)
    assert code == 2 and "is one of this job's inputs" in line and digest(photos.parent) == before


@pytest.mark.parametrize("argv, name, message", [
    (["eval", "--checkpoint", "{m}", "--shards", "{s}", "--num-workers", "0", "--device", "cpu", "--out"], "picture.png",
     "exists and is not the metrics JSON of `mcci eval`, so it is not replaced"),
    (["predict", "--checkpoint", "{m}", "{p}", "--device", "cpu", "--out"], "notes.txt",
     "exists and is not the predictions JSONL of `mcci predict`"),
    (["shards", "preview", "{s}", "--out"], "notes.txt", "exists and is not a PNG"),
    (["audit", "--checkpoint", "{m}", "--shards", "{s}", "--device", "cpu", "--num-workers", "0", "--out"],
     "folder_with_samples", "samples.jsonl exists and is not the audit's samples JSONL"),
])
def test_no_command_replaces_a_file_of_another_kind(trained, tiny_shards, photos, tmp_path, capsys, argv, name,
                                                    message):
    """Issue 29: `mcci eval --out picture.png` replaced a PNG with JSON."""
    Image.new("RGB", (8, 8)).save(tmp_path / "picture.png")
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "folder_with_samples").mkdir()
    (tmp_path / "folder_with_samples" / "samples.jsonl").write_text("mine\n")
    before = digest(tmp_path)
    args = [a.format(m=trained / "mcci", s=tiny_shards, p=photos) for a in argv] + [str(tmp_path / name)]
    code, line = run_main(args, capsys)
    assert code == 2 and message in line and str(tmp_path / name) in line, line
    assert digest(tmp_path) == before


def test_eval_replaces_its_own_metrics_but_never_the_baselines(trained, tiny_shards, tmp_path, capsys):
    common = ["--shards", str(tiny_shards), "--num-workers", "0", "--device", "cpu"]
    main(["eval", "--checkpoint", str(trained / "baseline"), *common, "--out", str(tmp_path / "b.json")])
    main(["eval", "--checkpoint", str(trained / "baseline"), *common, "--out", str(tmp_path / "b.json")])  # its own
    before = (tmp_path / "b.json").read_bytes()
    code, line = run_main(["eval", "--checkpoint", str(trained / "mcci"), *common, "--baseline-metrics",
                           str(tmp_path / "b.json"), "--out", str(tmp_path / "b.json")], capsys)
    assert code == 2 and "is one of this job's inputs" in line and (tmp_path / "b.json").read_bytes() == before


def test_predict_refuses_an_image_suffix_for_its_jsonl(trained, photos, tmp_path, capsys):
    code, line = run_main(["predict", "--checkpoint", str(trained / "mcci"), str(photos), "--out",
                           str(tmp_path / "new.png"), "--device", "cpu"], capsys)
    assert code == 2 and "has an image's suffix; predictions are JSON lines" in line
    assert not (tmp_path / "new.png").exists()


LONG = "n" * 250  # fits a name (255 bytes), not with ".tmp.png" or ".NAME.partial-XXXXXXXX" made from it


@pytest.mark.parametrize("argv, option", [
    (["shards", "build", "--source", "{d}", "--trusted-count", "2", "--out", "{t}/" + LONG], "--out"),
    (["eval", "--checkpoint", "{m}", "--shards", "{s}", "--device", "cpu", "--out", "{t}/" + LONG], "--out"),
    (["predict", "--checkpoint", "{m}", "{p}", "--device", "cpu", "--out", "{t}/" + LONG], "--out"),
    (["shards", "preview", "{s}", "--out", "{t}/" + LONG], "--out"),
    (["train", "data.shards={s}", "train.out={t}/" + "n" * 256], "train.out="),
    (["quickstart", "--out", "{t}/" + "n" * 256], "--out"),
], ids=["build", "eval", "predict", "preview", "train", "quickstart"])
def test_a_name_too_long_once_a_suffix_is_added_is_refused_before_any_work(trained, tiny_shards, photos, image_tree,
                                                                           tmp_path, capsys, argv, option):
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [a.format(d=image_tree, m=trained / "mcci", s=tiny_shards, p=photos, t=tmp_path) for a in argv]
    code, line = run_main(args, capsys)
    given = args[-1].split("=", 1)[-1]
    assert code == 2 and f"{option}{'' if option.endswith('=') else ' '}{given} cannot be written" in line, line
    assert "above the file system's" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing made, nothing left


@pytest.mark.parametrize("place", ["/proc/mcci-out", "/sys/mcci-out", "{t}/afile/inside"])
def test_a_place_the_system_refuses_is_named_before_any_work(trained, tiny_shards, image_tree, tmp_path, capsys,
                                                            place):
    """A special file system (/proc, /sys) or a path through a file: refused with the path as given, for the shard
    build, training and eval alike (a read-only mount fails the same probe)."""
    (tmp_path / "afile").write_text("x")
    out = place.format(t=tmp_path)
    for argv, shown in ((["shards", "build", "--source", str(image_tree), "--trusted-count", "2", "--out", out],
                         f"--out {out} cannot be written"),
                        (["train", f"data.shards={tiny_shards}", f"train.out={out}"], f"train.out={out} cannot be written"),
                        (["eval", "--checkpoint", str(trained / "mcci"), "--shards", str(tiny_shards), "--device",
                          "cpu", "--out", out + ".json"], f"--out {out}.json cannot be written")):
        code, line = run_main(argv, capsys)
        assert code == 2 and shown in line, line
    assert not [p for p in tmp_path.rglob(".mcci-probe-*")]


def test_a_read_only_folder_is_refused_before_any_work(tiny_shards, image_tree, tmp_path, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; /proc and /sys stand for them in the test above")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, line = run_main(["train", f"data.shards={tiny_shards}", f"train.out={locked / 'run'}"], capsys)
        assert code == 2 and f"train.out={locked / 'run'} cannot be written" in line
    finally:
        locked.chmod(0o700)
