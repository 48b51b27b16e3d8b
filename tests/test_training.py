"""The trainer end to end on a tiny corpus: exact resume, metrics, accumulation, divergence and signal stops."""
import importlib.util
import io
import json
import os
import random
import signal
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from megatron_llama import metrics as metrics_module
from megatron_llama import training
from megatron_llama.checkpoint import open_checkpoint, read_tracker
from megatron_llama.config import ModelConfig
from megatron_llama.data_loader import PretrainingSampler, collate
from megatron_llama.hf_conversion import save_hf_checkpoint
from megatron_llama.model import stage_model
from megatron_llama.model.llama import build_model
from megatron_llama.optim.builder import build_optimizer
from megatron_llama.parallel import state
from megatron_llama.parallel.cross_entropy import IGNORE_INDEX
from megatron_llama.parallel.data_parallel import DataParallelBuffers
from megatron_llama.pretrain import main
from megatron_llama.objectives.language_model import token_mean_loss
from megatron_llama.parallel.state import ParallelLayout
from megatron_llama.training import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ("--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --num-query-groups 2 "
         "--seq-length 16 --device cpu").split()


def make_corpus(folder, shortest: int, longest: int) -> tuple[list[str], str]:
    """A tokenizer.json and a .bin/.idx corpus, made by tools/preprocess_data.py, of 120 documents of `shortest` to
    `longest` words; returns (tokenizer flags, prefix)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(60)}
    vocab.update({"</s>": 60, "<unk>": 61})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    generator = random.Random(0)
    with open(folder / "docs.jsonl", "w") as docs:
        for _ in range(120):  # documents with a learnable pattern: runs of consecutive words
            start = generator.randrange(60)
            words = [f"w{(start + k) % 60}" for k in range(generator.randrange(shortest, longest + 1))]
            docs.write(json.dumps({"text": " ".join(words)}) + "\n")
    tokenizer_flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(folder / "tokenizer.json")]
    spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(ROOT, "tools", "preprocess_data.py"))
    preprocess = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = preprocess  # its dataclasses look their module up while being defined
    spec.loader.exec_module(preprocess)
    assert preprocess.main(["--input", str(folder / "docs.jsonl"), "--output-prefix", str(folder / "corpus"),
                            "--append-eod"] + tokenizer_flags) == 0
    return tokenizer_flags, str(folder / "corpus_text_document")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), 5, 39)


def train_flags(corpus, save, iters, *extra):
    tokenizer_flags, prefix = corpus
    return (MODEL + tokenizer_flags + ["--data-path", prefix, "--split", "90,10,0", "--micro-batch-size", "2",
                                       "--global-batch-size", "4", "--lr", "3e-3", "--lr-warmup-iters", "2",
                                       "--lr-decay-iters", "6", "--min-lr", "3e-4", "--log-interval", "1",
                                       "--eval-interval", "2", "--eval-iters", "1", "--train-iters", str(iters),
                                       "--save", save] + list(extra))


def records(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def straight_run(corpus, tmp_path_factory):
    save = str(tmp_path_factory.mktemp("straight"))
    tensorboard = str(tmp_path_factory.mktemp("tensorboard"))
    assert main(train_flags(corpus, save, 6, "--tensorboard-dir", tensorboard)) == 0
    return save, tensorboard


def load_all(save, iteration):
    shard = os.path.join(save, f"iter_{iteration:07d}", "mp_rank_00_000")
    return (torch.load(os.path.join(shard, "model.pt"), weights_only=True),
            torch.load(os.path.join(shard, "optim_dp_000.pt"), weights_only=True))


def test_resume_is_bitwise_exact_losses_weights_and_optimizer_states(corpus, straight_run, tmp_path):
    straight, _ = straight_run
    resumed = str(tmp_path / "resumed")
    assert main(train_flags(corpus, resumed, 6, "--exit-interval", "3")) == 0
    assert read_tracker(resumed) == 3
    assert main(train_flags(corpus, resumed, 6, "--load", resumed)) == 0
    key = lambda record: (record["kind"], record["iteration"], record["loss"])
    assert [key(r) for r in records(os.path.join(resumed, "metrics.jsonl"))] == \
        [key(r) for r in records(os.path.join(straight, "metrics.jsonl"))]
    straight_model, straight_optimizer = load_all(straight, 6)
    resumed_model, resumed_optimizer = load_all(resumed, 6)
    assert all(torch.equal(straight_model[name], resumed_model[name]) for name in straight_model)
    for index, state in straight_optimizer["optimizer"]["state"].items():
        other = resumed_optimizer["optimizer"]["state"][index]
        assert all(torch.equal(state[name], other[name]) for name in state)
    assert open_checkpoint(resumed)[2]["consumed_train_samples"] == 24


def test_metrics_jsonl_has_every_train_and_eval_field_and_tensorboard_gets_events(straight_run):
    save, tensorboard = straight_run
    lines = records(os.path.join(save, "metrics.jsonl"))
    train = [line for line in lines if line["kind"] == "train"]
    valid = [line for line in lines if line["kind"] == "valid"]
    assert [line["iteration"] for line in train] == [1, 2, 3, 4, 5, 6]
    assert set(train[0]) >= {"iteration", "consumed_samples", "loss", "lr", "grad_norm", "loss_scale",
                             "tokens_per_s_per_gpu", "mfu", "peak_mem_gib", "step_time_s", "skipped_iterations"}
    assert [line["consumed_samples"] for line in train] == [4, 8, 12, 16, 20, 24]
    assert train[0]["lr"] == pytest.approx(1.5e-3) and train[-1]["lr"] == pytest.approx(3e-4)
    assert train[-1]["loss"] < train[0]["loss"]
    # MFU = tokens/s/GPU x model FLOPs per token / the H100's 989e12 dense bf16 FLOP/s (docs/performance.md); for
    # MODEL at seq 16: 6 x (2 x (2 x 32 x 32 + 2 x 32 x 16 + 3 x 32 x 64) + 32 x 128) + 12 x 2 x 32 x 16 = 147,456
    # (the hand count of tests/test_config.py; vocabulary 62 padded to 128). One process: 4 x 16 tokens a step.
    for line in train:
        assert line["tokens_per_s_per_gpu"] == pytest.approx(4 * 16 / line["step_time_s"], rel=1e-12)
        assert line["mfu"] == pytest.approx(line["tokens_per_s_per_gpu"] * 147_456 / 989e12, rel=1e-12)
    assert [line["iteration"] for line in valid] == [2, 4, 6]
    assert valid[0]["perplexity"] == pytest.approx(2.718281828 ** valid[0]["loss"], rel=1e-6)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tensorboard))


def test_without_an_importable_tensorboard_the_logger_says_how_to_mend_it_and_keeps_json_lines(tmp_path,
                                                                                              monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import now raises ImportError
    stdout = io.StringIO()
    logger = metrics_module.MetricsLogger(jsonl_path=str(tmp_path / "metrics.jsonl"),
                                          tensorboard_dir=str(tmp_path / "tensorboard"), stream=stdout)
    logger.log({"kind": "train", "iteration": 1, "loss": 2.5})
    logger.close()
    assert "tensorboard is not importable" in stdout.getvalue() and "pip install tensorboard" in stdout.getvalue()
    assert f"--tensorboard-dir {tmp_path / 'tensorboard'} gets no events" in stdout.getvalue()
    assert records(tmp_path / "metrics.jsonl") == [{"kind": "train", "iteration": 1, "loss": 2.5}]


def test_gradient_accumulation_equals_one_big_batch():
    config = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, vocab_size=64)
    text = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    tokens, labels = collate([{"text": row.numpy()} for row in text])
    results = []
    for micro_batch_size in (1, 4):
        model = build_model(config, seed=7)
        buffers = DataParallelBuffers(model)
        optimizer, _ = build_optimizer(model, buffers, state.current_layout(),
                                       lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                       clip_grad=0.0)
        batches = [(tokens[i:i + micro_batch_size], labels[i:i + micro_batch_size])
                   for i in range(0, 4, micro_batch_size)]
        loss, outcome = train_step(model, optimizer, batches, lr=1e-2, buffers=buffers, loss_fn=token_mean_loss(4 * 16),
                                   layout=ParallelLayout.single_process())
        results.append((loss, outcome.grad_norm, buffers.grad_buffer.clone()))
    (loss_a, norm_a, grads_a), (loss_b, norm_b, grads_b) = results
    with torch.no_grad():
        reference = build_model(config, seed=7)(tokens, labels).mean()  # the mean over all 64 tokens
    assert loss_a == pytest.approx(float(reference), rel=1e-6) and loss_b == pytest.approx(float(reference), rel=1e-6)
    assert norm_a == pytest.approx(norm_b, rel=1e-5)
    torch.testing.assert_close(grads_a, grads_b, atol=1e-7, rtol=1e-5)


def test_sampler_resumes_at_consumed_samples_and_splits_micro_batches_across_data_ranks():
    full = list(PretrainingSampler(20, 0, micro_batch_size=2))
    assert list(PretrainingSampler(20, 8, micro_batch_size=2)) == full[4:]
    rank0 = list(PretrainingSampler(20, 4, micro_batch_size=2, data_parallel_rank=0, data_parallel_size=2))
    rank1 = list(PretrainingSampler(20, 4, micro_batch_size=2, data_parallel_rank=1, data_parallel_size=2))
    assert rank0[0] == [4, 5] and rank1[0] == [6, 7] and rank0[1] == [8, 9]
    assert sorted(i for batch in rank0 + rank1 for i in batch) == list(range(4, 20))


def test_nan_loss_stops_with_the_iteration_named_and_the_last_checkpoint_intact(corpus, tmp_path, monkeypatch,
                                                                               capsys):
    real_build = build_model

    def build_model_that_diverges_at_iteration_3(config, seed, **kwargs):
        model = real_build(config, seed, **kwargs)
        forward_calls = {"count": 0}

        def poison(module, inputs, output):
            forward_calls["count"] += 1
            return output * float("nan") if forward_calls["count"] > 2 * 2 else output  # 2 micro-batches a step

        model.final_norm.register_forward_hook(poison)
        return model

    monkeypatch.setattr(stage_model, "build_model", build_model_that_diverges_at_iteration_3)
    save = str(tmp_path / "run")
    flags = train_flags(corpus, save, 6, "--save-interval", "1", "--eval-iters", "0")
    assert main(flags) == 1
    error = capsys.readouterr().err
    assert "iteration 3" in error and "not finite" in error and "last checkpoint is intact" in error
    assert read_tracker(save) == 2 and open_checkpoint(save)[0].endswith("iter_0000002")
    assert not os.path.exists(os.path.join(save, "iter_0000003"))


def test_sigterm_with_exit_signal_handler_saves_then_exits_cleanly(corpus, tmp_path, monkeypatch, capsys):
    real_log = metrics_module.MetricsLogger.log

    def log_and_signal_at_iteration_2(self, record):
        real_log(self, record)
        if record["kind"] == "train" and record["iteration"] == 2:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(metrics_module.MetricsLogger, "log", log_and_signal_at_iteration_2)
    save = str(tmp_path / "run")
    assert main(train_flags(corpus, save, 6, "--exit-signal-handler", "--eval-iters", "0")) == 0
    assert read_tracker(save) == 2
    assert "exit signal received" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the trainer's handler is gone again


def transformers_loss_and_grad_norm(folder, micro_batches) -> tuple[float, float, list[int]]:
    """The reference for one step, outside our model and trainer: transformers' LlamaForCausalLM on an exported folder,
    the summed token losses of all micro-batches divided once by the global batch's learned labels, and the norm of
    that loss's gradient over every weight. Also returns each micro-batch's count of learned labels."""
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    loss_sum, counts = 0.0, []
    for batch in micro_batches:
        logits = model(batch["tokens"]).logits  # [b, s] -> [b, s, V]
        loss_sum = loss_sum + F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                              ignore_index=IGNORE_INDEX, reduction="sum")
        counts.append(int((batch["labels"] != IGNORE_INDEX).sum()))
    loss = loss_sum / sum(counts)
    loss.backward()
    grad_norm = torch.sqrt(sum(param.grad.double().pow(2).sum() for param in model.parameters()))
    return loss.item(), grad_norm.item(), counts


def test_reported_loss_and_grad_norm_equal_transformers_over_the_global_batch(corpus, tmp_path, monkeypatch):
    """Each step's reported loss and gradient norm against transformers on the weights that step starts from.
    4 micro-batches a step with --eod-mask-loss on short documents, so the micro-batches learn different numbers
    of labels: the global batch's token mean is then neither the mean of the micro-batches' means, nor their sum."""
    steps = []  # (the weights a step starts from, its micro-batches)
    real_train_step = training.train_step

    def recording_train_step(model, optimizer, batches, *args, **kwargs):
        steps.append(({name: tensor.detach().clone() for name, tensor in model.state_dict().items()}, list(batches)))
        return real_train_step(model, optimizer, batches, *args, **kwargs)

    monkeypatch.setattr(training, "train_step", recording_train_step)
    save = str(tmp_path / "run")
    short_documents = make_corpus(tmp_path, 1, 6)  # 3 to 5 end-of-document tokens in each 16-token sample
    # --init-method-std 0.3: token losses spread from the first step on (0.02 gives ln(vocab) at every token)
    assert main(train_flags(short_documents, save, 4, "--eod-mask-loss", "--micro-batch-size", "1",
                            "--init-method-std", "0.3", "--eval-iters", "0")) == 0
    model_config = open_checkpoint(save)[1].model
    train = [line for line in records(os.path.join(save, "metrics.jsonl")) if line["kind"] == "train"]
    assert len(train) == len(steps) == 4
    for line, (weights, micro_batches) in zip(train, steps):
        folder = tmp_path / f"hf_{line['iteration']}"
        save_hf_checkpoint(folder, model_config, weights)
        loss, grad_norm, counts = transformers_loss_and_grad_norm(folder, micro_batches)
        assert len(micro_batches) == 4 and len(set(counts)) > 1, counts
        # measured: loss within 5e-7 (relative 1e-7), gradient norm within relative 5e-8; the mean of the
        # micro-batches' means is off by 2.6e-5 to 2.8e-3 (relative 5e-6 to 5e-4), a sum by a factor of 4 or more
        assert line["loss"] == pytest.approx(loss, rel=1e-6, abs=0), (line["iteration"], counts)
        assert line["grad_norm"] == pytest.approx(grad_norm, rel=1e-6, abs=0), (line["iteration"], counts)
