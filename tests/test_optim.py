"""Optimizer pieces: lr schedule values, loss scaling, mixed precision, clipping, weight-decay groups; both
optimizers at dp=1 over the main grads of DataParallelBuffers, and their one checkpoint interface."""
import math

import pytest
import torch
from torch import nn

from megatron_llama.config import ModelConfig
from megatron_llama.model.llama import build_model
from megatron_llama.optim.clip import clip_grads_, global_grad_norm
from megatron_llama.optim.grad_scaler import ConstantLossScaler, DynamicLossScaler
from megatron_llama.optim.lr_schedule import LearningRateSchedule
from megatron_llama.optim.mixed_precision import MixedPrecisionOptimizer
from megatron_llama.optim.builder import build_optimizer
from megatron_llama.optim.distributed_optimizer import DistributedOptimizer
from megatron_llama.optim.optimizer import weight_decay_groups
from megatron_llama.parallel import state
from megatron_llama.parallel.data_parallel import DataParallelBuffers
from megatron_llama.parallel.grad_finalize import finalize_model_grads
from megatron_llama.objectives.language_model import token_mean_loss
from megatron_llama.parallel.state import ParallelLayout
from megatron_llama.training import train_step


def schedule(style, warmup=10, decay=110, warmup_init=0.0):
    return LearningRateSchedule(max_lr=1.0, min_lr=0.1, warmup_iters=warmup, decay_iters=decay, decay_style=style,
                                warmup_init=warmup_init)


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
def test_warmup_rises_linearly_to_max_lr_for_every_style(style):
    lrs = schedule(style)
    assert lrs.lr_at(1) == pytest.approx(0.1)
    assert lrs.lr_at(5) == pytest.approx(0.5)
    assert lrs.lr_at(10) == pytest.approx(1.0)
    assert schedule(style, warmup_init=0.2).lr_at(5) == pytest.approx(0.2 + 0.8 * 0.5)


def test_cosine_decay_is_half_way_at_the_middle_and_min_lr_at_the_end():
    lrs = schedule("cosine")
    assert lrs.lr_at(60) == pytest.approx(0.55)  # r = 0.5: min + (max - min) * 0.5
    assert lrs.lr_at(35) == pytest.approx(0.1 + 0.9 * 0.5 * (math.cos(math.pi * 0.25) + 1))
    assert lrs.lr_at(110) == pytest.approx(0.1)
    assert lrs.lr_at(500) == pytest.approx(0.1)


def test_linear_decay_falls_in_equal_steps_to_min_lr():
    lrs = schedule("linear")
    assert lrs.lr_at(35) == pytest.approx(0.1 + 0.9 * 0.75)
    assert lrs.lr_at(60) == pytest.approx(0.55)
    assert lrs.lr_at(110) == pytest.approx(0.1)
    assert lrs.lr_at(111) == pytest.approx(0.1)


def test_constant_style_keeps_max_lr_after_warmup_even_past_decay_iters():
    lrs = schedule("constant")
    assert [lrs.lr_at(k) for k in (11, 60, 110, 1000)] == [1.0, 1.0, 1.0, 1.0]


def test_no_warmup_starts_decaying_from_the_first_update():
    lrs = schedule("linear", warmup=0, decay=100)
    assert lrs.lr_at(1) == pytest.approx(0.1 + 0.9 * 0.99)


def test_dynamic_loss_scaler_halves_only_after_hysteresis_overflows():
    scaler = DynamicLossScaler(initial_scale=1024.0, hysteresis=2, growth_interval=3)
    scaler.update(found_overflow=True)
    assert scaler.scale == 1024.0
    scaler.update(found_overflow=True)
    assert scaler.scale == 512.0
    scaler.update(found_overflow=True)
    assert scaler.scale == 256.0  # hysteresis is refilled only by growth


def test_dynamic_loss_scaler_grows_after_a_window_of_clean_steps_and_respects_the_floor():
    scaler = DynamicLossScaler(initial_scale=4.0, min_scale=2.0, hysteresis=1, growth_interval=3)
    for _ in range(2):
        scaler.update(found_overflow=False)
    assert scaler.scale == 4.0
    scaler.update(found_overflow=False)
    assert scaler.scale == 8.0
    for _ in range(5):
        scaler.update(found_overflow=True)
    assert scaler.scale == 2.0
    restored = DynamicLossScaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()


def tiny_linear(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4, bias=True), nn.Linear(4, 2, bias=False)).to(dtype)


def make_optimizer(model, weight_decay=0.0, loss_scaler=None):
    """The replicated optimizer at dp=1, over the main grads of the model's DataParallelBuffers."""
    return build_optimizer(model, DataParallelBuffers(model), state.current_layout(),
                           lr=0.1, betas=(0.9, 0.95), eps=1e-8,
                           weight_decay=weight_decay, clip_grad=0.0, loss_scaler=loss_scaler)[0]


