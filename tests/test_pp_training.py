"""The trainer (pretrain.main) with pipeline parallelism gives the losses, gradient norms and final weights of one
process: pp=2 (even, uneven, interleaved, tied and untied) on 2 gloo ranks and pp=2 x tp=2 on 4 (also tied, with the
fused head and cross entropy); a pp=2 resume is
exact; a pp=2 x tp=2 checkpoint exports to Hugging Face with matching logits; and schedule/split misfits fail up front.

One fork of 2 ranks and one of 4 run every layout in turn (each main() builds and tears down its groups);
the single-process references run in this process.
"""
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from distributed import run_distributed  # tests/ is on sys.path under pytest
from trainer_runs import assert_same_run, metrics, run_in_process
from megatron_llama.checkpoint import read_model_checkpoint
from megatron_llama.config_checks import ArgumentsError
from megatron_llama.config_resolve import config_from_args
from megatron_llama.model.llama import LlamaModel
from megatron_llama.pretrain import main

ITERATIONS = 3
# --make-vocab-size-divisible-by 8: the vocabulary splits over the tensor ranks (see test_tp_training.py).
BASE = ("--num-layers 4 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --num-query-groups 2 "
        "--vocab-size 100 --make-vocab-size-divisible-by 8 --seq-length 16 --micro-batch-size 1 "
        "--global-batch-size 4 --lr 3e-3 "
        "--lr-warmup-iters 1 --min-lr 3e-4 --mock-data --device cpu --log-interval 1 --eval-interval 2 --eval-iters 1 "
        f"--train-iters {ITERATIONS}").split()
TIED = ["--tie-embeddings-and-output-weights"]
PP2 = ["--pipeline-model-parallel-size", "2"]
# name -> (processes, flags, flags of the single-process run it must reproduce)
LAYOUTS = {
    "pp2": (2, PP2, []),
    "pp2_tied": (2, PP2 + TIED, TIED),
    "pp2_uneven": (2, PP2 + ["--decoder-first-pipeline-num-layers", "1"], []),
    "pp2_virtual2_tied": (2, PP2 + ["--num-layers-per-virtual-pipeline-stage", "1"] + TIED, TIED),
    "pp2_tp2_sp": (4, PP2 + ["--tensor-model-parallel-size", "2", "--sequence-parallel"], []),
    # the fused head + vocabulary-parallel cross entropy (CUDA's default) against the unfused single process
    "pp2_tp2_sp_tied_fused_head": (4, PP2 + ["--tensor-model-parallel-size", "2", "--sequence-parallel"] + TIED +
                                   ["--cross-entropy-loss-fusion"], TIED),
}
TOOLS = Path(__file__).resolve().parent.parent / "tools"


