"""Pipeline schedules: no pipelining, 1F1B, and interleaved 1F1B, behind one call.

    losses = run_schedule(model_chunks, micro_batches, loss_fn, layout=layout, forward_step=forward_step,
                          num_micro_batches=m, micro_batch_size=b, seq_length=s, hidden_size=h,
                          dtype=torch.bfloat16)

`model_chunks` are this rank's model chunks and `forward_step(chunk, received input or None,
micro-batch or None)` runs one of them; both come from the caller (for the Llama:
model/stage_model.py), so nothing here knows the model; `layout` (parallel/state.py) is this
rank's place in the pipeline. The schedule follows from its pipeline size p and the number of
chunks v:

    p = 1          no pipelining: forward and backward of each micro-batch in turn (gradient accumulation)
    p > 1, v = 1   1F1B (Narayanan et al. 2021, "PipeDream-Flush"): rank r runs min(p - r - 1, m)
                   warm-up forwards, then alternates one forward and one backward, then runs the
                   remaining backwards. At most p - r micro-batches wait for their backward, so a
                   stage holds at most p sets of activations, whatever m.
    p > 1, v > 1   interleaved 1F1B (same paper, section 2.2): each rank holds v model chunks
                   (stages.py); forwards go through the chunks in groups of p micro-batches, so m
                   must be a multiple of p. Warm-up: 2 (p - r - 1) + (v - 1) p forwards (all of
                   them when m == p). The bubble shrinks by v at the price of more activations.

How a step runs. Each rank's compute order (`compute_order`) is a list of forward and backward
actions. `build_plans` plays all ranks' orders against each other in unit time ticks: in a tick
each rank runs its next action if its input has arrived, and whatever it produces is received
by its neighbour in the same tick. A rank's plan is its sequence of ticks, each an action (or
none) followed by one batched exchange (p2p.py) of the sends and receives of that tick. Every
send therefore meets its receive in the same exchange step on both ranks, and each pair of
ranks carries at most one message per direction per step, so messages match in posting order
(the only order NCCL knows) and no rank can wait on another in a cycle. The play-out ends after
2 (m v + p - 1) ticks, the ideal (fill and drain of p - 1 chunk-steps each way), so the pairing
adds no bubble; with F and B of equal cost that is a bubble fraction of (p - 1) / (m v + p - 1).

Freeing sent outputs. Once a stage's output has been sent, its values are needed by nobody on
this rank: the next stage has its own copy, and this rank's backward needs only the autograd
graph hanging off the output (its grad_fn and the tensors that graph saved, such as the input
of each norm and matmul), never the output's own data. So right after the send the output's
storage is swapped for one element expanded to the same shape (`release_storage`): autograd
still checks the incoming gradient against that shape, and the memory of one [b, s/tp, h]
activation per micro-batch in flight is returned (64 MiB per micro-batch for b=4, s=2048,
h=4096 in bf16 at tp=1).

Loss and gradients. On the last stage `loss_fn(output, micro_batch)` returns the scalar that is
back-propagated (e.g. sum of per-token losses / tokens in the global batch, so that the
micro-batches add up to the global-batch mean); its detached value is returned per micro-batch,
only there. `scale_loss` (e.g. the fp16 loss scaler) multiplies it before backward.
`before_last_backward` runs right before the rank's last backward (a data-parallel reduction
that overlaps backward turns its gradient sync on there); `after_last_backward` runs once the
rank's last backward is done and its gradient sent on, so a data-parallel gradient reduction
started there begins only once every micro-batch has added its gradient.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from megatron_llama.parallel import comm, p2p
from megatron_llama.parallel.stages import is_first_chunk, is_last_chunk
from megatron_llama.parallel.state import ParallelLayout

FORWARD, BACKWARD = "forward", "backward"
ACTIVATION, GRADIENT = "activation", "gradient"


@dataclass(frozen=True)
class Action:
    kind: str  # FORWARD or BACKWARD
    chunk: int  # model chunk on this rank (the virtual pipeline rank)
    micro_batch: int


@dataclass(frozen=True)
class Transfer:
    direction: str  # "send" or "recv"
    what: str  # ACTIVATION (flows to the next stage) or GRADIENT (flows to the previous one)
    peer: str  # "next" or "prev" (p2p.peer_rank)
    chunk: int  # this rank's chunk the tensor belongs to: producer when sending, consumer when receiving
    micro_batch: int


@dataclass(frozen=True)
class Step:
    tick: int  # unit-time slot in build_plans' play-out (the same tick on two ranks pairs their exchanges)
    action: Action | None  # None: this rank only exchanges in this tick
    transfers: tuple[Transfer, ...]  # exchanged as one batch after the action


@dataclass
class ScheduleStats:
    """Filled by run_schedule when passed: what one call did on this rank."""

    max_live_activations: int = 0  # most micro-batch outputs waiting for their backward at once
    exchanges: int = 0  # batched send/receive steps
    forwards: int = 0
    backwards: int = 0


# ---------------------------------------------------------------- the schedules, as data

def check_micro_batch_count(num_micro_batches: int, pipeline_size: int, num_chunks: int) -> None:
    """ValueError naming the numbers to change when a schedule cannot run this many micro-batches."""
    if num_micro_batches < 1:
        raise ValueError(f"the number of micro-batches must be at least 1, got {num_micro_batches} (global batch "
                         f"/ (micro batch x data-parallel size))")
    if num_chunks > 1 and pipeline_size == 1:
        raise ValueError(f"{num_chunks} model chunks per rank need a pipeline of at least 2 stages; drop "
                         f"--num-layers-per-virtual-pipeline-stage or raise --pipeline-model-parallel-size")
    if num_chunks > 1 and num_micro_batches % pipeline_size:
        below = num_micro_batches // pipeline_size * pipeline_size
        choices = " or ".join(str(count) for count in (below, below + pipeline_size) if count > 0)
        raise ValueError(f"the interleaved schedule needs the number of micro-batches (global batch / (micro "
                         f"batch x data-parallel size) = {num_micro_batches}) to be a multiple of "
                         f"--pipeline-model-parallel-size {pipeline_size}; change --global-batch-size so that it "
                         f"gives {choices} micro-batches, or drop --num-layers-per-virtual-pipeline-stage")


def schedule_name(pipeline_size: int, num_chunks: int) -> str:
    if pipeline_size == 1:
        return "no pipelining"
    return "1F1B" if num_chunks == 1 else f"interleaved 1F1B ({num_chunks} chunks per rank)"


def _slot(k: int, pipeline_size: int, num_chunks: int, kind: str) -> tuple[int, int]:
    """(chunk, micro-batch) of the k-th forward or backward on a rank: groups of p micro-batches per chunk."""
    if num_chunks == 1:
        return 0, k
    group, position = divmod(k, pipeline_size)
    chunk = group % num_chunks
    micro_batch = group // num_chunks * pipeline_size + position
    return (chunk if kind == FORWARD else num_chunks - 1 - chunk), micro_batch


def warmup_forwards(rank: int, pipeline_size: int, num_chunks: int, num_micro_batches: int) -> int:
    """Forwards a rank runs before its first backward."""
    total = num_micro_batches * num_chunks
    if num_chunks == 1:
        return min(pipeline_size - rank - 1, num_micro_batches)
    if num_micro_batches == pipeline_size:
        return total
    return min(2 * (pipeline_size - rank - 1) + (num_chunks - 1) * pipeline_size, total)


def compute_order(rank: int, pipeline_size: int, num_chunks: int, num_micro_batches: int,
                  forward_only: bool = False) -> list[Action]:
    """The forward and backward actions of one rank, in the order it runs them."""
    total = num_micro_batches * num_chunks
    forwards = [Action(FORWARD, *_slot(k, pipeline_size, num_chunks, FORWARD)) for k in range(total)]
    if forward_only:
        return forwards
    backwards = [Action(BACKWARD, *_slot(k, pipeline_size, num_chunks, BACKWARD)) for k in range(total)]
    warmup = warmup_forwards(rank, pipeline_size, num_chunks, num_micro_batches)
    order = forwards[:warmup]
    for k in range(total - warmup):
        order += [forwards[warmup + k], backwards[k]]
    return order + backwards[total - warmup:]


def _needs(action: Action, rank: int, pipeline_size: int, num_chunks: int) -> tuple | None:
    """What an action must have received first: (what, chunk, micro-batch), or None (data or the loss)."""
    if action.kind == FORWARD:
        first = is_first_chunk(rank, action.chunk)
        return None if first else (ACTIVATION, action.chunk, action.micro_batch)
    last = is_last_chunk(rank, action.chunk, pipeline_size, num_chunks)
    return None if last else (GRADIENT, action.chunk, action.micro_batch)


def _destination(action: Action, rank: int, pipeline_size: int, num_chunks: int) -> tuple[int, int] | None:
    """(rank, chunk) that consumes what an action produces; None when nothing leaves the rank."""
    if action.kind == FORWARD:
        if rank < pipeline_size - 1:
            return rank + 1, action.chunk
        return (0, action.chunk + 1) if action.chunk < num_chunks - 1 else None  # last stage of chunk c -> c + 1
    if rank > 0:
        return rank - 1, action.chunk
    return (pipeline_size - 1, action.chunk - 1) if action.chunk > 0 else None


@functools.lru_cache(maxsize=32)
def build_plans(pipeline_size: int, num_chunks: int, num_micro_batches: int,
                forward_only: bool = False) -> tuple[tuple[Step, ...], ...]:
    """Every rank's steps (module docstring: ranks play their compute orders in unit-time ticks)."""
    check_micro_batch_count(num_micro_batches, pipeline_size, num_chunks)
    p, v = pipeline_size, num_chunks
    orders = [compute_order(rank, p, v, num_micro_batches, forward_only) for rank in range(p)]
    position = [0] * p
    arrived: list[set] = [set() for _ in range(p)]
    plans: list[list[Step]] = [[] for _ in range(p)]
    tick = 0
    while any(position[rank] < len(orders[rank]) for rank in range(p)):
        acted: list[Action | None] = [None] * p
        for rank in range(p):
            if position[rank] == len(orders[rank]):
                continue
            action = orders[rank][position[rank]]
            need = _needs(action, rank, p, v)
            if need is None or need in arrived[rank]:
                arrived[rank].discard(need)
                acted[rank] = action
                position[rank] += 1
        if not any(acted):
            raise RuntimeError(f"pipeline schedule stalls at p={p}, v={v}, m={num_micro_batches}: ranks wait at "
                               f"actions {[orders[r][position[r]] for r in range(p) if position[r] < len(orders[r])]}"
                               f" (a bug in parallel/pipeline.py)")
        transfers: list[list[Transfer]] = [[] for _ in range(p)]
        for rank, action in enumerate(acted):
            destination = _destination(action, rank, p, v) if action is not None else None
            if destination is None:
                continue
            to_rank, to_chunk = destination
            what, towards, back = (ACTIVATION, "next", "prev") if action.kind == FORWARD else (GRADIENT, "prev", "next")
            transfers[rank].append(Transfer("send", what, towards, action.chunk, action.micro_batch))
            transfers[to_rank].append(Transfer("recv", what, back, to_chunk, action.micro_batch))
            arrived[to_rank].add((what, to_chunk, action.micro_batch))  # usable from the next tick on
        for rank in range(p):
            if acted[rank] is not None or transfers[rank]:
                plans[rank].append(Step(tick, acted[rank], tuple(transfers[rank])))
        tick += 1
    return tuple(tuple(plan) for plan in plans)


