"""Checkpoint faults as a hostile or unlucky user meets them: each gives a one-line error naming the file, flag or
iteration and what to do, or the correct result. Divergence is never published; the tokenizer and sequence length
of a resume are checked; corrupt and truncated files are named with the iteration to load instead (--ckpt-step);
interrupted saves are set aside by a restart in place; kill -9 at random moments of saving and SIGTERM with
--exit-signal-handler resume to exactly the losses and weights of an uninterrupted run; the Hugging Face converters
name damaged files and never touch a user's folder."""
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_llama.checkpoint import open_checkpoint, read_tracker, saving, tracker_path, write_model_checkpoint
from megatron_llama.config import ModelConfig
from megatron_llama.hf_conversion import save_hf_checkpoint
from megatron_llama.model.llama import build_model
from megatron_llama.optim.mixed_precision import MixedPrecisionOptimizer
from megatron_llama.pretrain import main

ROOT = Path(__file__).resolve().parent.parent
MODEL = ("--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --num-query-groups 2 "
         "--make-vocab-size-divisible-by 64 --seq-length 16 --micro-batch-size 2 --lr 1e-3 --mock-data --device cpu "
         "--eval-iters 0 --log-interval 1").split()
TRAIN = MODEL + ["--vocab-size", "100"]
CONFIG = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                     vocab_size=100, make_vocab_size_divisible_by=64)


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def error_of(capsys) -> str:
    """The one error line a failed run printed."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint folder holding iterations 1 and 2 (published: 2) of the tiny model."""
    save = str(tmp_path_factory.mktemp("trained"))
    assert main(TRAIN + ["--train-iters", "2", "--save", save, "--save-interval", "1"]) == 0
    return save


def copy_of(trained: str, tmp_path) -> str:
    target = str(tmp_path / "checkpoint")
    shutil.copytree(trained, target)
    return target


# ------------------------------------------------------------------------------------------- divergence

@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--min-lr", "-1e-4"),
                                         ("--lr-warmup-init", "nan")])
def test_non_finite_or_negative_learning_rates_are_refused_by_the_arguments(flag, value, capsys):
    assert main(TRAIN + ["--train-iters", "1", f"{flag}={value}"]) == 2  # the last --lr given counts
    assert f"{flag} must be a finite number >= 0, got {float(value)}" in error_of(capsys)


def test_a_learning_rate_beyond_float32_is_refused_by_the_arguments(capsys):
    assert main(TRAIN + ["--train-iters", "1", "--lr=1e39"]) == 2
    assert "--lr 1e+39 does not fit in float32" in error_of(capsys)


def test_a_non_finite_parameter_after_a_finite_step_is_never_published(tmp_path, monkeypatch, capsys):
    real_step = MixedPrecisionOptimizer.step

    def step_that_breaks_a_weight_at_iteration_3(self, lr):
        outcome = real_step(self, lr)
        self.steps = getattr(self, "steps", 0) + 1
        if self.steps == 3:
            dict(self.named_model_params)["layers.1.mlp.up.weight"].data[0, 0] = float("inf")
        return outcome

    monkeypatch.setattr(MixedPrecisionOptimizer, "step", step_that_breaks_a_weight_at_iteration_3)
    save = str(tmp_path / "run")
    assert main(TRAIN + ["--train-iters", "5", "--save", save, "--save-interval", "1"]) == 1
    error = error_of(capsys)
    assert "iteration 3: parameter layers.1.mlp.up.weight (rank 0) holds NaN/Inf" in error
    assert "the last checkpoint is intact (iteration 2)" in error
    assert read_tracker(save) == 2 and not os.path.exists(os.path.join(save, "iter_0000003"))


