"""Data parallelism: fp32 gradient buffers cut into buckets, reduced across data-parallel ranks behind backward.

DataParallelBuffers is the one owner of the fp32 main grads at every data-parallel size (dp=1 included:
no group, nothing communicated); the optimizers (optim/) only read them. Every trainable parameter's
`main_grad` (fp32) is a view into one contiguous buffer. Parameters are
laid out in REVERSE order of `model.parameters()`, the order in which backward produces their
gradients, and the buffer is cut into buckets of about `bucket_size` elements (--ddp-bucket-size;
None: one bucket), so bucket 0 is complete first.

A post-accumulate-grad hook adds each micro-batch's `param.grad` into `param.main_grad` and frees
`param.grad` (with gradient-accumulation fusion, parallel/layers.py, the linear backward has added it
already). Outside `no_sync()` (the last micro-batch of a step) the hook also marks the parameter ready; with `overlap_grad_reduce` a bucket whose parameters are all ready starts its collective at
once, asynchronously, so communication runs behind the rest of backward. `finish_grad_sync()` starts
what has not started (every bucket, without overlap: one collective per bucket after backward) and
waits for all of it. Gradient accumulation therefore communicates once per step.

The collective of a bucket is an all-reduce, or with `use_distributed_optimizer` a reduce-scatter:
data-parallel rank r then receives only shard r of each bucket, the part its optimizer updates
(ZeRO stage 1 with reduce-scattered gradients; Rajbhandari et al. 2020). Buckets are padded to a
multiple of the data-parallel size so the shards are equal. The reduction is a sum: every rank's loss is
already divided by the global batch's count (the objectives' contract), so the ranks' gradients add up to the
gradient of the global-batch loss. With the distributed optimizer and a tied
embedding split over pipeline stages, give `embedding.weight` a bucket of its own
(`separate_bucket_names`): both stages then shard it alike, so the embedding-group all-reduce after
the reduce-scatter adds matching shards.

With `use_distributed_optimizer` the parameters themselves become views into per-bucket buffers of
their dtype, laid out like the gradients: after the optimizer writes its updated shard into them,
`start_param_sync()` all-gathers each bucket in place. With `overlap_param_gather` those gathers run
asynchronously and a forward pre-hook on each module waits only for the buckets its parameters need
(buckets are gathered last-to-first, the order forward uses them).

Usage (once, before building the optimizer; the model is not wrapped, its parameter names stay):

    buffers = DataParallelBuffers(model, layout.data_group, bucket_size=40_000_000,
                                  overlap_grad_reduce=True)
    optimizer, _ = build_optimizer(model, buffers, ...)   # optim/builder.py
    optimizer.zero_grad()                                 # calls buffers.zero_grad()
    for index, micro_batch in enumerate(micro_batches):
        with buffers.no_sync() if index < len(micro_batches) - 1 else contextlib.nullcontext():
            loss_of(micro_batch).backward()
    finalize_model_grads(model, buffers, layout)          # parallel/grad_finalize.py; calls finish_grad_sync()
    optimizer.step(lr)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from megatron_llama.parallel import comm
from megatron_llama.parallel.layers import accumulate_grad_into_main_grad



@dataclass
class Bucket:
    """Whole parameters occupying one contiguous range of the gradient buffer; one collective each step."""

    index: int
    names: list[str]
    params: list[nn.Parameter]
    starts: list[int]  # each parameter's first element within the bucket
    numel: int  # elements of the parameters; the bucket is padded beyond this to padded_numel
    padded_numel: int
    grad_data: torch.Tensor  # [padded_numel] fp32 view of the gradient buffer
    param_data: torch.Tensor | None = None  # [padded_numel] the parameters' own storage (distributed optimizer)
    ready: set[int] = field(default_factory=set)  # ids of parameters whose gradient of the step is complete
    grad_work: object = None  # async collective of the gradients in flight
    grad_started: bool = False

    def shard_range(self, rank: int, size: int) -> tuple[int, int]:
        """[start, end) within the bucket of data-parallel rank `rank`'s shard."""
        shard = self.padded_numel // size
        return rank * shard, (rank + 1) * shard


