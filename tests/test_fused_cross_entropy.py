"""The fused output head + cross entropy (parallel/fused_cross_entropy.py) equals logits followed by
vocab_parallel_cross_entropy: losses and gradients in fp32 to about 1e-6, at tp=1 and tp=2 (gloo), with
vocabulary padding, masked labels (-100), chunks that do not divide the tokens, per-token loss weights,
and inside the model with a tied head. The compiled kernels are checked on the GPU by
benchmarks/bench_train_step.py; here the eager ones run.
"""

import dataclasses

import pytest
import torch

from data_parallel_training import Layout, parallel_run
from agreement import scaled_difference  # tests/ is on sys.path under pytest
from distributed import run_distributed
from megatron_llama.config import ModelConfig
from megatron_llama.model.llama import build_model
from megatron_llama.parallel import state
from megatron_llama.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_llama.parallel.fused_cross_entropy import fused_vocab_parallel_cross_entropy

VOCAB, PADDED, HIDDEN, BATCH, SEQ = 45, 64, 16, 3, 7  # 21 tokens; the last 19 columns are padding
# Differences as a fraction of the unfused tensor's largest value (tests/agreement.py), measured in fp32 and
# bounded 3-10x above: losses 1.2e-7, head gradients 3.4e-7 (tp=1 and 2); every model gradient 3.4e-7; the
# dp=2 runs' losses bitwise equal (bound: a few ulps).
TOLERANCE = 1e-6
DP2_LOSS_RTOL = 3e-7


def inputs(seed: int = 0):
    """hidden [b, s, h], full head weight [padded, h], labels [b, s] with masked tokens, loss weights [b, s]."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=generator)
    weight = torch.randn(PADDED, HIDDEN, generator=generator) * 0.5
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels[0, 0], labels[1, 3], labels[2, -1] = -100, VOCAB - 1, -100
    return hidden, weight, labels, torch.rand(BATCH, SEQ, generator=generator)


def loss_and_grads(loss_fn, hidden, weight, labels, loss_weights):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = loss_fn(hidden, weight, labels)
    (loss * loss_weights).sum().backward()
    return loss.detach(), hidden.grad, weight.grad


def unfused(hidden, weight, labels):
    return vocab_parallel_cross_entropy(hidden @ weight.t(), labels, VOCAB, state.current_layout().tensor_group)


def fused(chunk_tokens):
    return lambda hidden, weight, labels: fused_vocab_parallel_cross_entropy(
        hidden, weight, labels, VOCAB, state.current_layout().tensor_group, chunk_tokens=chunk_tokens)


@pytest.mark.parametrize("chunk_tokens", [1, 5, 64])
def test_fused_cross_entropy_equals_logits_then_cross_entropy(chunk_tokens):
    hidden, weight, labels, loss_weights = inputs()
    expected = loss_and_grads(unfused, hidden, weight, labels, loss_weights)
    got = loss_and_grads(fused(chunk_tokens), hidden, weight, labels, loss_weights)
    for name, a, b in zip(("loss", "hidden grad", "weight grad"), got, expected):
        assert scaled_difference(a, b) <= TOLERANCE, f"{name} differs by {scaled_difference(a, b):.2e}"
    assert (got[0][labels == -100] == 0).all()
    assert (got[2][VOCAB:] == 0).all(), "vocabulary padding rows must get no gradient"


def test_fused_cross_entropy_without_grad_mode_gives_the_same_loss():
    hidden, weight, labels, _ = inputs(1)
    with torch.no_grad():
        assert scaled_difference(fused(4)(hidden, weight, labels), unfused(hidden, weight, labels)) <= TOLERANCE


def _tensor_parallel_comparison(tp: int):
    state.initialize_model_parallel(tp, 1)
    rank = state.current_layout().tensor_rank
    hidden, weight, labels, loss_weights = inputs(2)
    local_weight = weight.chunk(tp)[rank]  # rank 1 holds the padding
    expected = loss_and_grads(unfused, hidden, local_weight, labels, loss_weights)
    got = loss_and_grads(fused(4), hidden, local_weight, labels, loss_weights)
    return [scaled_difference(a, b) for a, b in zip(got, expected)]


def test_fused_cross_entropy_equals_unfused_at_tensor_parallel_2():
    for rank, diffs in enumerate(run_distributed(_tensor_parallel_comparison, world_size=2, args=(2,))):
        assert max(diffs) <= TOLERANCE, f"rank {rank}: loss, hidden grad, weight grad differ by {diffs}"


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_model_loss_and_grads_with_fused_head_equal_the_unfused_head(tied):
    config = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, vocab_size=100,
                         max_position_embeddings=16, attention_backend="eager",
                         untie_embeddings_and_output_weights=not tied)
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 100, (2, 16), generator=generator)
    labels = torch.randint(0, 100, (2, 16), generator=generator)
    labels[:, :5] = -100  # a prompt without loss
    results = []
    for fuse in (True, False):
        model = build_model(config, seed=7)
        model.fuse_cross_entropy = fuse
        loss = model(tokens, labels)
        loss.sum().backward()
        results.append((loss.detach(), {name: param.grad for name, param in model.named_parameters()}))
    (fused_loss, fused_grads), (loss, grads) = results
    assert scaled_difference(fused_loss, loss) <= TOLERANCE
    for name, grad in grads.items():
        difference = scaled_difference(fused_grads[name], grad)
        assert difference <= TOLERANCE, f"{name}: gradient differs by {difference:.2e} of its scale"


def test_fused_head_waits_for_the_overlapped_parameter_gather_at_dp2():
    """The fused head reads output.weight without the matmul of its module; it must still wait for that weight's
    all-gather (overlapped with the next forward), or a step reads half-gathered weights (run to run different)."""
    layout = Layout(distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True)
    unfused = run_distributed(parallel_run, world_size=2, args=(layout, 4))
    fused = run_distributed(parallel_run, world_size=2, args=(dataclasses.replace(layout, fused_cross_entropy=True), 4))
    for fused_rank, unfused_rank in zip(fused, unfused):
        differences = [abs(a - b) / abs(b) for a, b in zip(fused_rank["losses"], unfused_rank["losses"], strict=True)]
        assert max(differences) <= DP2_LOSS_RTOL, differences
