"""Checkpoints are never lost and never poisoned, as a user, a second trainer or a fault meets them: the tracker is
an index (deleted, copied without it, or garbled, every intact checkpoint is kept and the newest verified one
resumed, or the run refuses touching nothing); one trainer writes into a --save directory (two real processes);
a NaN stored in a checkpoint is refused when loaded, converted or generated from; a changed schedule or optimizer
setting on resume is named in the log."""
import hashlib
import importlib.util
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

from megatron_llama.checkpoint import read_tracker, tracker_path
from megatron_llama.pretrain import main

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ("--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --num-query-groups 2 "
         "--make-vocab-size-divisible-by 64 --seq-length 16 --micro-batch-size 2 --lr 1e-3 --mock-data --device cpu "
         "--eval-iters 0 --log-interval 1 --vocab-size 100").split()


def error_of(capsys) -> str:
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
    shutil.copytree(trained, target, ignore=shutil.ignore_patterns("writer.lock"))
    return target


def folders(save: str) -> list[str]:
    return sorted(name for name in os.listdir(save) if "iter_" in name)


def resume_in_place(save: str, *extra: str) -> int:
    return main(TRAIN + ["--train-iters", "3", "--load", save, "--save", save, *extra])


# ---------------------------------------------------------------------------------- the tracker is an index

def test_a_deleted_tracker_resumes_the_newest_verified_iteration_and_renames_nothing(trained, tmp_path, capsys):
    save = copy_of(trained, tmp_path)
    os.remove(tracker_path(save))
    assert resume_in_place(save) == 0
    output = capsys.readouterr().out
    assert f"resuming from {os.path.join(save, 'iter_0000002')}, the newest checkpoint whose files verify" in output
    assert "iteration 2, 4 samples consumed" in output and "set aside" not in output
    assert folders(save) == ["iter_0000001", "iter_0000002", "iter_0000003"] and read_tracker(save) == 3


def test_an_iteration_folder_copied_into_a_new_directory_resumes_from_it(trained, tmp_path, capsys):
    save = str(tmp_path / "new")
    os.mkdir(save)
    shutil.copytree(os.path.join(trained, "iter_0000002"), os.path.join(save, "iter_0000002"))
    assert resume_in_place(save) == 0
    assert "iteration 2, 4 samples consumed" in capsys.readouterr().out
    assert folders(save) == ["iter_0000002", "iter_0000003"] and read_tracker(save) == 3


def test_without_a_tracker_only_the_folders_that_fail_verification_are_set_aside_with_the_reason(
        trained, tmp_path, capsys):
    save = copy_of(trained, tmp_path)
    os.remove(tracker_path(save))
    for iteration in (3, 4):
        shutil.copytree(os.path.join(save, "iter_0000002"), os.path.join(save, f"iter_000000{iteration}"))
    os.remove(os.path.join(save, "iter_0000003", "meta.json"))  # killed before rank 0 wrote the metadata
    with open(os.path.join(save, "iter_0000004", "mp_rank_00_000", "model.pt"), "r+b") as model_file:
        model_file.seek(100)
        model_file.write(b"\x00" * 8)  # a failed checksum
    assert main(TRAIN + ["--train-iters", "5", "--load", save, "--save", save]) == 0
    output = capsys.readouterr().out
    assert "unpublished_iter_0000003: its save was interrupted" in output and "meta.json is missing" in output
    assert "unpublished_iter_0000004: its save was interrupted" in output and "model.pt is corrupt" in output
    assert "iteration 2, 4 samples consumed" in output
    assert folders(save) == ["iter_0000001", "iter_0000002", "iter_0000005", "unpublished_iter_0000003",
                             "unpublished_iter_0000004"]


@pytest.mark.parametrize("text", ["-3", "two", ""])
def test_an_unreadable_tracker_is_refused_touching_nothing_and_fixing_it_resumes(text, trained, tmp_path, capsys):
    save = copy_of(trained, tmp_path)
    Path(tracker_path(save)).write_text(text + "\n")
    assert resume_in_place(save) == 2
    error = error_of(capsys)
    assert f"{tracker_path(save)} should hold an iteration number but holds {text!r}" in error
    assert "nothing was changed" in error and folders(save) == ["iter_0000001", "iter_0000002"]
    Path(tracker_path(save)).write_text("2\n")
    assert resume_in_place(save) == 0
    assert "iteration 2, 4 samples consumed" in capsys.readouterr().out and read_tracker(save) == 3


def test_a_tracker_naming_a_missing_iteration_is_refused_touching_nothing(trained, tmp_path, capsys):
    save = copy_of(trained, tmp_path)
    Path(tracker_path(save)).write_text("7\n")
    assert resume_in_place(save) == 2
    error = error_of(capsys)
    assert "names iteration 7" in error and "iter_0000007 does not exist" in error and "nothing was changed" in error
    assert folders(save) == ["iter_0000001", "iter_0000002"]


# --------------------------------------------------------------------------------- one writer per directory

def start_trainer(save: str, *extra: str) -> subprocess.Popen:
    environment = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    flags = TRAIN + ["--save", save, "--load", save, "--metrics-path", os.path.join(save, "metrics.jsonl"), *extra]
    return subprocess.Popen([sys.executable, "-m", "megatron_llama.pretrain", *flags], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until_training(save: str, process: subprocess.Popen):
    """Until the run logged its first iteration (it holds the lock then: the lock is taken before anything)."""
    path = os.path.join(save, "metrics.jsonl")
    while not (os.path.exists(path) and open(path).read().count("\n") >= 1):
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)


