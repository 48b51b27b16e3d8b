"""The Slurm launchers (examples/slurm/*.sbatch): every script parses (bash -n), and a dry run in a fake Slurm
environment prints one srun task per node and node 0's torchrun command with the rendezvous taken from Slurm's
variables and the example launcher's training flags."""
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(str(path.relative_to(REPO)) for path in
                 [*REPO.glob("examples/*.sh"), *REPO.glob("examples/slurm/*")])


def fake_slurm_job(tmp_path, nodes: str, count: int, **extra) -> dict:
    """The environment of a job's batch step, with DRY_RUN=1 and outputs under tmp_path; no scontrol on PATH."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "MASTER_",
                                                                                           "NNODES", "NODE_RANK"))}
    environment.update(DRY_RUN="1", SLURM_JOB_ID="4242", SLURM_NNODES=str(count), SLURM_JOB_NODELIST=nodes,
                       SLURM_SUBMIT_DIR=str(REPO), GPUS_PER_NODE="8", PATH="/usr/bin:/bin",
                       OUTPUT_DIR=str(tmp_path / "pretrain"), OUT=str(tmp_path / "sft"), **extra)
    return environment


def dry_run(script: str, environment: dict, *args: str) -> list[str]:
    """The script's output lines, run from another folder: Slurm runs a copy of the batch script elsewhere, and the
    script must find the repository from SLURM_SUBMIT_DIR."""
    done = subprocess.run(["bash", script, *args], cwd=os.path.dirname(environment["OUTPUT_DIR"]), env=environment,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_launcher_script_parses(script):
    done = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_pretrain_sbatch_dry_run_prints_one_task_per_node_and_the_torchrun_rendezvous(tmp_path):
    lines = dry_run(str(REPO / "examples/slurm/pretrain_7b.sbatch"),
                    fake_slurm_job(tmp_path, "gpu[07-09,12]", 4, TP="2"), "--log-interval", "5")
    srun = next(line for line in lines if line.startswith("would run: srun"))
    assert "--nodes 4 --ntasks-per-node 1" in srun and srun.endswith("examples/pretrain_7b.sh --log-interval 5")
    torchrun = next(line for line in lines if line.startswith("torchrun"))
    assert torchrun.startswith("torchrun --nproc_per_node 8 --nnodes 4 --node_rank 0 --master_addr gpu07 "
                               "--master_port 24242 -m megatron_llama.pretrain --model-preset openllama-7b ")
    assert "--tensor-model-parallel-size 2 " in torchrun and "--sequence-parallel" in torchrun
    assert f"--save {tmp_path}/pretrain/checkpoints" in torchrun
    assert torchrun.endswith("--log-interval 5")  # the job's extra arguments reach the trainer last


def test_sft_sbatch_dry_run_prints_the_fine_tuning_and_export_commands(tmp_path):
    lines = dry_run(str(REPO / "examples/slurm/sft.sbatch"),
                    fake_slurm_job(tmp_path, "node3,node4", 2, MASTER_PORT="31000", SLURM_GPUS_ON_NODE="4"))
    torchrun = next(line for line in lines if line.startswith("torchrun"))
    assert torchrun.startswith("torchrun --nproc_per_node 8 --nnodes 2 --node_rank 0 --master_addr node3 "
                               "--master_port 31000 -m megatron_llama.pretrain ")  # a variable set by hand wins
    assert "--sft --train-data-path examples/sft_sample.jsonl" in torchrun and "--finetune" in torchrun
    assert f"tools/convert_to_hf.py --load {tmp_path}/sft/checkpoints" in lines[-1]  # node 0 exports


def test_sbatch_outside_a_slurm_job_says_how_to_submit(tmp_path):
    environment = fake_slurm_job(tmp_path, "gpu01", 1)
    del environment["SLURM_JOB_ID"]
    done = subprocess.run(["bash", str(REPO / "examples/slurm/pretrain_7b.sbatch")], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "submit with sbatch" in done.stderr
