"""Finishing the fp32 main grads of a step, after the last micro-batch's backward and before the optimizer.

The main grads live in DataParallelBuffers (parallel/data_parallel.py) at every data-parallel size. Three
sums over different groups complete them, in this order:

    1. data parallel     buffers.finish_grad_sync(): the bucket all-reduces (or, for the distributed
                         optimizer, reduce-scatters) not yet started are started, and all are waited for
    2. sequence parallel norm weights saw only this rank's sequence shard: summed over the tensor ranks
                         (parallel/layers.allreduce_sequence_parallel_grads)
    3. tied embedding    the first and last pipeline stage each hold a copy of the embedding weight: their
                         gradients are summed over the embedding group
                         (parallel/stages.allreduce_tied_embedding_grads; with the distributed optimizer
                         the weight has a bucket of its own, so both stages' shards of it cover the same elements)

Usage:  optimizer.zero_grad(); backward per micro-batch; finalize_model_grads(model, buffers, layout);
        optimizer.step(lr)
"""
from __future__ import annotations

from torch import nn

from megatron_llama.parallel.data_parallel import DataParallelBuffers
from megatron_llama.parallel.layers import allreduce_sequence_parallel_grads
from megatron_llama.parallel.stages import allreduce_tied_embedding_grads
from megatron_llama.parallel.state import ParallelLayout


def finalize_model_grads(model: nn.Module, buffers: DataParallelBuffers, layout: ParallelLayout):
    """Complete the main grads of `model` (a StageModel or a plain model, built for `layout`) whose buffers are
    `buffers`."""
    buffers.finish_grad_sync()
    allreduce_sequence_parallel_grads(model, layout)
    allreduce_tied_embedding_grads([model], layout)
