"""Operations flags of the trainer: --profile writes a torch.profiler trace of the iterations it names on the ranks
it names; a blend's samples per dataset are logged per interval and follow the weights; each rank's step time is
reduced to a minimum and maximum over the ranks (dp=2 on gloo); --log-memory-to-tensorboard adds memory fields;
--distributed-timeout-minutes reaches every process group; bad combinations are named before anything starts."""
import datetime
import glob
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed  # tests/ is on sys.path under pytest
from trainer_runs import metrics, run_in_process
from megatron_llama import pretrain
from megatron_llama.arguments import parse_args
from megatron_llama.config_checks import ArgumentsError
from megatron_llama.config_resolve import config_from_args, resolve
from megatron_llama.data.indexed_dataset import IndexedDatasetBuilder
from megatron_llama.pretrain import main
from megatron_llama.training import rank_step_time_range

MODEL = ("--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --seq-length 16 "
         "--micro-batch-size 2 --global-batch-size 4 --lr 1e-3 --device cpu --eval-iters 0").split()
MOCK = MODEL + "--vocab-size 100 --mock-data".split()


def train_records(folder) -> list[dict]:
    return [record for record in metrics(folder) if record["kind"] == "train"]


def test_profile_run_writes_a_trace_of_the_named_iterations(tmp_path):
    tensorboard = tmp_path / "tensorboard"
    run_in_process([MOCK + ["--train-iters", "4", "--log-interval", "2", "--save", str(tmp_path / "run"),
                            "--tensorboard-dir", str(tensorboard), "--profile", "--profile-step-start", "2",
                            "--profile-step-end", "4"]])
    traces = glob.glob(str(tensorboard / "rank0.*.pt.trace.json"))
    assert len(traces) == 1
    with open(traces[0]) as handle:
        trace = json.load(handle)
    assert any(event.get("name", "").startswith("aten::") for event in trace["traceEvents"])


def blend_corpus(prefix: str, documents: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for _ in range(documents):
        builder.add_document(rng.integers(0, 100, size=int(rng.integers(5, 40))))
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture
def word_tokenizer(tmp_path):
    """A 102-entry word-level tokenizer.json: the data's token ids are below 100."""
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(100)}
    vocab.update({"</s>": 100, "<unk>": 101})
    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(path))
    return str(path)


def test_blend_counts_per_interval_follow_the_blending_weights(tmp_path, word_tokenizer):
    first = blend_corpus(str(tmp_path / "web_text_document"), 200, seed=1)
    second = blend_corpus(str(tmp_path / "code_text_document"), 200, seed=2)
    iterations, interval, global_batch = 12, 3, 4
    run_in_process([MODEL + ["--data-path", "0.25", first, "0.75", second, "--split", "100,0,0",
                             "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", word_tokenizer,
                             "--train-iters", str(iterations), "--log-interval", str(interval),
                             "--save", str(tmp_path / "run")]])
    records = train_records(tmp_path / "run")
    assert len(records) == iterations // interval
    drawn = {first: 0, second: 0}
    for record in records:
        counts = record["samples_per_dataset"]
        assert set(counts) == {first, second} and sum(counts.values()) == interval * global_batch
        for prefix, weight in ((first, 0.25), (second, 0.75)):
            assert abs(counts[prefix] - weight * interval * global_batch) <= 2  # two prefixes, each within 1
            drawn[prefix] += counts[prefix]
            assert abs(drawn[prefix] - weight * record["consumed_samples"]) <= 1


def test_mock_data_records_no_blend_counts_and_memory_fields_when_asked(tmp_path):
    run_in_process([MOCK + ["--train-iters", "2", "--log-interval", "1", "--save", str(tmp_path / "plain")],
                    MOCK + ["--train-iters", "2", "--log-interval", "1", "--save", str(tmp_path / "memory"),
                            "--log-memory-to-tensorboard"]])
    plain, memory = train_records(tmp_path / "plain"), train_records(tmp_path / "memory")
    assert all("samples_per_dataset" not in record and "mem_resident_gib" not in record for record in plain)
    assert all(record["mem_resident_gib"] > 0 for record in memory)


def dp2_run(root: str) -> tuple[dict, int]:
    """On each of 2 ranks: the step-time range of the values 1 and 2, then a dp=2 run profiling rank 1 only."""
    reduced = rank_step_time_range(1.0 + dist.get_rank(), torch.device("cpu"))
    status = main(MOCK + ["--train-iters", "2", "--log-interval", "1", "--save", root, "--profile",
                          "--profile-step-start", "1", "--profile-step-end", "9", "--profile-ranks", "1"])
    return reduced, status


def test_dp2_step_time_range_over_ranks_and_a_trace_of_the_named_rank_beside_the_metrics(tmp_path):
    root = str(tmp_path / "dp2")
    results = run_distributed(dp2_run, world_size=2, args=(root,))
    assert results == [({"rank_step_time_min_s": 1.0, "rank_step_time_max_s": 2.0}, 0)] * 2
    for record in train_records(root):
        assert 0 < record["rank_step_time_min_s"] <= record["rank_step_time_max_s"]
    assert not glob.glob(os.path.join(root, "rank0.*.pt.trace.json"))  # rank 0 was not named
    assert len(glob.glob(os.path.join(root, "rank1.*.pt.trace.json"))) == 1  # the run ended inside the window


def test_distributed_timeout_reaches_the_default_group_and_every_model_parallel_group(monkeypatch):
    arguments = parse_args(MOCK + ["--train-iters", "2", "--distributed-timeout-minutes", "7"])
    config, _ = resolve(arguments, None, world_size=2)  # as if launched on 2 processes
    timeouts = []
    real_init, real_new_group = dist.init_process_group, dist.new_group

    def record_init(backend, **kwargs):  # a one-process group in place of the launched two
        timeouts.append(kwargs["timeout"])
        real_init(backend, timeout=kwargs["timeout"], store=dist.HashStore(), rank=0, world_size=1)

    def record_new_group(ranks, **kwargs):
        timeouts.append(kwargs["timeout"])
        return real_new_group(ranks, **kwargs)

    monkeypatch.setattr(dist, "init_process_group", record_init)
    monkeypatch.setattr(dist, "new_group", record_new_group)
    try:
        _, started = pretrain.initialize_distributed(config)
    finally:
        pretrain.shutdown_distributed(True)
    assert started and len(timeouts) > 1 and set(timeouts) == {datetime.timedelta(minutes=7)}


@pytest.mark.parametrize("flags, message", [
    ("--profile --profile-step-start 5 --profile-step-end 5", "1 <= start < end"),
    ("--profile --profile-step-start 0 --profile-step-end 2", "1 <= start < end"),
    ("--profile --profile-step-start 3 --profile-step-end 4", "after the last iteration"),
    ("--profile --profile-step-start 1 --profile-step-end 2 --profile-ranks 0 1", "--profile-ranks 1 outside the 1 "
                                                                                   "ranks"),
    ("--profile --profile-step-start 1 --profile-step-end 2", "give --tensorboard-dir, --save or --metrics-path"),
    ("--distributed-timeout-minutes 0", "--distributed-timeout-minutes must be positive"),
])
def test_bad_operations_flags_are_named(flags, message):
    with pytest.raises(ArgumentsError, match=message):
        config_from_args(MOCK + ["--train-iters", "2"] + flags.split())
