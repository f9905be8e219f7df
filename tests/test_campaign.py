"""benchmarks/campaign.py on tiny data: cells written, skipped when done, not started past the deadline, stopped and
resumed across windows, and a plan's mistakes refused before any work."""
import json
import time

import pytest
import yaml

import benchmarks.campaign as campaign_module
from benchmarks.campaign import Campaign, PlanError, build_shards, load_plan, main, run_logged
from conftest import TINY_TRAIN, make_image_tree

PLAN = {
    "build": {"source": "data", "trusted_count": 6, "shard_size": 9},
    "overrides": [o for o in TINY_TRAIN if not o.startswith("train.epochs")] + ["train.epochs=2", "train.ema_decay=0.9"],
    "attacks": {"patch": {"attack": "badnets", "target": 1, "poison_rate": 0.2}},
    "models": {"undefended": ["train.defense=none"], "mcci": []},
    "seeds": [0],
    "cell_seconds": 5,
    "chosen_on": "tests: nothing chosen",
}


@pytest.fixture
def plan(tmp_path):
    make_image_tree(tmp_path / "data", classes=3, per_class=16, test_per_class=4)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(PLAN))
    return path


def test_a_campaign_writes_one_json_per_cell_then_skips_them(plan, tmp_path, capsys):
    out = tmp_path / "campaign"
    main([str(plan), "--out", str(out), "--data-root", str(tmp_path), "--deadline-s", "600", "--parallel", "2"])
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    assert set(cells) == {"patch--undefended--s0", "patch--mcci--s0"}
    mcci = cells["patch--mcci--s0"]
    assert mcci["seed"] == 0 and mcci["chosen_on"] == "tests: nothing chosen" and mcci["commit"]
    assert "train.seed=0" in mcci["overrides"] and mcci["commands"][0].count(" train ") == 1
    # every epoch, raw and EMA weights, both modes; the final figures of both weight sets
    assert {(r["epoch"], r["weights"], r["mode"]) for r in mcci["epochs"]} == {
        (e, w, m) for e in (1, 2) for w in ("raw", "ema") for m in ("own", "mind_control")}
    assert set(mcci["final"]) == {"ema", "raw"} and "mind_control" in mcci["final"]["raw"]["mcci"]
    summary = json.loads((out / "campaign.json").read_text())
    rows = {(r["model"], r["weights"]) for r in summary["rows"]}
    assert rows == {(m, w) for m in ("undefended", "mcci") for w in ("raw", "ema")}
    assert all("der" in r for r in summary["rows"] if r["model"] == "mcci")
    # the curves: each epoch of each weight set, in the mode each model is judged by
    assert {(r["model"], r["epoch"], r["weights"], r["mode"]) for r in summary["curves"]} == {
        (m, e, w, "plain" if m == "undefended" else "mind_control") for m in ("undefended", "mcci") for e in (1, 2)
        for w in ("raw", "ema")}
    mc = next(r for r in mcci["epochs"] if (r["epoch"], r["weights"], r["mode"]) == (2, "raw", "mind_control"))
    curve = next(r for r in summary["curves"] if (r["model"], r["epoch"], r["weights"]) == ("mcci", 2, "raw"))
    own = next(r for r in mcci["epochs"] if (r["epoch"], r["weights"], r["mode"]) == (2, "raw", "own"))
    assert curve["asr"] == mc["asr"] and curve["ain_target_margin"] == own["ain_target_margin"]
    assert not any("ain_target_margin" in r for r in summary["curves"] if r["model"] == "undefended")
    assert (out / "results.tar.gz").stat().st_size > 0

    stamp = (out / "cells" / "patch--mcci--s0.json").stat().st_mtime_ns
    main([str(plan), "--out", str(out), "--data-root", str(tmp_path), "--deadline-s", "600"])
    assert json.loads((out / "campaign.json").read_text())["outcomes"] == {
        "patch--undefended--s0": "done before", "patch--mcci--s0": "done before"}
    assert (out / "cells" / "patch--mcci--s0.json").stat().st_mtime_ns == stamp


