"""A full checkpoint resumes at another (tensor, pipeline, virtual pipeline, data) layout and optimizer kind with the
losses, gradient norms and final weights of the uninterrupted single-process run: tp2 -> pp2 interleaved (replicated
optimizer), pp2 x dp2 with the distributed optimizer -> tp2 without it, tp2 x pp2 x dp2 (distributed) -> one process
(replicated).

Forks of 8, 4 and 2 gloo ranks stop their run after iteration 2 with a checkpoint (and the 2-rank fork resumes the
checkpoints of 2 and 4 ranks); the single-process reference and resume run here.
"""
import os
from pathlib import Path

import pytest

from distributed import run_distributed  # tests/ is on sys.path under pytest
from trainer_runs import assert_same_run, metrics, run_in_process
from megatron_llama.pretrain import main

ITERATIONS, STOP = 4, 2
# --make-vocab-size-divisible-by 8: the vocabulary splits over the tensor ranks (see test_tp_training.py).
BASE = ("--num-layers 4 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --num-query-groups 2 "
        "--vocab-size 100 --make-vocab-size-divisible-by 8 --seq-length 16 --micro-batch-size 1 "
        "--global-batch-size 4 --lr 3e-3 "
        "--lr-warmup-iters 1 --min-lr 3e-4 --mock-data --device cpu --log-interval 1 --eval-interval 2 --eval-iters 1 "
        f"--train-iters {ITERATIONS} --tie-embeddings-and-output-weights").split()
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
PP2 = ["--pipeline-model-parallel-size", "2"]
VIRTUAL = ["--num-layers-per-virtual-pipeline-stage", "1"]
DISTRIBUTED = ["--use-distributed-optimizer", "--ddp-bucket-size", "2000"]
# stopped checkpoint -> (processes, flags)
STOPPED = {"tp2": (2, TP2), "pp2_dp2_distributed": (4, PP2 + DISTRIBUTED),
           "tp2_pp2_dp2_distributed": (8, TP2 + PP2 + DISTRIBUTED)}
# resumed run -> (processes, flags, the stopped checkpoint it loads)
RESUMED = {"tp2_to_pp2_virtual": (2, PP2 + VIRTUAL, "tp2"),
           "pp2_dp2_distributed_to_tp2": (2, TP2, "pp2_dp2_distributed"),
           "tp2_pp2_dp2_distributed_to_one": (1, [], "tp2_pp2_dp2_distributed")}


def resume_flags(root: str, name: str) -> list[str]:
    _, flags, stopped = RESUMED[name]
    return BASE + flags + ["--save", os.path.join(root, name), "--load", os.path.join(root, stopped)]


def run_layouts(root: str, world_size: int) -> list[int]:
    """On every rank: the runs of this world size that stop with a checkpoint, then those that resume one."""
    statuses = [main(BASE + flags + ["--save", os.path.join(root, name), "--exit-interval", str(STOP)])
                for name, (processes, flags) in STOPPED.items() if processes == world_size]
    statuses += [main(resume_flags(root, name)) for name, (processes, _, _) in RESUMED.items()
                 if processes == world_size]
    return statuses


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("elastic"))
    for world_size in (8, 4, 2):
        count = (sum(processes == world_size for processes, _ in STOPPED.values())
                 + sum(processes == world_size for processes, _, _ in RESUMED.values()))
        statuses = run_distributed(run_layouts, world_size=world_size, args=(root, world_size), timeout_s=300)
        assert statuses == [[0] * count] * world_size
    run_in_process([BASE + ["--save", os.path.join(root, "one")],
                    resume_flags(root, "tp2_pp2_dp2_distributed_to_one")])
    return Path(root)


@pytest.mark.parametrize("name", list(RESUMED))
def test_resume_at_another_layout_continues_with_the_uninterrupted_losses(runs, name):
    stopped = metrics(runs / RESUMED[name][2])
    assert max(record["iteration"] for record in stopped) == STOP
    assert [record["iteration"] for record in metrics(runs / name) if record["kind"] == "train"] == [3, 4]
    assert_same_run(runs / name, runs / "one", after_iteration=STOP)
