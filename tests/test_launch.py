"""The files users launch with: Accelerate/DeepSpeed configs and the SLURM and multi-node scripts.

The scripts run for real with stand-ins for `scontrol`, `srun`, `accelerate` and `torchrun` that
record the command each node would run, so the argument plumbing is checked without a cluster.
(launch/local.sh runs a real 2-rank training in test_distributed.py.)
"""
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import timm
from accelerate.commands.config.config_args import load_config_from_file

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
OVERRIDES = ["data.mean=[0.5, 0.5, 0.5]", "train.out=runs/my run"]  # a space in each


def test_every_accelerate_config_is_accepted_by_accelerate():
    assert {p.stem for p in ACCELERATE_CONFIGS} >= {"single_gpu", "ddp_8gpu", "ddp_multinode", "fsdp_full_shard",
                                                     "deepspeed_zero2", "deepspeed_zero3", "cpu_2proc"}
    for path in ACCELERATE_CONFIGS:
        config = load_config_from_file(str(path))  # raises on keys this Accelerate does not know
        assert path.read_text().startswith("#"), f"{path.name}: first line should say when to pick it"
        if config.deepspeed_config:
            ds_file = ROOT / config.deepspeed_config["deepspeed_config_file"]
            stage = json.loads(ds_file.read_text())["zero_optimization"]["stage"]
            assert f"zero{stage}" in path.stem, (path.name, stage)


def test_fsdp_wraps_the_block_class_of_timm_vits():
    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / "fsdp_full_shard.yaml"))
    wrapped = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    assert wrapped in {type(m).__name__ for m in model.modules()}


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture()
def stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    calls.mkdir()
    _stub(bin_dir, "scontrol", 'printf "gpu-node-a\\ngpu-node-b\\n"\n')
    # srun --kill-on-bad-exit=1 bash -c CMD: run CMD once per node, as SLURM would.
    _stub(bin_dir, "srun", 'shift\nfor node in 0 1; do SLURM_NODEID=$node "$@" || exit $?; done\n')
    record = f'printf "%s\\n" "$@" > {calls}/$(basename $0)-${{SLURM_NODEID:-$NODE_RANK}}\n'
    _stub(bin_dir, "accelerate", record)
    _stub(bin_dir, "torchrun", record)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return env, calls


def _args(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_slurm_script_launches_one_accelerate_per_node(stubs, tmp_path):
    env, calls = stubs
    env.update(SLURM_JOB_NODELIST="gpu-node-[a-b]", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4")
    subprocess.run(["bash", str(ROOT / "launch" / "slurm.sh"), "configs/imagenet_vit_b16.yaml", *OVERRIDES],
                   check=True, env=env, cwd=tmp_path, capture_output=True, text=True)
    for node in (0, 1):
        args = _args(calls / f"accelerate-{node}")
        assert _after(args, "--machine_rank") == str(node)
        assert _after(args, "--num_machines") == "2"
        assert _after(args, "--num_processes") == "8"
        assert _after(args, "--main_process_ip") == "gpu-node-a"
        assert _after(args, "--config_file") == "configs/accelerate/ddp_multinode.yaml"
        assert args[args.index("-m") + 1:] == ["pipeline.train", "--config", "configs/imagenet_vit_b16.yaml",
                                               "train.resume=true", *OVERRIDES]


def test_multinode_script_passes_rendezvous_and_overrides(stubs, tmp_path):
    env, calls = stubs
    env.update(NNODES="2", NODE_RANK="1", MAIN_ADDR="10.0.0.1", GPUS_PER_NODE="4", MAX_RESTARTS="3")
    subprocess.run(["bash", str(ROOT / "launch" / "multinode.sh"), "configs/imagenet_vit_b16.yaml", *OVERRIDES],
                   check=True, env=env, cwd=tmp_path)
    args = _args(calls / "torchrun-1")
    assert (_after(args, "--nnodes"), _after(args, "--node_rank"), _after(args, "--nproc_per_node")) == ("2", "1", "4")
    assert _after(args, "--rdzv_endpoint") == "10.0.0.1:29500"
    assert _after(args, "--max_restarts") == "3"
    assert args[-len(OVERRIDES) - 1:] == ["train.resume=true", *OVERRIDES]


def test_multinode_script_names_the_missing_variable(stubs, tmp_path):
    env, calls = stubs
    env.update(NNODES="2", MAIN_ADDR="10.0.0.1")
    env.pop("NODE_RANK", None)
    r = subprocess.run(["bash", str(ROOT / "launch" / "multinode.sh"), "c.yaml"], env=env, cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "NODE_RANK" in r.stderr
    assert not list(calls.iterdir())


def test_a_gpu_window_runs_its_plan_returns_two_files_and_the_next_window_skips_what_it_finished(tmp_path):
    """launch/gpu_window.sh at tiny scale on the CPU, as a device call runs it: the campaign's summary and archive
    land in $OUT; a second window on a fresh machine, given the first's cells, trains nothing again."""
    import sys
    import tarfile

    import yaml

    from conftest import make_image_tree
    from test_campaign import PLAN

    window = tmp_path / "window"
    make_image_tree(window / "data" / "data", classes=3, per_class=16, test_per_class=4)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({**PLAN, "models": {"undefended": ["train.defense=none"]}}))

    def window_run(runs: Path, out: Path) -> subprocess.CompletedProcess:
        out.mkdir()
        env = {**os.environ, "WINDOW": str(window), "RUNS": str(runs), "OUT": str(out), "PYTHON": sys.executable}
        return subprocess.run(["bash", str(ROOT / "launch" / "gpu_window.sh"), str(plan), "600", "--parallel", "1"],
                              cwd=ROOT, env=env, capture_output=True, text=True)

    first = window_run(tmp_path / "runs1", tmp_path / "out1")
    assert first.returncode == 0, first.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out1").iterdir()) == ["campaign.json", "results.tar.gz"]
    with tarfile.open(tmp_path / "out1" / "results.tar.gz") as tar:  # as the next session unpacks it
        cells = [m for m in tar.getmembers() if m.name.startswith("cells/")]
        tar.extractall(window, members=cells, filter="data")
    assert [m.name for m in cells] == ["cells/patch--undefended--s0.json"]

    second = window_run(tmp_path / "runs2", tmp_path / "out2")
    assert second.returncode == 0, second.stderr[-2000:]
    outcomes = json.loads((tmp_path / "out2" / "campaign.json").read_text())["outcomes"]
    assert outcomes == {"patch--undefended--s0": "done before"}
    assert not (tmp_path / "runs2" / "runs").exists()  # nothing trained
