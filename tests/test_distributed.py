"""Multi-process and fault tolerance on the CPU: 2 gloo ranks through torchrun, and SIGKILL + resume.

(`accelerate launch --cpu --num_processes 2` starts one process without MPI on these machines;
torchrun with Accelerator(cpu=True) gives the real 2-rank group that a GPU cluster would.)
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_TRAIN


def torchrun(n: int, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise AssertionError(result.stdout[-2000:] + result.stderr[-4000:])
    return result


def _validated_like_eval(run: Path, shards: Path, evaluated: dict) -> None:
    """The last validation of ``run`` (two ranks) is ``mcci eval`` of its saved model (``evaluated``, one process):
    the same CA / ASR / RA, and the same margins of each half of the head (``evaluation.PART_FIGURES``), which move
    with any difference in the BatchNorm statistics the two ranks score with."""
    from pipeline.components.evaluation import PART_FIGURES, evaluate
    from pipeline.components.models import build_transform, load_trained
    from pipeline.data.manifest import load_manifest

    records = [json.loads(line) for line in (run / "val_log.jsonl").read_text().splitlines()]
    last = {r["mode"]: r for r in records if r["epoch"] == max(r["epoch"] for r in records) and r["weights"] == "raw"}
    figures = ("clean_acc", "asr", "ra", "clean_acc_by_class")  # per-class counts summed over the ranks too
    assert {mode: {k: last[mode][k] for k in figures} for mode in last} == evaluated["mcci"]
    model, cfg, _ = load_trained(run, torch.device("cpu"))
    parts: dict[str, float] = {}
    evaluate(model, str(shards), load_manifest(str(shards)), build_transform(cfg), torch.device("cpu"), 16, 0,
             parts=parts)
    assert {k: last["own"][k] for k in PART_FIGURES} == pytest.approx(parts, abs=2e-4)


def test_two_ranks_uneven_shards_train_validate_and_eval_exactly(tiny_shards, tmp_path):
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) % 2 == 1  # 5 shards over 2 ranks
    out = tmp_path / "run"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the venv's torchrun
    trained = subprocess.run(["bash", str(root / "launch" / "local.sh"), str(root / "configs" / "cifar10_resnet18.yaml"),
                              f"data.shards={tiny_shards}", f"train.out={out}", *TINY_TRAIN, "data.augment.translate=0",
                              "data.batch_size=4", "train.epochs=2", "train.mixed_precision=no"],
                             capture_output=True, text=True, timeout=240, env=env)
    assert trained.returncode == 0, trained.stderr[-4000:]
    state = json.loads(sorted((out / "checkpoints").glob("step-*/trainer.json"))[-1].read_text())
    assert state["step"] == 2 * (42 // (4 * 2))  # both ranks took the same steps, no hang
    one = tmp_path / "one.json"
    two = tmp_path / "two.json"
    subprocess.run([sys.executable, "-m", "pipeline.cli", "eval", "--checkpoint", str(out), "--shards", str(tiny_shards),
                    "--out", str(one), "--num-workers", "0", "--device", "cpu", "--batch-size", "5"], check=True,
                   capture_output=True)
    torchrun(2, "-m", "pipeline.cli", "eval", "--checkpoint", str(out), "--shards", str(tiny_shards), "--out", str(two),
             "--num-workers", "0", "--device", "cpu", "--batch-size", "5")
    assert json.loads(one.read_text())["mcci"] == json.loads(two.read_text())["mcci"]
    _validated_like_eval(out, tiny_shards, json.loads(one.read_text()))  # validation with rank 0's buffers

    audit = ["-m", "pipeline.cli", "audit", "--checkpoint", str(out), "--shards", str(tiny_shards), "--num-workers", "0",
             "--device", "cpu", "--batch-size", "5", "--out"]
    subprocess.run([sys.executable, *audit, str(tmp_path / "audit1")], check=True, capture_output=True)
    torchrun(2, *audit, str(tmp_path / "audit2"))
    alone, shared = ({r["index"]: r for r in map(json.loads, (tmp_path / d / "samples.jsonl").read_text().splitlines())}
                     for d in ("audit1", "audit2"))
    assert alone.keys() == shared.keys() and len(alone) == 42  # every training sample once across ranks
    for index, r in alone.items():
        assert r["flagged"] == shared[index]["flagged"]
        assert r["score"] == pytest.approx(shared[index]["score"], abs=1e-4)


# Each rank runs `mcci refit-head`; rank 0's fit starts only once every other rank has left the command. A rank
# held until rank 0 is done (a barrier, under the process group's collective timeout, which a long fit can pass)
# never leaves, and rank 0 gives up.
_REFIT_ONCE_THE_OTHERS_HAVE_LEFT = """
import sys, time
from pathlib import Path
from accelerate import PartialState
import pipeline.jobs.refit_head as job
from pipeline.cli import main

