"""The model's decode step captured as CUDA graphs (GPU only), replayed for every generated token.

At batch 1 a decode step launches a few hundred small kernels; replaying them as one graph removes the
launch gaps. A graph is captured for one batch size, one cache and one attended span: the token ids and positions
are copied into fixed input buffers, the cache runs in static mode (kv_cache.KVCache.use_static_step_buffers: the
step's mask and slot live in fixed buffers, and it attends over the written slots rounded up to
kv_cache.SPAN_GRANULE), and the logits land in the graph's own output buffer. The graph of a span is captured the
first time a decode step needs it (max_length / SPAN_GRANULE graphs at most, sharing one memory pool).

    decoder = CudaGraphDecoder(model, cache)          # captures nothing yet
    cache.begin_decode_step()                         # fills the static mask and slot buffers, sets cache.span
    logits = decoder(ids, position_ids)               # [b, 1] each -> [b, 1, padded_vocab / tp] (the graph's buffer)

Not exercised by the CPU test suite: CUDA graphs need a GPU.
"""
from __future__ import annotations

import torch

from megatron_llama.inference.kv_cache import KVCache

WARMUP_STEPS = 2  # eager runs on a side stream before a capture: lazy initialisation must not be captured


class CudaGraphDecoder:
    """model.forward_with_cache for one token per row, as replayable CUDA graphs over `cache`, one per span."""

    def __init__(self, model: torch.nn.Module, cache: KVCache):
        if cache.valid.device.type != "cuda":
            raise ValueError("CUDA graphs need the model and the KV cache on a CUDA device; decode eagerly on CPU")
        device = cache.valid.device
        self.model, self.cache = model, cache
        cache.use_static_step_buffers(1)
        self.ids = torch.zeros(cache.batch, 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(cache.batch, 1, dtype=torch.long, device=device)
        self.memory_pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # span -> (graph, its logits)

    def __call__(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.position_ids.copy_(position_ids)
        if self.cache.span not in self.graphs:
            self.graphs[self.cache.span] = self._capture()
        graph, logits = self.graphs[self.cache.span]
        graph.replay()
        return logits

    def _capture(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up and capture on this step's own inputs: the warm-up runs write the keys and values of the slot
        this step writes, the very values the replay then writes again, and read nothing they change."""
        stream = torch.cuda.current_stream(self.ids.device)
        side_stream = torch.cuda.Stream(self.ids.device)
        side_stream.wait_stream(stream)
        with torch.cuda.stream(side_stream):
            for _ in range(WARMUP_STEPS):
                self.model.forward_with_cache(self.ids, self.position_ids, self.cache)
        stream.wait_stream(side_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.memory_pool):
            logits = self.model.forward_with_cache(self.ids, self.position_ids, self.cache)
        return graph, logits