def test_convert_to_hf_refuses_non_finite_weights_naming_them(tmp_path):
    state = build_model(CONFIG, seed=1).state_dict()
    state["layers.0.attention.dense.weight"][3, 4] = float("nan")
    write_model_checkpoint(str(tmp_path / "ckpt"), 9, CONFIG, state)
    with pytest.raises(SystemExit) as exited:
        load_tool("convert_to_hf").main(["--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "hf")])
    assert "weight layers.0.attention.dense.weight holds 1 NaN/Inf values" in str(exited.value)
    assert "--ckpt-step" in str(exited.value) and not os.path.exists(tmp_path / "hf")
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary folder left behind


# -------------------------------------------------------------------------------------------- tokenizer

def word_level_tokenizer(folder: Path, order: list[int]) -> list[str]:
    """A tokenizer.json of 62 entries whose word i has id order[i]; returns the tokenizer flags."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir()
    vocab = {f"w{i}": order[i] for i in range(60)}
    vocab.update({"</s>": 60, "<unk>": 61})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(folder / "tokenizer.json")]


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """(flags of tokenizer A, flags of tokenizer B: the same size, other ids), and a checkpoint trained with A."""
    folder = tmp_path_factory.mktemp("tokenizers")
    first = word_level_tokenizer(folder / "a", list(range(60)))
    second = word_level_tokenizer(folder / "b", list(reversed(range(60))))
    save = str(folder / "run")
    assert main(MODEL + first + ["--train-iters", "1", "--save", save]) == 0
    return first, second, save


def test_the_checkpoint_records_the_tokenizers_sha256(two_tokenizers):
    _, _, save = two_tokenizers
    recorded = open_checkpoint(save)[1].data
    assert recorded.tokenizer_model.endswith("a/tokenizer.json") and len(recorded.tokenizer_hash) == 64


def test_resume_with_another_tokenizer_of_the_same_size_is_refused(two_tokenizers, tmp_path, capsys):
    _, second, save = two_tokenizers
    assert main(MODEL + second + ["--train-iters", "2", "--load", save, "--save", str(tmp_path / "next")]) == 2
    error = error_of(capsys)
    assert "was trained with tokenizer" in error and "a/tokenizer.json" in error and "b/tokenizer.json" in error
    assert "pass --finetune" in error


def test_finetune_with_another_tokenizer_warns_loudly_and_goes_on(two_tokenizers, tmp_path, capsys):
    _, second, save = two_tokenizers
    assert main(MODEL + second + ["--train-iters", "1", "--load", save, "--finetune",
                                  "--save", str(tmp_path / "next")]) == 0
    output = capsys.readouterr().out
    assert "WARNING: --load" in output and "b/tokenizer.json is another one" in output


def test_a_checkpoint_without_a_tokenizer_hash_still_resumes(two_tokenizers, tmp_path):
    first, _, save = two_tokenizers
    older = copy_of(save, tmp_path)
    folder = os.path.join(older, "iter_0000001")
    for name, section, field in (("config.json", "data", "tokenizer_hash"), ("meta.json", "files", "config.json")):
        path = os.path.join(folder, name)
        values = json.load(open(path))
        del values[section][field]  # as written before the field existed
        json.dump(values, open(path, "w"))
    assert main(MODEL + first + ["--train-iters", "2", "--load", older, "--save", older]) == 0
    assert read_tracker(older) == 2


def test_convert_to_hf_refuses_a_tokenizer_changed_since_training(tmp_path, capsys):
    flags = word_level_tokenizer(tmp_path / "tokenizer", list(range(60)))
    save = str(tmp_path / "run")
    assert main(MODEL + flags + ["--train-iters", "1", "--save", save]) == 0
    shutil.rmtree(tmp_path / "tokenizer")
    word_level_tokenizer(tmp_path / "tokenizer", list(reversed(range(60))))  # rebuilt in place: other ids
    with pytest.raises(SystemExit) as exited:
        load_tool("convert_to_hf").main(["--load", save, "--save", str(tmp_path / "hf")])
    assert "is not the one the checkpoint was trained with" in str(exited.value)
    assert not os.path.exists(tmp_path / "hf")


# ------------------------------------------------------------------------------------------ sequence length

def test_resume_with_another_seq_length_names_both_unless_finetune(trained, tmp_path, capsys):
    flags = [item if item != "16" else "32" for item in TRAIN]
    assert main(flags + ["--train-iters", "3", "--load", trained, "--save", str(tmp_path / "a")]) == 2
    error = error_of(capsys)
    assert "--seq-length 16" in error and "--seq-length 32" in error
    assert main(flags + ["--train-iters", "1", "--load", trained, "--finetune", "--save", str(tmp_path / "b")]) == 0


# ------------------------------------------------------------------------------------------- checksums

def flip_a_byte(path: str):
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_a_corrupt_file_is_named_with_the_iteration_to_load_instead(trained, tmp_path, capsys):
    save = copy_of(trained, tmp_path)
    flip_a_byte(os.path.join(save, "iter_0000002", "mp_rank_00_000", "model.pt"))
    assert main(TRAIN + ["--train-iters", "3", "--load", save, "--save", save]) == 2
    error = error_of(capsys)
    assert "iter_0000002/mp_rank_00_000/model.pt is corrupt" in error
    assert "the newest intact earlier checkpoint is iteration 1: load it with --ckpt-step 1" in error
    assert main(TRAIN + ["--train-iters", "3", "--load", save, "--save", save, "--ckpt-step", "1"]) == 0
    assert "resumed from" in capsys.readouterr().out and read_tracker(save) == 3


def test_a_truncated_file_is_named_before_anything_starts(trained, tmp_path, capsys):
    save = copy_of(trained, tmp_path)
    optimizer_file = os.path.join(save, "iter_0000002", "mp_rank_00_000", "optim_dp_000.pt")
    os.truncate(optimizer_file, os.path.getsize(optimizer_file) // 3)
    assert main(TRAIN + ["--train-iters", "3", "--load", save]) == 2
    error = error_of(capsys)
    assert "optim_dp_000.pt is truncated" in error and "--ckpt-step 1" in error


def test_convert_to_hf_names_a_corrupt_file_and_exports_the_chosen_step(trained, tmp_path):
    save = copy_of(trained, tmp_path)
    flip_a_byte(os.path.join(save, "iter_0000002", "mp_rank_00_000", "model.pt"))
    tool = load_tool("convert_to_hf")
    with pytest.raises(SystemExit) as exited:
        tool.main(["--load", save, "--save", str(tmp_path / "hf")])
    assert "model.pt is corrupt" in str(exited.value) and "--ckpt-step 1" in str(exited.value)
    tool.main(["--load", save, "--save", str(tmp_path / "hf"), "--ckpt-step", "1"])
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_ckpt_step_loads_the_chosen_iteration(trained, tmp_path, capsys):
    save = str(tmp_path / "next")
    assert main(TRAIN + ["--train-iters", "2", "--load", trained, "--ckpt-step", "1", "--save", save]) == 0
    assert "iter_0000001: iteration 1, 2 samples consumed" in capsys.readouterr().out
    assert main(TRAIN + ["--train-iters", "2", "--load", trained, "--ckpt-step", "7"]) == 2
    assert "iteration 7 was requested" in error_of(capsys)


# ------------------------------------------------------------------------------------- interrupted saves

def test_a_kill_during_the_first_save_does_not_block_resuming_in_place(tmp_path, monkeypatch, capsys):
    save = str(tmp_path / "run")
    os.mkdir(save)
    real_save = saving.atomic_torch_save

    def die_writing_the_rng_state(obj, path):
        if "rng_dp" in path:
            raise KeyboardInterrupt  # the process dies half-way through its first save
        return real_save(obj, path)

    monkeypatch.setattr(saving, "atomic_torch_save", die_writing_the_rng_state)
    with pytest.raises(KeyboardInterrupt):
        main(TRAIN + ["--train-iters", "2", "--save", save, "--load", save, "--save-interval", "1"])
    monkeypatch.setattr(saving, "atomic_torch_save", real_save)
    assert os.path.isdir(os.path.join(save, "iter_0000001")) and not os.path.exists(tracker_path(save))
    capsys.readouterr()
    assert main(TRAIN + ["--train-iters", "2", "--save", save, "--load", save, "--save-interval", "1"]) == 0
    output = capsys.readouterr().out
    assert f"set aside {os.path.join(save, 'iter_0000001')} as {os.path.join(save, 'unpublished_iter_0000001')}" \
        in output
    assert read_tracker(save) == 2 and os.path.isdir(os.path.join(save, "unpublished_iter_0000001"))


def test_an_unpublished_iteration_newer_than_the_tracker_is_set_aside(trained, tmp_path, capsys):
    save = copy_of(trained, tmp_path)
    shutil.copytree(os.path.join(save, "iter_0000002"), os.path.join(save, "iter_0000003"))
    os.remove(os.path.join(save, "iter_0000003", "meta.json"))  # killed before rank 0 wrote the metadata
    assert main(TRAIN + ["--train-iters", "3", "--save", save, "--load", save]) == 0
    output = capsys.readouterr().out
    assert "unpublished_iter_0000003" in output and "the published iteration is 2" in output
    assert "resumed from" in output and "iteration 2," in output
    assert read_tracker(save) == 3 and os.path.isfile(os.path.join(save, "iter_0000003", "meta.json"))


# ------------------------------------------------------------------------------- Hugging Face conversion

def test_convert_to_hf_keeps_a_users_partial_folder(trained, tmp_path):
    users = tmp_path / "hf.partial"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    load_tool("convert_to_hf").main(["--load", trained, "--save", str(tmp_path / "hf")])
    assert (users / "notes.txt").read_text() == "mine" and (tmp_path / "hf" / "config.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["hf", "hf.partial"]


@pytest.fixture
def hf_folder(tmp_path) -> Path:
    folder = tmp_path / "hf"
    save_hf_checkpoint(folder, CONFIG, build_model(CONFIG, seed=2).state_dict())
    return folder


def convert_from_hf_error(folder: Path, tmp_path) -> str:
    with pytest.raises(SystemExit) as exited:
        load_tool("convert_from_hf").main(["--load", str(folder), "--save", str(tmp_path / "ckpt")])
    message = str(exited.value)
    assert "\n" not in message and message.startswith("convert_from_hf: error:")
    return message


def test_convert_from_hf_names_a_truncated_safetensors_file(hf_folder, tmp_path):
    weights = hf_folder / "model.safetensors"
    os.truncate(weights, os.path.getsize(weights) - 1000)
    assert f"{weights} is not a readable safetensors file" in convert_from_hf_error(hf_folder, tmp_path)


def test_convert_from_hf_names_a_config_json_that_is_not_json(hf_folder, tmp_path):
    text = (hf_folder / "config.json").read_text()
    (hf_folder / "config.json").write_text(text[:len(text) // 2])
    assert f"{hf_folder / 'config.json'} is not valid JSON" in convert_from_hf_error(hf_folder, tmp_path)


def test_convert_from_hf_names_config_values_that_do_not_fit_the_weights(hf_folder, tmp_path):
    config = json.loads((hf_folder / "config.json").read_text())
    (hf_folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    message = convert_from_hf_error(hf_folder, tmp_path)
    assert "mlp.gate_proj.weight has shape [64, 32] but config.json implies [128, 32]" in message
    (hf_folder / "config.json").write_text(json.dumps({**config, "hidden_size": "32"}))
    assert "hidden_size '32' should be positive whole numbers" in convert_from_hf_error(hf_folder, tmp_path)


# ------------------------------------------------------------------------- kill -9 and SIGTERM, for real

FAULT_ITERS = 14


def start_trainer(save: str, *extra: str) -> subprocess.Popen:
    """pretrain in a process of its own (one thread, as every fault run, so the numbers agree), saving every step."""
    environment = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    flags = TRAIN + ["--train-iters", str(FAULT_ITERS), "--save", save, "--load", save, "--save-interval", "1"]
    return subprocess.Popen([sys.executable, "-m", "megatron_llama.pretrain", *flags, *extra], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> str:
    output, errors = process.communicate(timeout=120)
    assert process.returncode == 0, errors
    return output


def wait_for_iteration(save: str, process: subprocess.Popen, metrics: str, iteration: int):
    """Until the run logged `iteration` (start-up done, the signal handler installed); its save comes next."""
    path = os.path.join(save, metrics)
    while not (os.path.exists(path) and open(path).read().count("\n") >= iteration):
        assert process.poll() is None, process.communicate()
        time.sleep(0.002)


def losses(path: str) -> dict[int, float]:
    with open(path) as handle:
        return {record["iteration"]: record["loss"] for record in map(json.loads, handle)}


def final_weights(save: str) -> dict:
    return torch.load(os.path.join(save, f"iter_{FAULT_ITERS:07d}", "mp_rank_00_000", "model.pt"),
                      weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    save = str(tmp_path_factory.mktemp("uninterrupted"))
    finish(start_trainer(save))
    return losses(os.path.join(save, "metrics.jsonl")), final_weights(save)


def assert_resumed_exactly(save: str, output: str, uninterrupted):
    """The resumed run logged exactly the uninterrupted run's losses from its resume point on, and ends with its
    weights, bit for bit."""
    expected_losses, expected_weights = uninterrupted
    resumed = losses(os.path.join(save, "resumed.jsonl"))
    start = min(resumed)
    assert (f"iteration {start - 1}," in output) if start > 1 else ("starting from iteration 0" in output), output
    assert resumed == {iteration: expected_losses[iteration] for iteration in range(start, FAULT_ITERS + 1)}
    weights = final_weights(save)
    assert all(torch.equal(weights[name], expected_weights[name]) for name in expected_weights)


@pytest.mark.parametrize("seed", range(4))
def test_kill_9_at_a_random_moment_of_saving_then_resume_in_place_is_exact(seed, tmp_path, uninterrupted):
    save = str(tmp_path / "run")
    os.mkdir(save)
    draw = random.Random(seed)
    process = start_trainer(save, "--metrics-path", os.path.join(save, "killed.jsonl"))
    wait_for_iteration(save, process, "killed.jsonl", draw.randint(1, 8))
    time.sleep(draw.uniform(0.0, 0.05))  # into the save of that iteration (or the next step)
    assert process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.communicate()
    output = finish(start_trainer(save, "--metrics-path", os.path.join(save, "resumed.jsonl")))
    assert_resumed_exactly(save, output, uninterrupted)


def test_sigterm_with_exit_signal_handler_saves_and_exits_0_then_resumes_exactly(tmp_path, uninterrupted):
    save = str(tmp_path / "run")
    os.mkdir(save)
    process = start_trainer(save, "--exit-signal-handler", "--metrics-path", os.path.join(save, "stopped.jsonl"))
    wait_for_iteration(save, process, "stopped.jsonl", 3)
    process.send_signal(signal.SIGTERM)
    output = finish(process)
    stopped = losses(os.path.join(save, "stopped.jsonl"))
    assert "exit signal received" in output and read_tracker(save) == max(stopped) < FAULT_ITERS
    output = finish(start_trainer(save, "--metrics-path", os.path.join(save, "resumed.jsonl")))
    assert min(losses(os.path.join(save, "resumed.jsonl"))) == max(stopped) + 1
    assert_resumed_exactly(save, output, uninterrupted)