# ---------------------------------------------------------------- running a plan

def release_storage(output: torch.Tensor) -> None:
    """Free an output's data but keep its shape and autograd graph (module docstring: 'Freeing sent outputs')."""
    if output._base is not None:  # a view shares storage with its base: swapping would free nothing
        return
    output.data = torch.empty(1, dtype=output.dtype, device=output.device).expand(output.shape)


class _MicroBatchSource:
    """Micro-batches by index, drawn in order from a list or an iterator and kept until the schedule ends: every
    forward of micro-batch i, on any stage and chunk, reads item i (per-token inputs such as a packed row's document
    ids reach the middle stages too). A stage given None gets None."""

    def __init__(self, micro_batches, count: int):
        self.iterator, self.count, self.drawn = iter(micro_batches) if micro_batches is not None else None, count, []

    def get(self, index: int):
        if self.iterator is None:
            return None
        while len(self.drawn) <= index:
            try:
                self.drawn.append(next(self.iterator))
            except StopIteration:
                raise ValueError(f"micro_batches ran out after {len(self.drawn)} items; num_micro_batches is "
                                 f"{self.count}") from None
        return self.drawn[index]


class _StageRunner:
    """Runs one rank's plan: the model chunks, the tensors in flight, and the schedule's bookkeeping."""

    def __init__(self, model_chunks, data: _MicroBatchSource, loss_fn, forward_step, scale_loss,
                 forward_only: bool, stats: ScheduleStats, layout: ParallelLayout):
        self.model_chunks, self.data, self.loss_fn, self.forward_step = model_chunks, data, loss_fn, forward_step
        self.scale_loss, self.forward_only, self.stats, self.layout = scale_loss, forward_only, stats, layout
        self.rank, self.pipeline_size = layout.pipeline_rank, layout.pipeline_size
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}  # (chunk, micro-batch) -> received activation
        self.output_grads: dict[tuple[int, int], torch.Tensor] = {}  # (chunk, micro-batch) -> received gradient
        self.waiting: dict[tuple[int, int], tuple] = {}  # (chunk, micro-batch) -> (input, output) until backward
        self.losses: list[torch.Tensor] = []

    def is_first(self, chunk: int) -> bool:
        return is_first_chunk(self.rank, chunk)

    def is_last(self, chunk: int) -> bool:
        return is_last_chunk(self.rank, chunk, self.pipeline_size, len(self.model_chunks))

    def forward(self, action: Action) -> torch.Tensor | None:
        """Run a forward; returns the output to send (None on the last stage, which keeps the loss)."""
        key, first, last = (action.chunk, action.micro_batch), self.is_first(action.chunk), self.is_last(action.chunk)
        micro_batch = self.data.get(action.micro_batch)
        if micro_batch is None and (first or last):
            raise ValueError("the first and last pipeline stages need the micro-batches; pass them to run_schedule")
        input_tensor = None if first else self.inputs.pop(key)
        with torch.set_grad_enabled(not self.forward_only):
            output = self.forward_step(self.model_chunks[action.chunk], input_tensor, micro_batch)
            if last:
                output = self.loss_fn(output, micro_batch)
                self.losses.append(output.detach())
                if self.scale_loss is not None and not self.forward_only:
                    output = self.scale_loss(output)
        if not self.forward_only:
            self.waiting[key] = (input_tensor, output)
            self.stats.max_live_activations = max(self.stats.max_live_activations, len(self.waiting))
        self.stats.forwards += 1
        return None if last else output

    def backward(self, action: Action) -> torch.Tensor | None:
        """Run a backward; returns the input's gradient to send (None on the first stage)."""
        key = (action.chunk, action.micro_batch)
        input_tensor, output = self.waiting.pop(key)
        output_grad = None if self.is_last(action.chunk) else self.output_grads.pop(key)
        torch.autograd.backward(output, grad_tensors=output_grad)
        self.stats.backwards += 1
        return None if self.is_first(action.chunk) else input_tensor.grad

    def exchange(self, step: Step, produced: torch.Tensor | None, shape: tuple, dtype, device) -> None:
        """The step's batched sends and receives; frees a sent output (module docstring)."""
        sends = [(produced, transfer.peer) for transfer in step.transfers if transfer.direction == "send"]
        received = [(transfer, torch.empty(shape, dtype=dtype, device=device))
                    for transfer in step.transfers if transfer.direction == "recv"]
        if not sends and not received:
            return
        p2p.exchange(sends, [(buffer, transfer.peer) for transfer, buffer in received], self.layout)
        self.stats.exchanges += 1
        if sends and step.action.kind == FORWARD and not self.forward_only:
            release_storage(produced)
        for transfer, buffer in received:
            key = (transfer.chunk, transfer.micro_batch)
            if transfer.what == ACTIVATION:
                self.inputs[key] = buffer.requires_grad_(not self.forward_only)
            else:
                self.output_grads[key] = buffer