def test_fp16_overflow_skips_the_update_and_halves_the_scale_then_a_clean_step_applies():
    model = tiny_linear(torch.float16)
    optimizer = make_optimizer(model, loss_scaler=DynamicLossScaler(initial_scale=2.0**40, hysteresis=1))
    before = [param.detach().clone() for param in model.parameters()]
    x = torch.ones(3, 4, dtype=torch.float16)
    optimizer.zero_grad()
    optimizer.scale_loss(model(x).float().sum()).backward()  # 2**40 overflows fp16
    finalize_model_grads(model, optimizer.buffers, state.current_layout())
    outcome = optimizer.step(lr=0.1)
    assert outcome.skipped and not math.isfinite(outcome.grad_norm)
    assert optimizer.loss_scale == 2.0**39
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    optimizer.loss_scaler.scale = 8.0
    optimizer.zero_grad()
    optimizer.scale_loss(model(x).float().sum()).backward()
    finalize_model_grads(model, optimizer.buffers, state.current_layout())
    outcome = optimizer.step(lr=0.1)
    assert not outcome.skipped and math.isfinite(outcome.grad_norm)
    assert not torch.equal(before[0], model[0].weight)


def test_bf16_model_has_fp32_master_params_and_main_grads_that_accumulate():
    model = tiny_linear(torch.bfloat16)
    optimizer = make_optimizer(model)
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    optimizer.zero_grad()
    model(x).float().sum().backward()
    first = model[0].weight.main_grad.clone()
    model(x).float().sum().backward()
    assert model[0].weight.main_grad.dtype == torch.float32
    assert model[0].weight.grad is None  # moved into main_grad by the hook
    torch.testing.assert_close(model[0].weight.main_grad, 2 * first)
    finalize_model_grads(model, optimizer.buffers, state.current_layout())
    optimizer.step(lr=0.1)
    for name, param in model.named_parameters():
        master = optimizer.master_params[name]
        assert master.dtype == torch.float32 and master is not param
        assert torch.equal(param, master.to(torch.bfloat16))


def test_fp32_model_is_its_own_master_copy():
    model = tiny_linear(torch.float32)
    optimizer = make_optimizer(model)
    assert all(optimizer.master_params[name] is param for name, param in model.named_parameters())
    assert "master_params" not in optimizer.state_dict()


def test_clipping_scales_gradients_to_the_global_norm_limit():
    grads = [torch.full((3,), 3.0), torch.full((4,), 4.0)]
    norm = global_grad_norm(grads)
    assert float(norm) == pytest.approx(math.sqrt(27 + 64))
    clip_grads_(grads, 1.0, norm)
    assert float(global_grad_norm(grads)) == pytest.approx(1.0, rel=1e-5)
    small = [torch.full((2,), 0.1)]
    clip_grads_(small, 1.0, global_grad_norm(small))
    assert torch.equal(small[0], torch.full((2,), 0.1))


def test_weight_decay_groups_exclude_norms_and_biases():
    config = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, vocab_size=128,
                         use_stable_embedding=True)
    model = build_model(config, seed=1)
    decayed, undecayed = weight_decay_groups(list(model.named_parameters()), weight_decay=0.1)
    assert decayed["weight_decay"] == 0.1 and undecayed["weight_decay"] == 0.0
    assert "embedding_norm.bias" in undecayed["names"] and "final_norm.weight" in undecayed["names"]
    assert all("norm" in name or name.endswith(".bias") for name in undecayed["names"])
    assert "layers.0.attention.qkv.weight" in decayed["names"] and "embedding.weight" in decayed["names"]
    assert not any("norm" in name for name in decayed["names"])


def test_optimizer_applies_weight_decay_only_to_the_decayed_group():
    model = tiny_linear(torch.float32)
    optimizer = make_optimizer(model, weight_decay=0.5)
    bias_before = model[0].bias.detach().clone()
    weight_before = model[1].weight.detach().clone()
    optimizer.zero_grad()
    (0.0 * model(torch.ones(1, 4)).sum()).backward()  # zero gradients: only decay can move a weight
    finalize_model_grads(model, optimizer.buffers, state.current_layout())
    optimizer.step(lr=0.1)
    assert torch.equal(model[0].bias, bias_before)
    torch.testing.assert_close(model[1].weight, weight_before * (1 - 0.1 * 0.5))


def test_constant_loss_scaler_never_changes():
    scaler = ConstantLossScaler(128.0)
    scaler.update(found_overflow=True)
    assert scaler.scale == 128.0