def test_no_cell_starts_that_the_time_left_cannot_hold(plan, tmp_path):
    out = tmp_path / "late"
    main([str(plan), "--out", str(out), "--data-root", str(tmp_path), "--deadline-s", "3"])
    outcomes = json.loads((out / "campaign.json").read_text())["outcomes"]
    assert outcomes and all(v.startswith("not started") for v in outcomes.values())
    assert not list((out / "cells").glob("*.json"))


def test_a_process_past_the_deadline_is_stopped_and_its_cell_resumes_next_time(plan, tmp_path):
    campaign = Campaign(plan=load_plan(plan), plan_dir=tmp_path, out=tmp_path / "c", data_root=tmp_path,
                        deadline=time.monotonic() + 1, parallel=1)
    start = time.monotonic()
    assert run_logged(campaign, ["sleep", "30"], tmp_path / "c" / "sleep.log") == -9
    assert time.monotonic() - start < 10 and "stopped at the deadline" in (tmp_path / "c" / "sleep.log").read_text()

    out = tmp_path / "resumed"
    main([str(plan), "--out", str(out), "--data-root", str(tmp_path), "--deadline-s", "600"])
    run = out / "runs" / "patch--mcci--s0"
    # as if a window had ended after the first epoch: the model and the second epoch are gone
    import shutil
    (out / "cells" / "patch--mcci--s0.json").unlink()
    shutil.rmtree(run / "model")
    shutil.rmtree(sorted((run / "checkpoints").glob("step-*"))[-1])
    main([str(plan), "--out", str(out), "--data-root", str(tmp_path), "--deadline-s", "600"])
    record = json.loads((out / "cells" / "patch--mcci--s0.json").read_text())
    assert record["commands"][0].endswith("train.resume=true")
    assert sorted({r["epoch"] for r in record["epochs"]}) == [1, 2]  # the log holds each epoch once


def test_without_a_deadline_nothing_is_cut_short(plan, tmp_path, monkeypatch):
    """A campaign run by hand (a CPU experiment, not a GPU window) has no deadline unless given one: a default
    of minutes once killed a 25-minute ISSBA build and its cells silently."""
    seen = {}

    def record(campaign):
        seen["left"] = campaign.left()
        return {"rows": [], "cells": [], "outcomes": {}}
    monkeypatch.setattr(campaign_module, "run_campaign", record)
    main([str(plan), "--out", str(tmp_path / "c"), "--data-root", str(tmp_path)])
    assert seen["left"] == float("inf")
    campaign = Campaign(plan=load_plan(plan), plan_dir=tmp_path, out=tmp_path / "c", data_root=tmp_path,
                        deadline=float("inf"), parallel=1)
    assert run_logged(campaign, ["sleep", "1.5"], tmp_path / "c" / "sleep.log") == 0


def test_a_build_stopped_at_the_deadline_says_so(plan, tmp_path, monkeypatch, capsys):
    campaign = Campaign(plan=load_plan(plan), plan_dir=tmp_path, out=tmp_path / "c", data_root=tmp_path,
                        deadline=time.monotonic() + 1, parallel=1)
    monkeypatch.setattr(campaign_module, "build_command", lambda campaign, attack: ["sleep", "30"])
    assert not build_shards(campaign, "patch")
    assert "shards patch: stopped at the deadline (--deadline-s)" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, "unknown keys"),
    ({"attacks": {"x": {"target": 1}}}, "needs 'attack'"),
    ({"models": {"a--b": []}}, "separates"),
    ({"models": {"m": ["not an override"]}}, "KEY=VALUE"),
])
def test_a_plans_mistakes_are_refused_naming_them(tmp_path, change, message):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({**PLAN, **change}))
    with pytest.raises(PlanError, match=message):
        load_plan(path)


def test_attacks_and_models_narrow_the_plan_and_an_unknown_name_is_refused():
    from benchmarks.campaign import select

    plan = {**PLAN, "attacks": {**PLAN["attacks"], "texture": {"attack": "blended", "target": 2}}}
    narrowed = select(plan, attacks="texture", models="mcci")
    assert list(narrowed["attacks"]) == ["texture"] and list(narrowed["models"]) == ["mcci"]
    assert list(plan["attacks"]) == ["patch", "texture"]  # the plan itself is left as it was
    with pytest.raises(PlanError, match="the plan's models are undefended, mcci"):
        select(plan, models="residual")
