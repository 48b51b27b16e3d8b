"""The trainer (pretrain.main) on 2 gloo ranks gives the losses, gradient norms and final weights of one process:
tp=2, tp=2 with sequence parallelism, and dp=2, on the same global batches (within trainer_runs' measured
tolerances); and bad parallel layouts fail up front with their numbers.

One fork of 2 ranks runs every 2-process layout one after another (each main() builds and tears down
its model-parallel groups); the single-process references run in this process.
"""
import json
import os

import pytest
import torch

from distributed import run_distributed  # tests/ is on sys.path under pytest
from trainer_runs import assert_same_run, metrics
from megatron_llama.checkpoint import read_model_checkpoint
from megatron_llama.config_checks import ArgumentsError
from megatron_llama.config_resolve import config_from_args
from megatron_llama.pretrain import main

ITERATIONS = 3
# --make-vocab-size-divisible-by 8: at tp=2 each rank holds real vocabulary rows (56 and 44, then 12 of padding); at
# the default 128 all 100 would sit on rank 0, and no vocabulary-parallel sum would carry anything from rank 1.
BASE = ("--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --num-query-groups 2 "
        "--vocab-size 100 --make-vocab-size-divisible-by 8 --seq-length 16 --micro-batch-size 2 "
        "--global-batch-size 4 --lr 3e-3 "
        "--lr-warmup-iters 1 --min-lr 3e-4 --mock-data --device cpu --log-interval 1 --eval-interval 2 --eval-iters 1 "
        f"--train-iters {ITERATIONS}").split()
TIED = ["--tie-embeddings-and-output-weights"]
# name -> (flags, flags of the single-process run it must reproduce)
LAYOUTS = {
    "tp2": (["--tensor-model-parallel-size", "2"], []),
    "tp2_sp_tied": (["--tensor-model-parallel-size", "2", "--sequence-parallel"] + TIED, TIED),
    "dp2": ([], []),
}


