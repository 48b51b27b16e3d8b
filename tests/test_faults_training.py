"""Faults of a training run: a finite divergence stops it with exit 1 and publishes nothing of it (a sane run of the
same model finishes); an output path the run cannot write stops it at start-up with exit 2 and one line naming the
flag."""
import os

import pytest
import torch

from megatron_llama.config import TrainingConfig
from megatron_llama.divergence import DivergenceWatch
from megatron_llama.pretrain import main

TINY_MOCK_RUN = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--vocab-size", "512",
                 "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "8", "--mock-data",
                 "--lr-decay-style", "constant", "--log-interval", "1", "--eval-iters", "0"]


def run(flags: list[str]) -> int:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(flags)
    finally:
        torch.set_num_threads(previous)


def test_a_huge_learning_rate_stops_as_diverged_before_any_checkpoint_is_published(tmp_path, capsys):
    save = tmp_path / "ckpt"
    assert run(TINY_MOCK_RUN + ["--lr", "1.0", "--train-iters", "30", "--save", str(save),
                                "--save-interval", "5"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: training diverged at iteration"), errors
    assert "--spiky-loss-factor" in errors[0] or "--large-grad-factor" in errors[0]
    assert not (save / "latest_checkpointed_iteration.txt").exists()
    assert not [name for name in os.listdir(save) if name.startswith("iter_")]


def test_the_same_run_at_a_sane_learning_rate_finishes(tmp_path):
    save = tmp_path / "ckpt"
    assert run(TINY_MOCK_RUN + ["--lr", "3e-3", "--train-iters", "30", "--save", str(save),
                                "--save-interval", "5"]) == 0
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "30"


def test_the_huge_learning_rate_trains_on_without_the_checks(tmp_path):
    save = tmp_path / "ckpt"
    assert run(TINY_MOCK_RUN + ["--lr", "1.0", "--train-iters", "4", "--save", str(save),
                                "--no-check-for-spiky-loss", "--no-check-for-large-grads"]) == 0


def watch(**fields) -> DivergenceWatch:
    return DivergenceWatch(TrainingConfig(**fields))


def test_a_single_spike_that_recovers_warns_and_stays_out_of_the_reference():
    divergence = watch()
    for iteration in range(1, 11):
        assert divergence.observe(iteration, 5.0, 1.0) is None
    spike = divergence.observe(11, 5.0, 50.0)
    assert spike is not None and not spike.stop and "--large-grad-factor 10" in spike.message
    assert "iteration 11" in divergence.spiked_before_save(11)
    assert divergence.observe(12, 4.9, 1.1) is None and divergence.spiked_before_save(12) is None
    assert max(divergence.grad_norms) == 1.1


def test_spikes_reaching_the_limit_within_the_window_stop_and_older_ones_are_forgotten():
    divergence = watch(spike_reference_iters=5, spikes_before_stop=2)
    assert divergence.observe(1, 5.0, 1.0) is None
    assert not divergence.observe(2, 11.0, 1.0).stop  # loss above 2 x 5
    for iteration in range(3, 8):
        assert divergence.observe(iteration, 5.0, 1.0) is None
    assert not divergence.observe(8, 11.0, 1.0).stop  # iteration 2 left the window
    assert divergence.observe(9, 5.0, 10.5).stop


@pytest.mark.parametrize("flag, value", [("--spiky-loss-factor", "1.0"), ("--spikes-before-stop", "0")])
def test_watch_settings_out_of_range_are_refused(flag, value, capsys):
    assert run(TINY_MOCK_RUN + ["--lr", "3e-3", "--train-iters", "2", flag, value]) == 2
    assert flag in capsys.readouterr().err


def unwritable_folder(tmp_path) -> str:
    """A folder path this process cannot create: read-only for a normal user; under a regular file for root, whom
    permissions do not stop."""
    if os.geteuid() == 0:
        blocker = tmp_path / "a_file"
        blocker.write_text("")
        return str(blocker / "out")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return str(locked / "out")


@pytest.mark.parametrize("flag", ["--save", "--tensorboard-dir", "--data-cache-path", "--metrics-path"])
def test_an_unwritable_output_path_stops_at_start_up_with_exit_2_naming_the_flag(flag, tmp_path, capsys):
    path = unwritable_folder(tmp_path)
    assert run(TINY_MOCK_RUN + ["--lr", "3e-3", "--train-iters", "2", flag, path]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [errors[0]] and errors[0].startswith(f"error: {flag} {path}: cannot be created"), errors
    assert not os.path.exists(path)