marks, args = Path(sys.argv[1]), sys.argv[2:]
state = PartialState(cpu=True)
fit = job.fit_head

def fit_when_alone(*a, **k):
    deadline = time.monotonic() + 60
    while not all((marks / f"left-{rank}").exists() for rank in range(1, state.num_processes)):
        if time.monotonic() > deadline:
            raise SystemExit("another rank is still inside refit-head, waiting for rank 0's fit")
        time.sleep(0.05)
    return fit(*a, **k)

job.fit_head = fit_when_alone
main(args)
(marks / f"left-{state.process_index}").touch()
"""


def test_refit_head_under_torchrun_holds_no_rank_while_rank_0_fits(trained, tiny_shards, tmp_path):
    out = tmp_path / "refit"
    r = torchrun(2, "--no-python", sys.executable, "-c", _REFIT_ONCE_THE_OTHERS_HAVE_LEFT, str(tmp_path),
                 "refit-head", "--checkpoint", str(trained / "mcci"), "--shards", str(tiny_shards), "--out", str(out),
                 "--num-workers", "0", "--device", "cpu")
    assert r.stdout.count("refitted the fusion head") == 1  # rank 0 alone did the work and said so
    assert json.loads((out / "refit.json").read_text())["samples"] == 6 and (out / "model" / "model.safetensors").is_file()


def _train_cmd(shards: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.train", f"data.shards={shards}", f"train.out={out}", *TINY_TRAIN,
            "model.sfrn=mcci_convnet_small", "train.epochs=6", "train.checkpoint_every=2", *extra]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_shards, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_train_cmd(tiny_shards, tmp_path / "straight"), check=True, capture_output=True, env=env, timeout=300)

    victim = subprocess.Popen(_train_cmd(tiny_shards, tmp_path / "killed"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while time.time() < deadline:
        root = tmp_path / "killed" / "checkpoints"
        done = [int(p.name[5:]) for p in root.glob("step-*")  # step-N.tmp: a checkpoint still being written
                if (p / "trainer.json").exists() and not p.name.endswith(".tmp")] if root.exists() else []
        if done and max(done) >= 6:
            break
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "killed" / "model").exists(), "the run finished before it could be killed"

    resumed = subprocess.run(_train_cmd(tiny_shards, tmp_path / "killed", "train.resume=true"), capture_output=True,
                             text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stdout
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    for key in a:  # deterministic on the CPU: the resumed run is the uninterrupted run
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert len(list((tmp_path / "killed" / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints
    logs = [[(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / run / "train_log.jsonl").read_text().splitlines())]
            for run in ("straight", "killed")]
    assert logs[0] == logs[1]  # the steps run again after the resume are logged once


def test_two_rank_resume_from_a_mid_run_checkpoint_matches_the_uninterrupted_run(tiny_shards, tmp_path):
    """DDP over gloo: both ranks restore model, optimizer, RNG and data position from one checkpoint."""
    common = [f"data.shards={tiny_shards}", *TINY_TRAIN, "data.batch_size=4", "train.epochs=2",
              "train.checkpoint_every=3", "train.keep_checkpoints=10"]
    torchrun(2, "-m", "pipeline.train", f"train.out={tmp_path / 'straight'}", *common)
    checkpoints = tmp_path / "straight" / "checkpoints"
    crashed = tmp_path / "crashed" / "checkpoints"
    crashed.mkdir(parents=True)
    shutil.copytree(checkpoints / "step-00000003", crashed / "step-00000003")  # mid epoch 0 (5 steps an epoch)
    r = torchrun(2, "-m", "pipeline.train", f"train.out={tmp_path / 'crashed'}", *common, "train.resume=true")
    assert "resumed from step 3" in r.stdout
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "model" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_two_ranks_isolate_their_shares_and_flag_what_one_process_flags(tiny_shards, tmp_path):
    """train.mcci_variant=isolate under DDP: each rank scores its shards and the flagged sets are gathered, so the
    set every rank unlearns is the one a single process finds with the same weights (the checkpoint written
    right after the switch holds them, and the reference the switch set)."""
    from pipeline.components.isolation import flagged_indices
    from pipeline.components.models import build_model, build_transform
    from pipeline.components.scoring import score_samples
    from pipeline.data.manifest import load_manifest
    from pipeline.support.config import load_config

    run = [f"data.shards={tiny_shards}", *TINY_TRAIN, "data.batch_size=4", "train.mcci_variant=isolate",
           "train.epochs=5", "train.isolate_epoch=4", "train.eval_every=0", "train.keep_checkpoints=10"]
    torchrun(2, "-m", "pipeline.train", f"train.out={tmp_path / 'run'}", *run)
    record = json.loads((tmp_path / "run" / "isolation.json").read_text())
    assert record["samples"] == 42 and record["step"] == 20  # every training sample once, over 5 shards on 2 ranks
    switch = tmp_path / "run" / "checkpoints" / "step-00000020"
    assert json.loads((switch / "trainer.json").read_text())["variant_state"] == record
    cfg = load_config(None, run)
    model = build_model(cfg, 3, 32, load_pretrained=False)
    model.load_state_dict(load_file(str(switch / "model.safetensors")))
    rows = score_samples(model.eval(), str(tiny_shards), load_manifest(str(tiny_shards)), "train", build_transform(cfg),
                         torch.device("cpu"), 16, 0)
    assert flagged_indices(rows) == record["flagged_indices"]


def test_each_rank_restores_its_own_augmentation_stream():
    from types import SimpleNamespace

    from pipeline.components.models import build_transform
    from pipeline.jobs.train import _restore_augment_rng
    from pipeline.support.config import load_config

    cfg = load_config(None, [])
    states = [build_transform(cfg, seed=rank).generator.get_state().tolist() for rank in range(2)]
    said = []
    for rank in range(2):
        transform = build_transform(cfg, seed=99)
        _restore_augment_rng(transform, states, SimpleNamespace(num_processes=2, process_index=rank, print=said.append))
        assert transform.generator.get_state().tolist() == states[rank]
    transform = build_transform(cfg, seed=99)
    fresh = transform.generator.get_state().tolist()
    _restore_augment_rng(transform, states, SimpleNamespace(num_processes=4, process_index=3, print=said.append))
    assert transform.generator.get_state().tolist() == fresh and "2 processes resumed on 4" in said[-1]
    _restore_augment_rng(transform, states[1], SimpleNamespace(num_processes=1, process_index=0, print=said.append))
    assert transform.generator.get_state().tolist() == states[1]  # a one-rank checkpoint of the older layout


def test_resume_without_checkpoints_starts_fresh(tiny_shards, tmp_path):
    r = subprocess.run(_train_cmd(tiny_shards, tmp_path / "r", "train.resume=true", "train.epochs=1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "resumed" not in r.stdout


def _deepspeed_run(shards: Path, out: Path, stage: str, *extra: str) -> subprocess.CompletedProcess:
    # deepspeed is in the test extra (CI installs it): a missing one is a broken environment, not a reason to skip
    import deepspeed  # noqa: F401
    import transformers  # noqa: F401  (Accelerate's DeepSpeed path imports it)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_DEEPSPEED": "true",
           "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(root / "configs" / "deepspeed" / f"{stage}.json")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "pipeline.train",
           f"data.shards={shards}", f"train.out={out}", *TINY_TRAIN, "data.batch_size=4",
           "train.cpu=false", *extra]  # Accelerator(cpu=True) would drop the DeepSpeed plugin
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_through_accelerate_on_cpu_and_resume(tiny_shards, tmp_path, stage):
    """configs/deepspeed/{zero2,zero3}.json through Accelerate on the CPU (gloo), one rank: on the CPU Accelerate's
    DeepSpeed path reports every torchrun rank as rank 0 of 1, so several ranks need GPUs (see docs/SCALING.md).
    A run resumed from a mid-run checkpoint (as after a crash: checkpoints are complete or absent) ends with the
    uninterrupted run's weights; under ZeRO-3 the saved model is gathered from the shards."""
    straight = _deepspeed_run(tiny_shards, tmp_path / "ds", stage, "train.epochs=2", "train.checkpoint_every=4",
                              "train.keep_checkpoints=10")
    assert ("validation during training is off" in straight.stdout) == (stage == "zero3")
    checkpoints = tmp_path / "ds" / "checkpoints"
    assert (checkpoints / "step-00000010" / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    assert (tmp_path / "ds" / "model" / "model.safetensors").is_file()
    crashed = tmp_path / "crashed" / "checkpoints"
    crashed.mkdir(parents=True)
    shutil.copytree(checkpoints / "step-00000008", crashed / "step-00000008")  # mid-epoch 1 of 2
    r = _deepspeed_run(tiny_shards, tmp_path / "crashed", stage, "train.epochs=2", "train.checkpoint_every=4",
                       "train.resume=true")
    assert "resumed from step 8" in r.stdout
    a = load_file(str(tmp_path / "ds" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("ain.") for k in a)  # the whole MCCI model, gathered
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
