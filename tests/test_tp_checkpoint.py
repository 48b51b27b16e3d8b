"""Checkpoints of tensor-parallel training: exact resume at tp=2, export of a tp=2 checkpoint to Hugging Face
(transformers' logits and losses), import with --target-tensor-parallel-size 2 that the trainer starts
from, and refusals of a resume into another layout.

One fork of 2 gloo ranks runs every tp=2 training (straight; interrupted at iteration 2 and resumed;
started from a converted Hugging Face model); the comparisons run in this process.
"""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from distributed import run_distributed  # tests/ is on sys.path under pytest
from megatron_llama.checkpoint import find_resume_checkpoint, read_model_checkpoint
from megatron_llama.config_resolve import config_from_args
from megatron_llama.data.mock_dataset import MockGPTDataset
from megatron_llama.data_loader import collate
from megatron_llama.model.llama import LlamaModel
from megatron_llama.pretrain import main
from test_model import sharpen_

SEED, VOCAB, SEQ, GLOBAL_BATCH = 1234, 100, 16, 4
MODEL = ("--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --num-query-groups 2 "
         f"--vocab-size {VOCAB} --seq-length {SEQ} --device cpu --mock-data --seed {SEED}").split()
TRAIN = MODEL + (f"--micro-batch-size 2 --global-batch-size {GLOBAL_BATCH} --lr 3e-3 --lr-warmup-iters 1 --min-lr 3e-4 "
                 "--log-interval 1 --eval-interval 2 --eval-iters 1 --train-iters 3").split()
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
ONE_STEP = ["--train-iters", "1", "--lr-warmup-iters", "0"]  # the logged loss of step 1 is the loaded model's
TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hf_model_like_ours() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                         max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(5)
    return sharpen_(LlamaForCausalLM(config).eval())


def run_tp2_trainings(root: str) -> list[int]:
    """On every rank: the tp=2 runs in order; returns their exit statuses."""
    straight, resumed = os.path.join(root, "straight"), os.path.join(root, "resumed")
    return [main(TRAIN + TP2 + ["--save", straight]),
            main(TRAIN + TP2 + ["--save", resumed, "--exit-interval", "2"]),
            main(TRAIN + TP2 + ["--save", resumed, "--load", resumed]),
            main(TRAIN + TP2 + ONE_STEP + ["--load", os.path.join(root, "from_hf"),
                                "--save", os.path.join(root, "from_hf_trained")])]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_checkpoints")
    hf_model_like_ours().save_pretrained(root / "hf_source")
    load_tool("convert_from_hf").main(["--load", str(root / "hf_source"), "--save", str(root / "from_hf"),
                                       "--target-tensor-parallel-size", "2"])
    assert run_distributed(run_tp2_trainings, world_size=2, args=(str(root),)) == [[0, 0, 0, 0]] * 2
    return root


