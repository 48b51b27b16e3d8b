"""Checkpoint format: model-only read/write with tp/pp shards, crash safety, safe loading, bad-checkpoint messages."""
import json
import os
import shutil

import pytest
import torch

from megatron_llama.checkpoint import (CheckpointError, iteration_dir, load_checkpoint, open_checkpoint,
                                       read_model_checkpoint, read_tracker, saving, write_model_checkpoint)
from megatron_llama.checkpoint.files import load_tensor_file
from megatron_llama.config import DataConfig, ModelConfig, RunConfig
from megatron_llama.model.llama import build_model
from megatron_llama.optim.builder import build_optimizer
from megatron_llama.parallel import state
from megatron_llama.parallel.data_parallel import DataParallelBuffers
from megatron_llama.pretrain import main
from trainer_runs import metrics

CONFIG = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                     vocab_size=100, make_vocab_size_divisible_by=64)
TRAIN = ("--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --num-query-groups 2 "
         "--vocab-size 100 --make-vocab-size-divisible-by 64 --seq-length 16 --micro-batch-size 2 --lr 1e-3 "
         "--mock-data --device cpu --eval-iters 0 --log-interval 1").split()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trainer checkpoint directory holding iterations 1 and 2 (published: 2)."""
    save = str(tmp_path_factory.mktemp("trained"))
    assert main(TRAIN + ["--train-iters", "2", "--save", save, "--save-interval", "1"]) == 0
    return save


def copy_of(trained, tmp_path) -> str:
    target = str(tmp_path / "checkpoint")
    shutil.copytree(trained, target)
    return target


def test_model_checkpoint_round_trip_keeps_weights_and_config(tmp_path):
    state = build_model(CONFIG, seed=3).state_dict()
    assert state["embedding.weight"].shape[0] == 128  # vocab 100 padded to a multiple of 64
    write_model_checkpoint(str(tmp_path), 7, CONFIG, state, RunConfig(data=DataConfig(tokenizer_model="tok.model")))
    config, loaded, saved = read_model_checkpoint(str(tmp_path))
    assert config == CONFIG and saved.data.tokenizer_model == "tok.model"
    assert saved.parallel.tensor_model_parallel_size == 1
    assert set(loaded) == set(state) and all(torch.equal(loaded[name], state[name]) for name in state)


def test_model_checkpoint_accepts_an_unpadded_vocabulary_and_pads_it(tmp_path):
    state = build_model(CONFIG, seed=3).state_dict()
    state["embedding.weight"] = state["embedding.weight"][:100].clone()  # e.g. from Hugging Face
    write_model_checkpoint(str(tmp_path), 0, CONFIG, state)
    _, loaded, _ = read_model_checkpoint(str(tmp_path))
    assert loaded["embedding.weight"].shape == (128, 32)
    assert torch.equal(loaded["embedding.weight"][:100], state["embedding.weight"])
    assert not loaded["embedding.weight"][100:].any()


def test_tp2_pp2_checkpoint_holds_half_shards_per_stage_and_merges_back(tmp_path):
    state = build_model(CONFIG, seed=5).state_dict()
    write_model_checkpoint(str(tmp_path), 3, CONFIG, state, tensor_parallel_size=2, pipeline_parallel_size=2)
    folder = iteration_dir(str(tmp_path), 3)
    first = torch.load(os.path.join(folder, "mp_rank_01_000", "model.pt"), weights_only=True)
    last = torch.load(os.path.join(folder, "mp_rank_00_001", "model.pt"), weights_only=True)
    assert "layers.0.mlp.up.weight" in first and "layers.1.mlp.up.weight" not in first
    assert "output.weight" in last and "embedding.weight" not in last
    assert first["layers.0.mlp.up.weight"].shape == (32, 32)  # column-parallel: ffn rows halved
    assert first["layers.0.mlp.down.weight"].shape == (32, 32)  # row-parallel: ffn columns halved
    assert first["embedding.weight"].shape == (64, 32)  # vocab padded to 64 x tp = 128, halved
    assert torch.equal(first["layers.0.input_norm.weight"], state["layers.0.input_norm.weight"])  # replicated
    config, merged, _ = read_model_checkpoint(str(tmp_path))
    assert set(merged) == set(state) and all(torch.equal(merged[name], state[name]) for name in state)


def test_trainer_checkpoint_holds_every_part_and_loads_with_weights_only(trained):
    folder, saved, meta = open_checkpoint(trained)
    assert folder.endswith("iter_0000002") and meta["iteration"] == 2 and meta["consumed_train_samples"] == 4
    assert saved.model.hidden_size == 32 and saved.training.train_iters == 2
    assert meta["lr_schedule"]["max_lr"] == 1e-3 and not meta["model_only"]
    shard = os.path.join(folder, "mp_rank_00_000")
    optimizer_state = torch.load(os.path.join(shard, "optim_dp_000.pt"), weights_only=True)
    assert optimizer_state["optimizer"]["state"]  # Adam moments were saved
    rng = torch.load(os.path.join(shard, "rng_dp_000.pt"), weights_only=True)
    assert {"python", "numpy", "torch_cpu"} <= set(rng)


def test_a_checkpoint_file_that_would_run_code_is_refused(tmp_path):
    path = str(tmp_path / "model.pt")
    torch.save({"weights": torch.zeros(2), "payload": ModelConfig()}, path)  # an arbitrary object, not plain data
    with pytest.raises(CheckpointError, match="cannot read checkpoint file"):
        load_tensor_file(path)


def test_an_interrupted_save_leaves_the_previous_checkpoint_published(trained, tmp_path, monkeypatch, capsys):
    save = copy_of(trained, tmp_path)
    real_save = saving.atomic_torch_save

    def crash_on_rng(obj, path):
        if "rng_dp" in path:
            raise OSError("disk full")
        real_save(obj, path)

    monkeypatch.setattr(saving, "atomic_torch_save", crash_on_rng)
    assert main(TRAIN + ["--train-iters", "3", "--save", save, "--load", save]) == 2
    assert "could not write the files of iteration 3 (OSError: disk full)" in capsys.readouterr().err
    assert read_tracker(save) == 2
    assert open_checkpoint(save)[0].endswith("iter_0000002")
    assert not os.path.exists(os.path.join(save, "iter_0000003", "meta.json"))  # never published


def expect_load_error(save: str, capsys, *expected: str):
    assert main(TRAIN + ["--train-iters", "3", "--load", save]) == 2
    message = capsys.readouterr().err
    for text in expected:
        assert text in message, message


def test_load_without_tracker_says_no_checkpoint_was_published(trained, tmp_path, capsys):
    save = copy_of(trained, tmp_path)
    os.remove(os.path.join(save, "latest_checkpointed_iteration.txt"))
    expect_load_error(save, capsys, "no latest_checkpointed_iteration.txt", "iter_0000001, iter_0000002",
                      "none was published")


def test_load_where_the_tracker_names_a_missing_folder_says_so(trained, tmp_path, capsys):
    save = copy_of(trained, tmp_path)
    shutil.rmtree(os.path.join(save, "iter_0000002"))
    expect_load_error(save, capsys, "names iteration 2", "iter_0000002 does not exist")


def test_load_of_an_incomplete_folder_names_the_missing_file(trained, tmp_path, capsys):
    save = copy_of(trained, tmp_path)
    os.remove(os.path.join(save, "iter_0000002", "mp_rank_00_000", "optim_dp_000.pt"))
    expect_load_error(save, capsys, "is incomplete: missing mp_rank_00_000/optim_dp_000.pt")


def test_load_with_a_garbled_tracker_says_what_it_holds(trained, tmp_path, capsys):
    save = copy_of(trained, tmp_path)
    with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as tracker:
        tracker.write("two\n")
    expect_load_error(save, capsys, "should hold an iteration number but holds 'two'")


def test_load_into_a_model_of_another_shape_names_the_differing_values(trained):
    other = ModelConfig(**{**CONFIG.to_dict(), "ffn_hidden_size": 48})
    model = build_model(other, seed=1)
    optimizer, _ = build_optimizer(model, DataParallelBuffers(model), state.current_layout(),
                                   lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                   weight_decay=0.0, clip_grad=0.0)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(open_checkpoint(trained)[0], model=model, optimizer=optimizer, config=RunConfig(model=other))
    assert "holds a different model (ffn_hidden_size: checkpoint 64, this run 48)" in str(caught.value)


def test_trainer_starts_a_model_only_checkpoint_at_iteration_zero_with_its_weights(tmp_path, capsys):
    state = build_model(CONFIG, seed=11).state_dict()
    write_model_checkpoint(str(tmp_path / "weights"), 500, CONFIG, state)
    save = str(tmp_path / "run")
    assert main(TRAIN + ["--train-iters", "1", "--lr", "1e-9", "--load", str(tmp_path / "weights"),
                         "--save", save]) == 0
    assert "starting at iteration 0" in capsys.readouterr().out
    _, trained_state, _ = read_model_checkpoint(save)
    assert read_tracker(save) == 1
    torch.testing.assert_close(trained_state["layers.1.mlp.up.weight"], state["layers.1.mlp.up.weight"],
                               atol=1e-6, rtol=0)
    meta = json.load(open(os.path.join(save, "iter_0000001", "meta.json")))
    assert meta["consumed_train_samples"] == 2


LEGACY_ARGS = os.path.join(os.path.dirname(__file__), "data", "legacy_args.json")  # written by the version before
# config.json for TRAIN + --train-iters 2 --save-interval 1 (its flat record of every flag, the model under "model")


def test_a_checkpoint_written_before_config_json_resumes_from_its_args_json_as_from_config_json(trained, tmp_path):
    current = copy_of(trained, tmp_path / "current")
    legacy = copy_of(trained, tmp_path / "legacy")
    folder = os.path.join(legacy, "iter_0000002")
    os.remove(os.path.join(folder, "config.json"))
    shutil.copy(LEGACY_ARGS, os.path.join(folder, "args.json"))
    meta_path = os.path.join(folder, "meta.json")
    meta = json.load(open(meta_path))
    del meta["files"]  # that version recorded no checksums
    json.dump(meta, open(meta_path, "w"))
    converted, recorded = open_checkpoint(legacy)[1], open_checkpoint(current)[1]
    for section in ("model", "parallel", "training", "data"):  # checkpoint and logging name other folders
        assert getattr(converted, section) == getattr(recorded, section), section
    for save in (current, legacy):
        assert main(TRAIN + ["--train-iters", "3", "--load", save, "--save", save]) == 0
    assert metrics(legacy)[-1]["iteration"] == 3 and metrics(legacy)[-1]["loss"] == metrics(current)[-1]["loss"]