def _bucket_members(named_params: list[tuple[str, nn.Parameter]], bucket_size: int | None,
                     separate_names: set[str]) -> list[list[tuple[str, nn.Parameter]]]:
    """Consecutive parameters grouped into buckets: a bucket closes once it holds `bucket_size` elements, before
    a change of dtype, and around every parameter of `separate_names` (which gets a bucket of its own)."""
    buckets: list[list[tuple[str, nn.Parameter]]] = []
    current: list[tuple[str, nn.Parameter]] = []
    current_numel = 0
    for name, param in named_params:
        if current and (name in separate_names or param.dtype != current[-1][1].dtype):
            buckets.append(current)
            current, current_numel = [], 0
        current.append((name, param))
        current_numel += param.numel()
        if (bucket_size is not None and current_numel >= bucket_size) or name in separate_names:
            buckets.append(current)
            current, current_numel = [], 0
    if current:
        buckets.append(current)
    return buckets


class DataParallelBuffers:
    """Gradient (and, for the distributed optimizer, parameter) buffers of `model` and their data-parallel syncs."""

    def __init__(self, model: nn.Module, group=None, *, bucket_size: int | None = 40_000_000,
                 overlap_grad_reduce: bool = False, use_distributed_optimizer: bool = False,
                 overlap_param_gather: bool = False, separate_bucket_names=()):
        if bucket_size is not None and bucket_size < 1:
            raise ValueError(f"--ddp-bucket-size must be a positive number of elements, got {bucket_size}")
        if overlap_param_gather and not use_distributed_optimizer:
            raise ValueError("--overlap-param-gather needs --use-distributed-optimizer (without it every rank "
                             "updates whole parameters and nothing is gathered)")
        self.group = group
        self.size = comm.group_size(group)
        self.rank = comm.group_rank(group)
        self.overlap_grad_reduce = overlap_grad_reduce
        self.use_distributed_optimizer = use_distributed_optimizer
        self.overlap_param_gather = overlap_param_gather
        named_params = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
        if not named_params:
            raise ValueError("the model has no trainable parameters to reduce gradients of")
        unknown = set(separate_bucket_names) - {name for name, _ in named_params}
        if unknown:
            raise ValueError(f"separate_bucket_names {sorted(unknown)} are not trainable parameters of the model")
        members = _bucket_members(list(reversed(named_params)), bucket_size, set(separate_bucket_names))
        padded = [-(-sum(param.numel() for _, param in bucket) // self.size) * self.size for bucket in members]
        device = named_params[0][1].device
        self.grad_buffer = torch.zeros(sum(padded), dtype=torch.float32, device=device)
        self.buckets: list[Bucket] = []
        self._bucket_of: dict[int, Bucket] = {}
        offset = 0
        for index, (bucket_members, padded_numel) in enumerate(zip(members, padded)):
            starts, start = [], 0
            for _, param in bucket_members:
                starts.append(start)
                start += param.numel()
            bucket = Bucket(index=index, names=[name for name, _ in bucket_members],
                            params=[param for _, param in bucket_members], starts=starts, numel=start,
                            padded_numel=padded_numel, grad_data=self.grad_buffer[offset:offset + padded_numel])
            offset += padded_numel
            if use_distributed_optimizer:
                bucket.param_data = torch.zeros(padded_numel, dtype=bucket.params[0].dtype, device=device)
            for param, param_start in zip(bucket.params, starts):
                end = param_start + param.numel()
                param.main_grad = bucket.grad_data[param_start:end].view_as(param)
                if bucket.param_data is not None:
                    bucket.param_data[param_start:end].copy_(param.detach().reshape(-1))
                    param.data = bucket.param_data[param_start:end].view_as(param)
                self._bucket_of[id(param)] = bucket
            self.buckets.append(bucket)
        self._sync_enabled = True
        self.grads_reduced = False  # finish_grad_sync ran since the last zero_grad
        self._param_gathers: dict[int, object] = {}  # bucket index -> async all-gather in flight
        for _, param in named_params:
            param.register_post_accumulate_grad_hook(self._on_grad_accumulated)
        if overlap_param_gather:
            for module in model.modules():
                if any(id(param) in self._bucket_of for param in module.parameters(recurse=False)):
                    module.register_forward_pre_hook(self._wait_for_params_of)

    # ---------------------------------------------------------------- gradients

    def zero_grad(self):
        """Zero every main grad (one fill) and forget the previous step's sync; call before a step's first backward."""
        if any(bucket.grad_started for bucket in self.buckets):
            raise RuntimeError("zero_grad() while gradient reductions of the step are unfinished; call "
                               "finish_grad_sync() after the last micro-batch's backward first")
        self.grad_buffer.zero_()
        self.grads_reduced = False
        for bucket in self.buckets:
            bucket.ready.clear()
            for param in bucket.params:
                param.grad = None

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate into the main grads without reducing them (all but the last
        micro-batch of a step)."""
        previous = self._sync_enabled
        self.disable_grad_sync()
        try:
            yield
        finally:
            self._sync_enabled = previous

    def disable_grad_sync(self):
        """From now on backward only accumulates (a pipeline schedule calls this before its first backward)."""
        self._sync_enabled = False

    def enable_grad_sync(self):
        """From now on a complete bucket is reduced (a pipeline schedule calls this right before its last backward)."""
        self._sync_enabled = True

    def _on_grad_accumulated(self, param: nn.Parameter):
        if self.grads_reduced:
            raise RuntimeError("a backward pass after finish_grad_sync(): call zero_grad() before the next step's "
                               "first backward")
        accumulate_grad_into_main_grad(param)
        if not self._sync_enabled:
            return
        bucket = self._bucket_of[id(param)]
        if bucket.grad_started:
            name = bucket.names[bucket.params.index(param)]
            raise RuntimeError(f"a gradient of {name} arrived after its bucket's reduction had started: run the "
                               f"backward of every micro-batch but the last inside no_sync()")
        bucket.ready.add(id(param))
        if self.overlap_grad_reduce and len(bucket.ready) == len(bucket.params):
            self._start_grad_reduction(bucket)

    def _start_grad_reduction(self, bucket: Bucket):
        bucket.grad_started = True
        if self.size == 1:
            return
        if self.use_distributed_optimizer:
            start, end = bucket.shard_range(self.rank, self.size)
            # In place: this rank's shard of the bucket receives the sum of every rank's shard.
            bucket.grad_work = comm.reduce_scatter_flat(bucket.grad_data[start:end], bucket.grad_data,
                                                         group=self.group, async_op=True)
        else:
            bucket.grad_work = dist.all_reduce(bucket.grad_data, group=self.group, async_op=True)

    def finish_grad_sync(self):
        """Start the reductions not yet started, then wait for all. Afterwards each main grad holds the data-parallel
        reduction (with the distributed optimizer: only inside this rank's shard of each bucket)."""
        if not self._sync_enabled:
            raise RuntimeError("finish_grad_sync() inside no_sync(): leave no_sync() for the last micro-batch")
        for bucket in self.buckets:
            if not bucket.grad_started:
                self._start_grad_reduction(bucket)
        for bucket in self.buckets:
            if bucket.grad_work is not None:
                bucket.grad_work.wait()
            bucket.grad_work, bucket.grad_started = None, False
            bucket.ready.clear()
        self.grads_reduced = True

    def grad_reductions_in_flight(self) -> list[int]:
        """Indices of the buckets whose reduction has started and not been waited for (for tests and logs)."""
        return [bucket.index for bucket in self.buckets if bucket.grad_started]

    # ---------------------------------------------------------------- parameters (distributed optimizer)

    def param_shard(self, bucket: Bucket) -> torch.Tensor:
        """This rank's shard of the bucket's parameter storage (the optimizer writes its update here)."""
        start, end = bucket.shard_range(self.rank, self.size)
        return bucket.param_data[start:end]

    def start_param_sync(self):
        """All-gather every bucket's parameter shards into every rank's parameters, last bucket first (the order
        forward needs them). Waits for them unless overlap_param_gather (forward pre-hooks wait then)."""
        if not self.use_distributed_optimizer:
            raise RuntimeError("parameters are all-gathered only with use_distributed_optimizer")
        self.finish_param_sync()
        if self.size == 1:
            return
        for bucket in reversed(self.buckets):
            self._param_gathers[bucket.index] = comm.all_gather_flat(bucket.param_data, self.param_shard(bucket),
                                                                      group=self.group, async_op=True)
        if not self.overlap_param_gather:
            self.finish_param_sync()

    def param_gathers_in_flight(self) -> list[int]:
        """Indices of the buckets whose parameter all-gather has started and not been waited for."""
        return sorted(self._param_gathers)

    def finish_param_sync(self, first_bucket: int = 0):
        """Wait for the parameter all-gathers of buckets `first_bucket` and after (all of them by default)."""
        for index in sorted(self._param_gathers, reverse=True):
            if index >= first_bucket:
                self._param_gathers.pop(index).wait()

    def _wait_for_params_of(self, module: nn.Module, args):
        if not self._param_gathers:
            return
        # Gathers were started last bucket first, the order forward consumes them: everything up to the
        # module's earliest bucket is due (this also covers parameters read without calling their module,
        # like a tied output head reading the embedding's weight).
        first = min(self._bucket_of[id(param)].index for param in module.parameters(recurse=False)
                    if id(param) in self._bucket_of)
        self.finish_param_sync(first)