def metrics(save) -> list[dict]:
    with open(os.path.join(save, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def mean_token_loss(hf_model: LlamaForCausalLM, dataset) -> float:
    """transformers' mean next-token cross entropy over the first global batch of `dataset`."""
    tokens, labels = collate([dataset[index] for index in range(GLOBAL_BATCH)])
    with torch.no_grad():
        logits = hf_model(tokens).logits  # [b, s, V]
    return float(F.cross_entropy(logits.flatten(0, 1), labels.flatten()))


def test_resume_at_tp2_is_bitwise_exact(root):
    key = lambda record: (record["kind"], record["iteration"], record["loss"], record.get("grad_norm"))
    assert [key(r) for r in metrics(root / "resumed")] == [key(r) for r in metrics(root / "straight")]
    for shard in ("mp_rank_00_000", "mp_rank_01_000"):
        straight, resumed = (root / run / "iter_0000003" / shard for run in ("straight", "resumed"))
        weights = torch.load(straight / "model.pt", weights_only=True)
        other = torch.load(resumed / "model.pt", weights_only=True)
        assert all(torch.equal(weights[name], other[name]) for name in weights)
        adam = torch.load(straight / "optim_dp_000.pt", weights_only=True)["optimizer"]["state"]
        other = torch.load(resumed / "optim_dp_000.pt", weights_only=True)["optimizer"]["state"]
        assert all(torch.equal(adam[index][name], other[index][name]) for index in adam for name in adam[index])


def test_tp2_checkpoint_exported_to_hf_gives_transformers_the_same_logits_and_losses(root):
    load_tool("convert_to_hf").main(["--load", str(root / "straight"), "--save", str(root / "hf_export")])
    hf_model = LlamaForCausalLM.from_pretrained(root / "hf_export", dtype=torch.float32).eval()
    state = hf_model.state_dict()
    assert state["model.embed_tokens.weight"].shape == (VOCAB, 32) and state["lm_head.weight"].shape == (VOCAB, 32)
    config, weights, _ = read_model_checkpoint(str(root / "straight"))
    ours = LlamaModel(config)
    ours.load_state_dict(weights)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (ours(tokens)[..., :VOCAB] - hf_model(tokens).logits).abs().max().item()
    assert difference <= 1e-4
    # The tp=2 trainer's own final validation loss, recomputed by transformers from the export.
    final_valid = [r for r in metrics(root / "straight") if r["kind"] == "valid"][-1]
    assert final_valid["iteration"] == 3
    valid_set = MockGPTDataset(GLOBAL_BATCH, SEQ, VOCAB, SEED + 1)
    assert mean_token_loss(hf_model, valid_set) == pytest.approx(final_valid["loss"], rel=1e-5)


def test_hf_model_converted_to_tp2_is_what_the_tp2_trainer_starts_from(root):
    first = [r for r in metrics(root / "from_hf_trained") if r["kind"] == "train"][0]
    train_set = MockGPTDataset(GLOBAL_BATCH, SEQ, VOCAB, SEED)
    assert first["iteration"] == 1
    assert first["loss"] == pytest.approx(mean_token_loss(hf_model_like_ours(), train_set), rel=1e-5)


def test_tp2_checkpoint_finetunes_in_one_process_from_its_merged_weights(root, tmp_path):
    load_tool("convert_to_hf").main(["--load", str(root / "straight"), "--save", str(tmp_path / "hf")])
    hf_model = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    save = tmp_path / "finetuned"
    assert main(TRAIN + ONE_STEP + ["--eval-iters", "0", "--load", str(root / "straight"),
                         "--finetune", "--save", str(save)]) == 0
    first = metrics(save)[0]
    assert first["loss"] == pytest.approx(mean_token_loss(hf_model, MockGPTDataset(4, SEQ, VOCAB, SEED)), rel=1e-5)


def test_resume_of_a_tp2_checkpoint_in_another_layout_is_accepted_with_or_without_finetuning(root, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # tp 1 on 2 processes: data-parallel 2 (re-split: test_elastic_checkpoint)
    flags = TRAIN + ["--load", str(root / "straight")]
    resume, _, _ = config_from_args(flags)
    assert find_resume_checkpoint(resume, []) is not None and resume.parallel.data_parallel_size == 2
    finetune, _, _ = config_from_args(flags + ["--finetune"])
    assert find_resume_checkpoint(finetune, []) is not None and finetune.parallel.data_parallel_size == 2


def test_convert_from_hf_refuses_a_tensor_parallel_size_that_splits_heads(root, tmp_path):
    with pytest.raises(SystemExit) as caught:
        load_tool("convert_from_hf").main(["--load", str(root / "hf_source"), "--save", str(tmp_path / "ckpt"),
                                           "--target-tensor-parallel-size", "4"])
    assert "key/value heads (--num-query-groups) 2 is not divisible by --target-tensor-parallel-size 4" \
        in str(caught.value)
    assert not (tmp_path / "ckpt").exists()