def test_a_second_trainer_on_the_same_save_directory_is_refused_naming_the_first(tmp_path):
    save = str(tmp_path / "run")
    os.mkdir(save)
    first = start_trainer(save, "--train-iters", "100000", "--exit-signal-handler", "--lr", "1e-3")
    try:
        wait_until_training(save, first)
        second = start_trainer(save, "--train-iters", "3", "--lr", "5e-3")
        _, errors = second.communicate(timeout=120)
        assert second.returncode == 2, errors
        assert f"is in use by another trainer, host {os.uname().nodename} pid {first.pid}" in errors
        assert len([line for line in errors.splitlines() if line.strip()]) == 1, errors
        first.send_signal(signal.SIGTERM)
        output, errors = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 0, errors
    published = read_tracker(save)
    recorded = json.load(open(os.path.join(save, f"iter_{published:07d}", "config.json")))
    assert recorded["training"]["lr"] == 1e-3 and not [name for name in os.listdir(save) if "unpublished" in name]


def test_the_lock_of_a_killed_trainer_is_taken_over_with_a_notice(tmp_path):
    save = str(tmp_path / "run")
    os.mkdir(save)
    killed = start_trainer(save, "--train-iters", "100000")
    wait_until_training(save, killed)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    taking_over = start_trainer(save, "--train-iters", "1")
    output, errors = taking_over.communicate(timeout=120)
    assert taking_over.returncode == 0, errors
    assert f"took over {os.path.join(save, 'writer.lock')} from host {os.uname().nodename} pid {killed.pid}" in output


# ----------------------------------------------------------------------------------- a poisoned checkpoint

def poison(save: str, iteration: int, filename: str, change):
    """Change a tensor of a file of `iteration` with `change(state)` and record the new checksum in meta.json,
    as if the NaN had been saved: a checkpoint that verifies but is not finite."""
    folder = os.path.join(save, f"iter_{iteration:07d}")
    relative = os.path.join("mp_rank_00_000", filename)
    state = torch.load(os.path.join(folder, relative), weights_only=True)
    change(state)
    torch.save(state, os.path.join(folder, relative))
    data = Path(folder, relative).read_bytes()
    meta = json.load(open(os.path.join(folder, "meta.json")))
    meta["files"][relative] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    json.dump(meta, open(os.path.join(folder, "meta.json"), "w"))


def nan_weight(state):
    state["layers.1.mlp.up.weight"][0, 0] = float("nan")


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_nan_weight_in_the_checkpoint_is_refused_naming_it_and_the_newest_finite_iteration(
        trained, tmp_path, capsys):
    save = copy_of(trained, tmp_path)
    poison(save, 2, "model.pt", nan_weight)
    assert resume_in_place(save) == 2
    error = error_of(capsys)
    assert "weight layers.1.mlp.up.weight holds 1 NaN/Inf values" in error
    assert "the checkpoint of iteration 2 is not finite" in error
    assert "the newest intact earlier checkpoint is iteration 1: load it with --ckpt-step 1" in error
    assert read_tracker(save) == 2 and folders(save) == ["iter_0000001", "iter_0000002"]


def test_a_nan_in_the_optimizer_state_is_refused_naming_it(trained, tmp_path, capsys):
    save = copy_of(trained, tmp_path)

    def nan_moment(state):
        moments = [value for value in state["optimizer"]["state"].values()]
        moments[0]["exp_avg_sq"].view(-1)[0] = float("inf")

    poison(save, 2, "optim_dp_000.pt", nan_moment)
    assert main(TRAIN + ["--train-iters", "3", "--load", save, "--save", str(tmp_path / "next")]) == 2
    error = error_of(capsys)
    assert "optim_dp_000.pt: optimizer state optimizer.state." in error and "exp_avg_sq holds 1 NaN/Inf" in error
    assert "--ckpt-step 1" in error


@pytest.mark.parametrize("tool", ["generate", "convert_to_hf"])
def test_the_tools_refuse_a_nan_checkpoint_in_one_line(tool, trained, tmp_path):
    save = copy_of(trained, tmp_path)
    poison(save, 2, "model.pt", nan_weight)
    flags = ["--prompt", "hello", "--max-new-tokens", "2"] if tool == "generate" else ["--save", str(tmp_path / "hf")]
    with pytest.raises(SystemExit) as exited:
        load_tool(tool).main(["--load", save, *flags])
    message = str(exited.value)
    assert message.startswith(f"{tool}: error:") and "\n" not in message
    assert "weight layers.1.mlp.up.weight holds 1 NaN/Inf values" in message and "--ckpt-step 1" in message


# ------------------------------------------------------------------------------- settings changed on resume

def test_a_changed_schedule_or_optimizer_setting_on_resume_is_named_in_the_log(trained, tmp_path, capsys):
    save = str(tmp_path / "next")
    flags = [value if value != "1e-3" else "2e-3" for value in TRAIN]
    assert main(flags + ["--train-iters", "3", "--load", trained, "--save", save, "--clip-grad", "0.5"]) == 0
    notice = [line for line in capsys.readouterr().out.splitlines() if line.startswith("NOTICE: resuming")]
    assert len(notice) == 1, notice
    assert "--lr 0.001 -> 0.002" in notice[0] and "--clip-grad 1.0 -> 0.5" in notice[0]
    assert "--lr-decay-iters 2 -> 3" in notice[0] and "--min-lr" not in notice[0]


def test_an_unchanged_resume_gives_no_notice(trained, tmp_path, capsys):
    assert main(TRAIN + ["--train-iters", "2", "--load", trained, "--save", str(tmp_path / "next")]) == 0
    assert "NOTICE: resuming" not in capsys.readouterr().out