TINY_LLAMA = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, vocab_size=64)
TOKENS = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(0))  # [b, s + 1]


def build_trained_pieces(distributed: bool = False):
    model = build_model(TINY_LLAMA, seed=3)
    buffers = DataParallelBuffers(model, bucket_size=3000, use_distributed_optimizer=distributed)
    optimizer, _ = build_optimizer(model, buffers, state.current_layout(),
                                   lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                   clip_grad=0.5)
    return model, buffers, optimizer


def train_steps(model, buffers, optimizer, steps: int) -> list[tuple[float, float]]:
    """`steps` train steps of two micro-batches on TOKENS; (loss, grad norm) of each."""
    batches = [(TOKENS[:2, :-1], TOKENS[:2, 1:]), (TOKENS[2:, :-1], TOKENS[2:, 1:])]
    results = []
    for _ in range(steps):
        loss, outcome = train_step(model, optimizer, batches, lr=1e-2, buffers=buffers,
                                   loss_fn=token_mean_loss(TOKENS[:, 1:].numel()),
                                   layout=ParallelLayout.single_process())
        results.append((loss, outcome.grad_norm))
    return results


def test_at_dp1_the_main_grads_are_the_data_parallel_buffer_and_training_equals_torch_adamw():
    model, buffers, optimizer = build_trained_pieces()
    assert optimizer.buffers is buffers and not hasattr(optimizer, "grad_buffer")
    for name, param in model.named_parameters():
        assert param.main_grad.untyped_storage().data_ptr() == buffers.grad_buffer.untyped_storage().data_ptr(), name
    ours = train_steps(model, buffers, optimizer, steps=3)

    reference_model = build_model(TINY_LLAMA, seed=3)
    reference = torch.optim.AdamW(weight_decay_groups(list(reference_model.named_parameters()), 0.1), lr=1e-2,
                                  betas=(0.9, 0.95), eps=1e-8)
    for loss, grad_norm in ours:
        reference.zero_grad()
        reference_loss = reference_model(TOKENS[:, :-1], TOKENS[:, 1:]).mean()  # the mean over all 32 tokens
        reference_loss.backward()
        reference_norm = torch.nn.utils.clip_grad_norm_(reference_model.parameters(), 0.5)
        reference.step()
        assert loss == pytest.approx(reference_loss.item(), rel=1e-5)
        assert grad_norm == pytest.approx(float(reference_norm), rel=1e-5)
    for (name, param), expected in zip(model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(param, expected, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("distributed", [False, True], ids=["replicated", "distributed"])
def test_both_optimizers_resume_through_the_same_load_state_dict(distributed):
    straight = train_steps(*build_trained_pieces(distributed), steps=3)
    model, buffers, optimizer = build_trained_pieces(distributed)
    train_steps(model, buffers, optimizer, steps=2)
    model_state = {name: value.clone() for name, value in model.state_dict().items()}
    saved_shards = [optimizer.state_dict()]  # one data-parallel rank saved
    model, buffers, optimizer = build_trained_pieces(distributed)
    model.load_state_dict(model_state)
    optimizer.load_state_dict(lambda data_rank: saved_shards[data_rank], len(saved_shards), model_state)
    assert train_steps(model, buffers, optimizer, steps=1) == straight[2:]


def test_each_optimizer_names_the_flag_when_given_the_other_ones_buffers_or_checkpoint():
    for optimizer_class, distributed, flag in ((MixedPrecisionOptimizer, True, "use_distributed_optimizer=False"),
                                               (DistributedOptimizer, False, "use_distributed_optimizer=True")):
        model = build_model(TINY_LLAMA, seed=3)
        buffers = DataParallelBuffers(model, use_distributed_optimizer=distributed)
        with pytest.raises(ValueError, match=flag):
            optimizer_class(model, buffers, torch.optim.AdamW, weight_decay=0.0, clip_grad=0.0)
    model, _, distributed = build_trained_pieces(distributed=True)
    _, _, replicated = build_trained_pieces(distributed=False)
    with pytest.raises(ValueError, match="resume with --use-distributed-optimizer"):
        replicated.load_state_dict(lambda data_rank: distributed.state_dict(), 1, model.state_dict())
    with pytest.raises(ValueError, match="saved without --use-distributed-optimizer"):
        distributed.load_state_dict(lambda data_rank: replicated.state_dict(), 1, model.state_dict())


def test_step_before_finalize_model_grads_says_so():
    model = tiny_linear(torch.float32)
    optimizer = make_optimizer(model)
    optimizer.zero_grad()
    model(torch.ones(1, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="finalize_model_grads"):
        optimizer.step(lr=0.1)