def run_layouts(root: str) -> list[int]:
    """On every rank: main() of each layout in turn; returns the exit statuses."""
    return [main(BASE + flags + ["--save", os.path.join(root, name)]) for name, (flags, _) in LAYOUTS.items()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: save directory} of the 2-rank runs and of their single-process references ("one", "one_tied")."""
    root = str(tmp_path_factory.mktemp("layouts"))
    statuses = run_distributed(run_layouts, world_size=2, args=(root,))
    assert statuses == [[0] * len(LAYOUTS)] * 2
    for name, flags in (("one", []), ("one_tied", TIED)):
        assert main(BASE + flags + ["--save", os.path.join(root, name)]) == 0
    return {name: os.path.join(root, name) for name in list(LAYOUTS) + ["one", "one_tied"]}


def reference_of(name: str) -> str:
    return "one_tied" if LAYOUTS[name][1] == TIED else "one"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_two_rank_layout_losses_and_grad_norms_equal_single_process(runs, name):
    ours, reference = metrics(runs[name]), metrics(runs[reference_of(name)])
    assert [(r["kind"], r["iteration"]) for r in ours] == [(r["kind"], r["iteration"]) for r in reference]
    assert [r["iteration"] for r in ours if r["kind"] == "train"] == list(range(1, ITERATIONS + 1))
    assert_same_run(runs[name], runs[reference_of(name)], weights=False)
    assert [r.get("consumed_samples") for r in ours] == [r.get("consumed_samples") for r in reference]
    assert ours[-1]["loss"] != ours[0]["loss"]  # training moved the weights


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_two_rank_layout_ends_with_the_single_process_weights(runs, name):
    assert_same_run(runs[name], runs[reference_of(name)], keys=())
    config, _, saved = read_model_checkpoint(runs[name])
    assert saved.parallel.world_size == 2 and config.vocab_size == 100


def test_tp2_checkpoint_holds_one_shard_per_tensor_rank_and_dp2_one_optimizer_file_per_data_rank(runs):
    tp_iteration = os.path.join(runs["tp2"], f"iter_{ITERATIONS:07d}")
    assert sorted(os.listdir(tp_iteration)) == ["config.json", "meta.json", "mp_rank_00_000", "mp_rank_01_000"]
    shards = [torch.load(os.path.join(tp_iteration, f"mp_rank_{rank:02d}_000", "model.pt"), weights_only=True)
              for rank in (0, 1)]
    assert shards[0]["embedding.weight"].shape == (56, 32)  # 100 padded to 8 x tp = 112 rows, half each
    assert shards[0]["layers.0.mlp.down.weight"].shape == (32, 32)  # row-parallel: ffn 64 columns halved
    assert torch.equal(shards[0]["final_norm.weight"], shards[1]["final_norm.weight"])  # replicas stay equal
    dp_shard = os.path.join(runs["dp2"], f"iter_{ITERATIONS:07d}", "mp_rank_00_000")
    assert sorted(os.listdir(dp_shard)) == ["model.pt", "optim_dp_000.pt", "optim_dp_001.pt", "rng_dp_000.pt",
                                            "rng_dp_001.pt"]


def test_checkpoint_config_records_sequence_parallel_and_the_layout(runs):
    with open(os.path.join(runs["tp2_sp_tied"], f"iter_{ITERATIONS:07d}", "config.json")) as handle:
        parallel = json.load(handle)["parallel"]
    assert parallel["sequence_parallel"] is True
    assert (parallel["tensor_model_parallel_size"], parallel["data_parallel_size"]) == (2, 1)


# ------------------------------------------------------------------------------------------ bad layouts

LAYOUT_BASE = ("--num-layers 2 --hidden-size 64 --ffn-hidden-size 96 --num-attention-heads 8 --num-query-groups 4 "
               "--vocab-size 100 --seq-length 16 --micro-batch-size 2 --train-iters 2 --lr 1e-3 --mock-data "
               "--device cpu").split()


@pytest.mark.parametrize("world_size, extra, message", [
    (3, "--tensor-model-parallel-size 2",
     "world size 3 is not divisible by --tensor-model-parallel-size 2 x --pipeline-model-parallel-size 1 = 2"),
    (8, "--tensor-model-parallel-size 8",
     "key/value heads (--num-query-groups) 4 is not divisible by --tensor-model-parallel-size 8"),
    (16, "--tensor-model-parallel-size 16",
     "attention heads (--num-attention-heads) 8 and key/value heads (--num-query-groups) 4 are not divisible"),
    (4, "--tensor-model-parallel-size 4 --ffn-hidden-size 90",
     "--ffn-hidden-size 90 is not divisible by --tensor-model-parallel-size 4"),
    (2, "--tensor-model-parallel-size 2 --sequence-parallel --seq-length 15",
     "--seq-length 15 is not divisible by --tensor-model-parallel-size 2"),
    (4, "--tensor-model-parallel-size 2 --global-batch-size 6",
     "global batch 6 is not divisible by micro-batch 2 x data-parallel 2 = 4; use a multiple of 4"),
    (4, "--pipeline-model-parallel-size 4", "--num-layers 2 is not divisible by --pipeline-model-parallel-size 4"),
    (2, "--pipeline-model-parallel-size 2 --num-layers 4 --num-layers-per-virtual-pipeline-stage 1 "
        "--global-batch-size 6", "needs the number of micro-batches (global batch / (micro batch x data-parallel "
                                 "size) = 3) to be a multiple of --pipeline-model-parallel-size 2"),
])
def test_bad_parallel_layout_fails_before_anything_starts_with_the_numbers(monkeypatch, world_size, extra, message):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    with pytest.raises(ArgumentsError) as caught:
        config_from_args(LAYOUT_BASE + extra.split())
    assert message in str(caught.value)


def test_data_parallel_size_is_the_world_over_tensor_parallel_and_sets_the_micro_batch_count(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    config, _, _ = config_from_args(LAYOUT_BASE + "--tensor-model-parallel-size 2 --global-batch-size 32".split())
    assert (config.parallel.world_size, config.parallel.data_parallel_size, config.num_micro_batches) == (8, 4, 4)
