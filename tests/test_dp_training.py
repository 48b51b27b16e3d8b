"""The trainer (pretrain.main) with data parallelism gives the losses, gradient norms and final weights of one
process: dp=2 with overlapped bucketed gradient reduction, with the distributed optimizer (overlapped param
gather), with recompute; a distributed-optimizer checkpoint saved at dp=2 resumes at dp=1 and dp=4 as if
uninterrupted; tp2 x pp2 x dp2 (8 processes) equals one process and resumes exactly.

Forks of 2, 4 and 8 gloo ranks run the layouts of their size in turn; single-process runs happen here.
"""
import os
from pathlib import Path

import pytest
import torch

from distributed import run_distributed  # tests/ is on sys.path under pytest
from trainer_runs import assert_same_run, metrics, run_in_process
from megatron_llama.checkpoint import read_model_checkpoint
from megatron_llama.pretrain import main

ITERATIONS = 3
# --make-vocab-size-divisible-by 8: the vocabulary splits over the tensor ranks (see test_tp_training.py).
BASE = ("--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --num-query-groups 2 "
        "--vocab-size 100 --make-vocab-size-divisible-by 8 --seq-length 16 --micro-batch-size 1 "
        "--global-batch-size 4 --lr 3e-3 "
        "--lr-warmup-iters 1 --min-lr 3e-4 --mock-data --device cpu --log-interval 1 --eval-interval 2 --eval-iters 1 "
        f"--train-iters {ITERATIONS}").split()
SMALL_BUCKETS = ["--ddp-bucket-size", "2000"]  # the tiny model (~17k parameters) spans several buckets
OVERLAP = ["--overlap-grad-reduce"] + SMALL_BUCKETS
DISTRIBUTED = ["--use-distributed-optimizer", "--overlap-param-gather"] + OVERLAP
TIED = ["--tie-embeddings-and-output-weights"]
THREE_D = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "2"]
# name -> (processes, flags); every one must reproduce the single-process run "one" (or "one_tied")
LAYOUTS = {
    "dp2_overlap": (2, OVERLAP),
    "dp2_distributed": (2, DISTRIBUTED),
    "dp2_recompute_full": (2, OVERLAP + ["--recompute-granularity", "full", "--recompute-method", "block",
                                         "--recompute-num-layers", "1"]),
    "dp2_recompute_selective": (2, ["--recompute-granularity", "selective"]),
    "tp2_pp2_dp2_tied": (8, THREE_D + DISTRIBUTED + TIED),
}


def run_layouts(root: str, world_size: int) -> list[int]:
    """On every rank: the layouts of this world size, then the interrupted and resumed runs that use it."""
    save = lambda name: ["--save", os.path.join(root, name)]
    statuses = [main(BASE + flags + save(name)) for name, (processes, flags) in LAYOUTS.items()
                if processes == world_size]
    if world_size == 2:  # stops after iteration 2 with a checkpoint at dp=2
        statuses.append(main(BASE + DISTRIBUTED + save("dp2_distributed_stopped") + ["--exit-interval", "2"]))
    if world_size == 4:
        statuses.append(main(BASE + DISTRIBUTED + save("dp4_resumed") +
                             ["--load", os.path.join(root, "dp2_distributed_stopped")]))
    if world_size == 8:
        resumed = save("tp2_pp2_dp2_tied_resumed")
        statuses.append(main(BASE + THREE_D + DISTRIBUTED + TIED + resumed + ["--exit-interval", "2"]))
        statuses.append(main(BASE + THREE_D + DISTRIBUTED + TIED + resumed + ["--load", resumed[1]]))
    return statuses


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data_parallel_layouts"))
    extra = {2: 1, 4: 1, 8: 2}
    for world_size in (2, 4, 8):
        count = sum(processes == world_size for processes, _ in LAYOUTS.values()) + extra[world_size]
        statuses = run_distributed(run_layouts, world_size=world_size, args=(root, world_size), timeout_s=300)
        assert statuses == [[0] * count] * world_size
    run_in_process([BASE + ["--save", os.path.join(root, "one")],
                    BASE + TIED + ["--save", os.path.join(root, "one_tied")],
                    BASE + ["--use-distributed-optimizer", "--save", os.path.join(root, "dp1_resumed"),
                            "--load", os.path.join(root, "dp2_distributed_stopped")]])
    return Path(root)


@pytest.mark.parametrize("name", [name for name in LAYOUTS if name.startswith("dp2")])
def test_dp2_losses_grad_norms_and_weights_equal_dp1(runs, name):
    assert_same_run(runs / name, runs / "one")
    assert [r["iteration"] for r in metrics(runs / name) if r["kind"] == "train"] == list(range(1, ITERATIONS + 1))


def test_distributed_optimizer_writes_one_state_shard_per_data_parallel_rank_half_the_size(runs):
    shard = runs / "dp2_distributed" / f"iter_{ITERATIONS:07d}" / "mp_rank_00_000"
    states = [torch.load(shard / f"optim_dp_{rank:03d}.pt", weights_only=True) for rank in (0, 1)]
    sizes = [state["tensors"]["master"].numel() for state in states]
    parameters = sum(value.numel() for value in torch.load(shard / "model.pt", weights_only=True).values())
    assert sum(sizes) >= parameters and max(sizes) <= parameters // 2 + 2000  # each rank: about half (+ padding)


def test_tp2_pp2_dp2_losses_and_weights_equal_one_process(runs):
    assert_same_run(runs / "tp2_pp2_dp2_tied", runs / "one_tied")
    _, _, saved = read_model_checkpoint(str(runs / "tp2_pp2_dp2_tied"))
    assert (saved.parallel.tensor_model_parallel_size, saved.parallel.pipeline_model_parallel_size,
            saved.parallel.data_parallel_size) == (2, 2, 2)


def test_resume_at_tp2_pp2_dp2_is_exact(runs):
    key = lambda record: (record["kind"], record["iteration"], record["loss"], record.get("grad_norm"))
    straight, resumed = (metrics(runs / name) for name in ("tp2_pp2_dp2_tied", "tp2_pp2_dp2_tied_resumed"))
    assert [key(r) for r in resumed] == [key(r) for r in straight]


@pytest.mark.parametrize("name", ["dp1_resumed", "dp4_resumed"])
def test_distributed_optimizer_checkpoint_of_dp2_resumes_at_another_dp_size_as_if_uninterrupted(runs, name):
    stopped = metrics(runs / "dp2_distributed_stopped")
    assert max(r["iteration"] for r in stopped) == 2
    assert [r["iteration"] for r in metrics(runs / name) if r["kind"] == "train"] == [3]
    assert_same_run(runs / name, runs / "dp2_distributed", after_iteration=2)