def run_schedule(model_chunks: list[nn.Module], micro_batches: Iterable | None,
                 loss_fn: Callable[[torch.Tensor, object], torch.Tensor], *, layout: ParallelLayout,
                 forward_step: Callable[[nn.Module, torch.Tensor | None, object], torch.Tensor],
                 num_micro_batches: int, micro_batch_size: int, seq_length: int, hidden_size: int,
                 dtype: torch.dtype, device: torch.device | None = None, forward_only: bool = False,
                 scale_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 before_last_backward: Callable[[], None] | None = None,
                 after_last_backward: Callable[[], None] | None = None,
                 stats: ScheduleStats | None = None) -> list[torch.Tensor]:
    """Forward (and, unless forward_only, backward) `num_micro_batches` micro-batches through the pipeline of
    `layout` (this rank's stage of it).

    micro_batches: whatever forward_step and loss_fn read (e.g. dicts of "tokens" and "labels"), drawn in
    order; the first and last stages need them, a middle stage may pass None (its forward_step then gets None).
    forward_step(chunk, received input or None, micro-batch or None) runs a chunk: the first stage gets no
    input; the last stage's output goes to loss_fn(output, micro-batch).
    seq_length and hidden_size are the full sizes: the exchanged activations are [b, s, h], or [b, s/tp, h]
    under sequence parallelism. Gradients accumulate into the parameters (zero them before). Returns the
    detached loss_fn value of every micro-batch on the last stage, [] on the others.
    """
    pipeline_size = layout.pipeline_size
    plan = build_plans(pipeline_size, len(model_chunks), num_micro_batches, forward_only)[layout.pipeline_rank]
    device = device or next(model_chunks[0].parameters()).device
    sequence = seq_length // layout.tensor_size if layout.sequence_parallel else seq_length
    shape = (micro_batch_size, sequence, hidden_size)  # [b, s, h], or the sequence shard [b, s/tp, h]
    data = _MicroBatchSource(micro_batches, num_micro_batches)
    runner = _StageRunner(model_chunks, data, loss_fn, forward_step, scale_loss, forward_only,
                          stats if stats is not None else ScheduleStats(), layout)
    last_backward = max((index for index, step in enumerate(plan) if step.action and step.action.kind == BACKWARD),
                        default=None)
    if pipeline_size > 1:
        p2p.start_pipeline_group(layout, device)
    for index, step in enumerate(plan):
        produced = None  # what this step's action sends on
        if step.action is not None:
            if step.action.kind == FORWARD:
                produced = runner.forward(step.action)
            else:
                if index == last_backward and before_last_backward is not None:
                    before_last_backward()
                produced = runner.backward(step.action)
        runner.exchange(step, produced, shape, dtype, device)
        if index == last_backward and after_last_backward is not None:
            after_last_backward()  # after the exchange, so the previous stage gets its last gradient first
    return runner.losses


def broadcast_from_last_stage(value: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """Copy a tensor the last stage computed (e.g. the summed loss) to every stage of the pipeline of `layout`,
    in place.

    Other stages pass a tensor of the same shape and dtype to receive into; sums it over the
    pipeline group with zeros from every stage but the last.
    """
    if not layout.is_last_stage:
        value.zero_()
    return comm.all_reduce(value, layout.pipeline_group)