def run_layouts(root: str, world_size: int) -> list[int]:
    """On every rank: main() of each layout of this world size in turn (and the interrupted + resumed pp=2 run)."""
    statuses = [main(BASE + flags + ["--save", os.path.join(root, name)])
                for name, (processes, flags, _) in LAYOUTS.items() if processes == world_size]
    if world_size == 2:
        resumed = os.path.join(root, "pp2_resumed")
        statuses.append(main(BASE + PP2 + ["--save", resumed, "--exit-interval", "2"]))
        statuses.append(main(BASE + PP2 + ["--save", resumed, "--load", resumed]))
    return statuses


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pipeline_layouts"))
    for world_size in (2, 4):
        count = sum(processes == world_size for processes, _, _ in LAYOUTS.values()) + 2 * (world_size == 2)
        statuses = run_distributed(run_layouts, world_size=world_size, args=(root, world_size), timeout_s=300)
        assert statuses == [[0] * count] * world_size
    run_in_process([BASE + ["--save", os.path.join(root, "one")],
                    BASE + TIED + ["--save", os.path.join(root, "one_tied")]])
    return Path(root)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pipeline_layout_losses_and_grad_norms_equal_single_process(runs, name):
    ours, reference = metrics(runs / name), metrics(runs / ("one_tied" if LAYOUTS[name][2] else "one"))
    assert [(r["kind"], r["iteration"]) for r in ours] == [(r["kind"], r["iteration"]) for r in reference]
    assert [r["iteration"] for r in ours if r["kind"] == "train"] == list(range(1, ITERATIONS + 1))
    assert_same_run(runs / name, runs / ("one_tied" if LAYOUTS[name][2] else "one"), weights=False)
    assert ours[-1]["loss"] != ours[0]["loss"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pipeline_checkpoint_merges_to_the_single_process_weights(runs, name):
    assert_same_run(runs / name, runs / ("one_tied" if LAYOUTS[name][2] else "one"), keys=())
    _, _, saved = read_model_checkpoint(str(runs / name))
    assert saved.parallel.pipeline_model_parallel_size == 2


def test_interleaved_shard_holds_both_chunks_of_its_rank_and_the_tied_copy(runs):
    shards = [torch.load(runs / "pp2_virtual2_tied" / f"iter_{ITERATIONS:07d}" / f"mp_rank_00_{rank:03d}" / "model.pt",
                         weights_only=True) for rank in (0, 1)]
    blocks = [sorted({int(name.split(".")[1]) for name in shard if name.startswith("layers.")}) for shard in shards]
    assert blocks == [[0, 2], [1, 3]]  # chunk c of rank r is model chunk c * pp + r
    assert "embedding.weight" in shards[0] and "final_norm.weight" in shards[1] and "output.weight" not in shards[1]
    assert torch.equal(shards[0]["embedding.weight"], shards[1]["embedding.weight"])  # the tied copies stayed equal


def test_uneven_split_puts_the_requested_blocks_on_the_first_stage(runs):
    shard = torch.load(runs / "pp2_uneven" / f"iter_{ITERATIONS:07d}" / "mp_rank_00_000" / "model.pt",
                       weights_only=True)
    assert sorted({name.split(".")[1] for name in shard if name.startswith("layers.")}) == ["0"]


def test_resume_at_pp2_is_exact(runs):
    key = lambda record: (record["kind"], record["iteration"], record["loss"], record.get("grad_norm"))
    assert [key(r) for r in metrics(runs / "pp2_resumed")] == [key(r) for r in metrics(runs / "pp2")]
    for stage in (0, 1):
        straight, resumed = (torch.load(runs / run / f"iter_{ITERATIONS:07d}" / f"mp_rank_00_{stage:03d}" / "model.pt",
                                        weights_only=True) for run in ("pp2", "pp2_resumed"))
        assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_pp2_tp2_checkpoint_exported_to_hf_gives_the_same_logits(runs):
    spec = importlib.util.spec_from_file_location("convert_to_hf", TOOLS / "convert_to_hf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--load", str(runs / "pp2_tp2_sp"), "--save", str(runs / "hf_export")])
    hf_model = LlamaForCausalLM.from_pretrained(runs / "hf_export", dtype=torch.float32).eval()
    config, weights, _ = read_model_checkpoint(str(runs / "pp2_tp2_sp"))
    ours = LlamaModel(config)
    ours.load_state_dict(weights)
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(tokens)[..., :100] - hf_model(tokens).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("world_size, extra, message", [
    (2, "--pipeline-model-parallel-size 2 --num-layers 3",
     "--num-layers 3 is not divisible by --pipeline-model-parallel-size 2"),
    (2, "--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1 --global-batch-size 3",
     "(global batch / (micro batch x data-parallel size) = 3) to be a multiple of --pipeline-model-parallel-size 2; "
     "change --global-batch-size so that it gives 2 or 4 micro-batches"),
    (2, "--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 3",
     "--num-layers-per-virtual-pipeline-stage 3 must divide the 2 layers of each pipeline stage"),
    (2, "--pipeline-model-parallel-size 2 --decoder-first-pipeline-num-layers 5",
     "--decoder-first-pipeline-num-layers 5 must lie between 0 and --num-layers 4"),
])
def test_pipeline_misfits_fail_before_anything_starts_with_the_numbers(monkeypatch, world_size, extra, message):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    with pytest.raises(ArgumentsError) as caught:
        config_from_args(BASE + extra.split())
    assert message in str(caught.value)
