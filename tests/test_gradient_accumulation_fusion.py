"""Gradient-accumulation fusion (parallel/layers.py) gives the main grads of the unfused model: in the
DataParallelBuffers of one process, and at dp=2 (gloo) reducing overlapped buckets and reduce-scattering for the
distributed optimizer, where a fused weight must still mark its bucket ready.
"""
import contextlib

import torch

from agreement import scaled_difference  # tests/ is on sys.path under pytest
from distributed import run_distributed
from megatron_llama.config import ModelConfig
from megatron_llama.model.llama import build_model
from megatron_llama.parallel import state
from megatron_llama.parallel.data_parallel import DataParallelBuffers
from megatron_llama.parallel.layers import set_gradient_accumulation_fusion

CONFIG = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, vocab_size=100,
                     max_position_embeddings=16, attention_backend="eager")
# Measured bitwise equal (one process and dp=2); the bound allows about two ulps of a gradient's largest value, as
# a GEMM adding into main_grad (addmm_) may round otherwise than a GEMM followed by an add.
FUSION_TOL = 2.5e-7


def micro_batches(seed: int, count: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 100, (2, 16), generator=generator), torch.randint(0, 100, (2, 16), generator=generator))
            for _ in range(count)]


def accumulated_main_grads(fused: bool, seed: int, buffers_options: dict | None = None) -> dict[str, torch.Tensor]:
    """Main grads after accumulating three micro-batches (the last outside no_sync); with overlapped buffers
    (`buffers_options`), every bucket's reduction must have started by the end of the last backward."""
    model = build_model(CONFIG, seed=7)
    set_gradient_accumulation_fusion(model, fused)
    buffers = DataParallelBuffers(model, None, bucket_size=5_000, **(buffers_options or {}))
    buffers.zero_grad()
    batches = micro_batches(seed)
    for index, batch in enumerate(batches):
        last = index == len(batches) - 1
        with contextlib.nullcontext() if last else buffers.no_sync():
            model(*batch).sum().backward()
    if buffers_options is not None:
        started = buffers.grad_reductions_in_flight()
        assert started == [bucket.index for bucket in buffers.buckets], f"buckets never marked ready: {started}"
    buffers.finish_grad_sync()
    assert all(param.grad is None for param in model.parameters()), "no model-dtype .grad may stay behind"
    return {name: param.main_grad.clone() for name, param in model.named_parameters()}


def assert_same_grads(fused: dict, unfused: dict):
    for name, grad in unfused.items():
        difference = scaled_difference(fused[name], grad)
        assert difference <= FUSION_TOL, f"{name}: fused main grad differs by {difference:.2e} of its scale"


def test_fused_weight_grads_equal_unfused_main_grads_in_one_process():
    assert_same_grads(accumulated_main_grads(True, seed=1), accumulated_main_grads(False, seed=1))


def _data_parallel_grads(fused: bool, options: dict):
    # the group argument None is the default (world) group of the two gloo ranks
    with state.parallel_layout(1, 1):
        return accumulated_main_grads(fused, seed=10 + state.current_layout().data_rank, buffers_options=options)


def test_fused_weights_mark_buckets_ready_for_overlapped_reduce_scatter_at_dp2():
    options = dict(overlap_grad_reduce=True, use_distributed_optimizer=True)  # reductions start inside backward
    fused = run_distributed(_data_parallel_grads, world_size=2, args=(True, options))
    unfused = run_distributed(_data_parallel_grads, world_size=2, args=(False, options))
    for rank in range(2):
        assert_same_grads(fused[rank], unfused[rank])
