"""Point-to-point exchange of activations and gradients between neighbouring pipeline stages.

`exchange(sends, receives)` posts every send and receive of one schedule step as one batch
(`torch.distributed.batch_isend_irecv`) and waits for all of them. Two reasons for the batch:

- On NCCL a lone send occupies its communicator's stream until the peer posts the matching
  receive. Two neighbours that each send (an activation forward, a gradient backward) before
  receiving would wait on each other forever; posted as one batch, the sends and receives of a
  step progress together.
- NCCL ignores tags: messages between two ranks match in the order they are posted. The
  schedule (pipeline.py) puts each send and its receive in the same step on both ranks, at most
  one message per direction per step, so posting order is the only matching needed, on NCCL
  and on gloo alike (tests run gloo with the same single tag, so they check that order).

Peers are named "next" / "prev": the pipeline neighbours of the `ParallelLayout` passed in
(parallel/state.py), wrapping around from the last stage to the first, which the interleaved
schedule uses.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_llama.parallel.state import ParallelLayout

_STARTED_GROUPS: list = []  # kept alive, so an identity test cannot confuse a new group with a destroyed one


def peer_rank(peer: str, layout: ParallelLayout) -> int:
    """Global rank of the pipeline neighbour 'next' or 'prev' in `layout`."""
    if peer == "next":
        return layout.next_pipeline_rank
    if peer == "prev":
        return layout.prev_pipeline_rank
    raise ValueError(f"peer must be 'next' or 'prev', got {peer!r}")


def start_pipeline_group(layout: ParallelLayout, device: torch.device) -> None:
    """One all-reduce on the pipeline group before its first batched send/receive (every stage calls it).

    torch requires every rank of a group to take part in the group's first collective when
    that collective is a batch_isend_irecv on NCCL (it creates the communicator); a schedule
    step involves only neighbours, so the group is started with a collective of all its ranks.
    Later calls return at once.
    """
    group = layout.pipeline_group
    if group is None or any(started is group for started in _STARTED_GROUPS):
        return
    dist.all_reduce(torch.zeros(1, device=device), group=group)
    _STARTED_GROUPS.append(group)


def exchange(sends: list[tuple[torch.Tensor, str]], receives: list[tuple[torch.Tensor, str]],
             layout: ParallelLayout) -> None:
    """Send each (tensor, peer) and fill each (buffer, peer) in place, as one batch over the pipeline group of
    `layout`; returns when all are done.

    Sent tensors must stay alive and unchanged until this returns (the transport reads them).
    Call start_pipeline_group first (run_schedule does).
    """
    if not sends and not receives:
        return
    group = layout.pipeline_group
    operations = [dist.P2POp(dist.isend, tensor.contiguous(), peer_rank(peer, layout), group)
                  for tensor, peer in sends]
    operations += [dist.P2POp(dist.irecv, buffer, peer_rank(peer, layout), group) for buffer, peer in receives]
    for work in dist.batch_isend_irecv(operations):
        work.wait()
