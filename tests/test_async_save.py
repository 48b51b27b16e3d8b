"""--async-save: the background writer writes the very files a synchronous save writes (one process, and 2 gloo
ranks whose agreement runs on the writer's own group); training goes on while a save is written; a process killed
mid-write leaves the previous checkpoint published and loadable; a rank that cannot write its files stops every rank
at once (sync and async) and publishes nothing.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distributed import run_distributed  # tests/ is on sys.path under pytest
from trainer_runs import metrics, run_in_process
from megatron_llama.checkpoint import read_model_checkpoint, read_tracker, set_aside_unpublished
from megatron_llama.pretrain import main

BASE = ("--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --num-query-groups 2 "
        "--vocab-size 100 --seq-length 16 --micro-batch-size 1 --global-batch-size 4 --lr 3e-3 "
        "--lr-warmup-iters 1 --min-lr 3e-4 --mock-data --device cpu --log-interval 1 --eval-iters 0 "
        "--train-iters 4 --save-interval 2").split()
DP2_DISTRIBUTED = ["--use-distributed-optimizer", "--overlap-param-gather", "--ddp-bucket-size", "2000"]
REPOSITORY = Path(__file__).resolve().parent.parent


def saved_files(save: Path) -> dict[str, bytes]:
    """Every checkpoint file's bytes by path, meta.json without the record of config.json (which holds the flag)."""
    files = {}
    for path in sorted(save.rglob("*")):
        name = str(path.relative_to(save))
        if not path.is_file() or name == "metrics.jsonl" or path.name == "config.json":
            continue
        content = path.read_bytes()
        if path.name == "meta.json":
            meta = json.loads(content)
            meta["files"].pop("config.json")
            content = json.dumps(meta, sort_keys=True).encode()
        files[name] = content
    return files


def sync_and_async_runs(root: str, flags: list[str]) -> list[int]:
    return [main(BASE + flags + ["--save", os.path.join(root, "sync")]),
            main(BASE + flags + ["--save", os.path.join(root, "async"), "--async-save"])]


@pytest.mark.parametrize("world_size", [1, 2])
def test_async_and_sync_saves_write_identical_files(tmp_path, world_size):
    if world_size == 1:
        run_in_process([BASE + ["--save", str(tmp_path / "sync")],
                        BASE + ["--save", str(tmp_path / "async"), "--async-save"]])
    else:
        assert run_distributed(sync_and_async_runs, world_size=2, args=(str(tmp_path), DP2_DISTRIBUTED),
                               timeout_s=120) == [[0, 0]] * 2
    sync, background = saved_files(tmp_path / "sync"), saved_files(tmp_path / "async")
    assert sorted(sync) == sorted(background)
    assert {name for name in sync if name.startswith("iter_")} and read_tracker(str(tmp_path / "async")) == 4
    for name in sync:
        assert sync[name] == background[name], name
    assert [r["loss"] for r in metrics(tmp_path / "sync")] == [r["loss"] for r in metrics(tmp_path / "async")]


def logged_iterations(path: Path) -> set[int]:
    """The iterations of the complete records of a metrics file another process is writing."""
    if not path.exists():
        return set()
    lines = path.read_text().split("\n")[:-1]  # the last piece may be a record still being written
    return {json.loads(line)["iteration"] for line in lines}


# The child blocks the background write of iteration 4 after its first file and says so in a marker file.
CHILD = textwrap.dedent("""
    import sys, time
    import megatron_llama.checkpoint.saving as saving
    from megatron_llama.pretrain import main

    real_save = saving.atomic_torch_save

    def save_then_hang(value, path):
        record = real_save(value, path)
        if "iter_0000004" in path:
            open(sys.argv[1], "w").close()
            time.sleep(3600)
        return record

    saving.atomic_torch_save = save_then_hang
    sys.exit(main(sys.argv[2:]))
""")


def test_an_async_save_killed_mid_write_leaves_the_previous_checkpoint_latest_and_loadable(tmp_path):
    save, marker = tmp_path / "run", tmp_path / "writing"
    flags = BASE[:-4] + ["--train-iters", "6", "--save-interval", "2", "--save", str(save), "--async-save"]
    env = dict(os.environ, PYTHONPATH=str(REPOSITORY), OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(marker)] + flags, env=env, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        # training goes on while iteration 4 is being written: iteration 5 is logged
        while not (marker.exists() and 5 in logged_iterations(save / "metrics.jsonl")):
            assert child.poll() is None, child.stdout.read().decode()
            assert time.monotonic() < deadline, "the child never reached iteration 5 during the background write"
            time.sleep(0.2)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert read_tracker(str(save)) == 2
    assert (save / "iter_0000004").is_dir() and not (save / "iter_0000004" / "meta.json").exists()
    _, weights, _ = read_model_checkpoint(str(save))
    assert weights
    assert len(set_aside_unpublished(str(save))) == 1
    run_in_process([flags[:-1] + ["--load", str(save)]])  # a restart in place goes on from iteration 2
    assert read_tracker(str(save)) == 6


def save_with_one_rank_failing(root: str, flags: list[str]) -> tuple[int, str]:
    """Rank 1 cannot write its files of iteration 4; returns (exit status, tracker iteration)."""
    import megatron_llama.checkpoint.saving as saving
    real_save = saving.atomic_torch_save

    def disk_full_on_rank_1(value, path):
        if "iter_0000004" in path and int(os.environ["RANK"]) == 1:
            raise OSError(28, "No space left on device")
        return real_save(value, path)

    saving.atomic_torch_save = disk_full_on_rank_1
    status = main(BASE + flags + ["--global-batch-size", "8", "--save", root])
    return status, read_tracker(root)


@pytest.mark.parametrize("mode", [[], ["--async-save"]], ids=["sync", "async"])
def test_a_rank_that_cannot_write_makes_every_rank_stop_and_nothing_is_published(tmp_path, mode, capfd):
    results = run_distributed(save_with_one_rank_failing, world_size=2, args=(str(tmp_path / "run"), mode),
                              timeout_s=60)
    assert results == [(2, 2), (2, 2)]  # both ranks exit with status 2 at once; iteration 2 stays the latest
    error = capfd.readouterr().err  # the two processes' lines may interleave, each message stays whole
    assert "rank 1: could not write the files of iteration 4 (OSError: [Errno 28] No space left on device)" in error \
        or "rank 1: asynchronous save: could not write the files of iteration 4 (OSError: [Errno 28]" in error
    assert "another rank could not write its files of iteration 4; the previous checkpoint stays the latest" in error
    assert not (tmp_path / "run" / "iter_0000004" / "meta.json").exists()
