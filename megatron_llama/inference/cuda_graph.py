"""One decode step of the model captured as a CUDA graph (GPU only), replayed for every generated token.

At batch 1 a decode step launches a few hundred small kernels; replaying them as one graph removes the
launch gaps. The graph is captured for one batch size and one cache: the token ids and positions are copied into
fixed input buffers, the cache runs in static mode (kv_cache.KVCache.use_static_step_buffers: every step
attends over all slots through a mask held in a fixed buffer), and the logits land in a fixed output buffer.

    decoder = CudaGraphDecoder(model, cache)          # captures; the cache is empty afterwards
    cache.begin_step(real_tokens)                     # fills the static mask and slot buffers
    logits = decoder(ids, position_ids)               # [b, 1] each -> [b, 1, padded_vocab / tp] (reused buffer)

Not exercised by the CPU test suite: CUDA graphs need a GPU.
"""
from __future__ import annotations

import torch

from megatron_llama.inference.kv_cache import KVCache

WARMUP_STEPS = 2  # eager runs on a side stream before the capture: lazy initialisation must not be captured


class CudaGraphDecoder:
    """model.forward_with_cache for one token per row, as a replayable CUDA graph over `cache`."""

    def __init__(self, model: torch.nn.Module, cache: KVCache):
        if cache.valid.device.type != "cuda":
            raise ValueError("CUDA graphs need the model and the KV cache on a CUDA device; decode eagerly on CPU")
        device = cache.valid.device
        cache.use_static_step_buffers(1)
        self.ids = torch.zeros(cache.batch, 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(cache.batch, 1, dtype=torch.long, device=device)
        real = torch.ones(cache.batch, 1, dtype=torch.bool, device=device)
        side_stream = torch.cuda.Stream(device)
        side_stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side_stream):
            for _ in range(WARMUP_STEPS):
                cache.reset()
                cache.begin_step(real)
                model.forward_with_cache(self.ids, self.position_ids, cache)
        torch.cuda.current_stream(device).wait_stream(side_stream)
        cache.reset()
        cache.begin_step(real)  # points the cache at its static buffers, which the graph reads
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.forward_with_cache(self.ids, self.position_ids, cache)
        cache.reset()

    def __call__(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.position_ids.copy_(position_ids)
        self.graph.replay()
        return self.logits
