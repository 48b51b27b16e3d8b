"""DPO at every layout: data-parallel, tensor-parallel (with sequence parallelism) and pipeline-parallel runs of
pretrain.main --dpo log the losses, reward metrics, gradient norms and evaluations of one process and end with its
weights; resuming, the precomputed reference, the evaluation's value at the start (ln 2), the command line's checks."""
import math

import pytest

from distributed import run_distributed  # tests/ is on sys.path under pytest
from test_dpo import PAIRS, write_jsonl
from test_hf_conversion import write_tokenizer
from trainer_runs import assert_same_run, metrics, run_in_process
from megatron_llama.pretrain import EXIT_BAD_ARGUMENTS_OR_CHECKPOINT, main

LOGGED = ("loss", "rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin")


def dpo_flags(tmp_path, save, *layout):
    pairs = tmp_path / "pairs.jsonl"
    if not pairs.exists():
        write_jsonl(pairs, PAIRS)
    tokenizer = tmp_path / "tokenizer"
    if not tokenizer.exists():
        write_tokenizer(tokenizer)
    return ("--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --num-query-groups 2 "
            "--device cpu --seq-length 24 --micro-batch-size 1 --global-batch-size 4 --train-iters 3 --lr 1e-2 "
            "--log-interval 1 --seed 5 --dpo --dpo-beta 0.5").split() + [
        "--train-data-path", str(pairs), "--valid-data-path", str(pairs), "--eval-interval", "3", "--eval-iters", "1",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer), "--save", save, *layout]


def test_dpo_losses_and_rewards_at_dp2_tp2_pp2_equal_one_process(tmp_path):
    """A pair stays on one data-parallel rank; log-probabilities come from the vocab-parallel cross entropy."""
    layouts = {"dp2": [], "tp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
               "pp2": ["--pipeline-model-parallel-size", "2"]}

    def run_layouts():
        return [main(dpo_flags(tmp_path, str(tmp_path / name), *flags)) for name, flags in layouts.items()]

    run_in_process([dpo_flags(tmp_path, str(tmp_path / "one"))])
    assert run_distributed(run_layouts, world_size=2) == [[0, 0, 0], [0, 0, 0]]
    reference = [row for row in metrics(tmp_path / "one") if row["kind"] == "train"]
    assert len(reference) == 3 and reference[1]["loss"] != reference[0]["loss"]
    assert reference[-1]["reward_margin"] > 0  # the policy moved towards the chosen answers
    for name in layouts:
        assert_same_run(tmp_path / name, tmp_path / "one", keys=LOGGED + ("grad_norm",))


def test_the_evaluation_of_a_policy_still_equal_to_its_reference_gives_ln_2_and_no_reward(tmp_path):
    """DPO's loss -log sigmoid(beta (ratio_chosen - ratio_rejected)) is ln 2 where the policy is the reference: an
    evaluation that reported the language-model loss, or read the wrong rows, would not."""
    save = tmp_path / "run"
    run_in_process([dpo_flags(tmp_path, str(save), "--train-iters", "1", "--eval-interval", "1", "--lr", "1e-30")])
    [valid] = [row for row in metrics(save) if row["kind"] == "valid"]
    assert valid["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert valid["reward_margin"] == pytest.approx(0, abs=1e-6) and valid["reward_accuracy"] == 0
    assert "perplexity" not in valid


def test_precomputed_reference_log_probabilities_give_the_same_run_at_every_layout(tmp_path, capsys):
    """--dpo-precompute-reference: every pair's reference log-probabilities once up front (each data-parallel rank
    a share, through the pipeline), the same losses and rewards as the reference run in every step."""
    layouts = {"dp2": [], "tp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
               "pp2": ["--pipeline-model-parallel-size", "2"]}

    def run_layouts():
        return [main(dpo_flags(tmp_path, str(tmp_path / name), "--dpo-precompute-reference", *flags))
                for name, flags in layouts.items()]

    run_in_process([dpo_flags(tmp_path, str(tmp_path / "same_step"))])
    run_in_process([dpo_flags(tmp_path, str(tmp_path / "one"), "--dpo-precompute-reference")])
    assert "the reference model is freed" in capsys.readouterr().out
    assert run_distributed(run_layouts, world_size=2) == [[0, 0, 0], [0, 0, 0]]
    for name in ("one", *layouts):
        assert_same_run(tmp_path / name, tmp_path / "same_step", keys=LOGGED + ("grad_norm",))


@pytest.mark.parametrize("extra, message", [
    (["--sft"], "--sft and --dpo were both given"),
    (["--test-data-path", "x.jsonl"], "--dpo takes --train-data-path FILE.jsonl (and --valid-data-path"),
    (["--valid-data-path", "x.jsonl"], "--valid-data-path x.jsonl is not one existing file"),
    (["--dpo-beta", "0"], "--dpo-beta must be positive"),
])
def test_dpo_flags_that_do_not_fit_are_refused(tmp_path, capsys, extra, message):
    assert main(dpo_flags(tmp_path, str(tmp_path / "run"), *extra)) == EXIT_BAD_ARGUMENTS_OR_CHECKPOINT
    assert message in capsys.readouterr().err


def test_a_dpo_run_resumed_midway_keeps_its_reference_and_gives_the_uninterrupted_run(tmp_path, capsys):
    start, whole, resumed = (str(tmp_path / name) for name in ("start", "whole", "resumed"))
    assert main(dpo_flags(tmp_path, start, "--train-iters", "1")) == 0  # the weights DPO starts from
    assert main(dpo_flags(tmp_path, whole, "--load", start, "--finetune", "--train-iters", "4",
                          "--save-interval", "2")) == 0
    # a resume (no --finetune) finds the reference in the checkpoint's configuration, not in the resumed policy
    assert main(dpo_flags(tmp_path, resumed, "--load", whole, "--ckpt-step", "2", "--train-iters", "4")) == 0
    assert f"reference policy: {start}/iter_0000001, frozen" in capsys.readouterr().out
    assert_same_run(resumed, whole, keys=LOGGED + ("grad_norm",), after_iteration=2)
    # --dpo-reference may name a run's folder: its published iteration
    assert main(dpo_flags(tmp_path, str(tmp_path / "named"), "--load", whole, "--finetune", "--dpo-reference", start,
                          "--train-iters", "1")) == 0
    assert f"reference policy: {start}/iter_0000001, frozen" in capsys.readouterr().out
    # the first run began from its initial weights: its checkpoint records no reference to resume against
    assert main(dpo_flags(tmp_path, str(tmp_path / "again"), "--load", start)) == EXIT_BAD_ARGUMENTS_OR_CHECKPOINT
    assert "records no reference (the run started from its initial weights); pass --dpo-reference" in \
        capsys.readouterr().err
