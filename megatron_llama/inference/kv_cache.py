"""A preallocated key/value cache for incremental decoding, and the masked attention over it.

The cache holds `max_length` SLOTS per sequence and layer. Prompts are left-padded to one length, so at every
step all rows write the same slots (prefill: slots 0..L-1, then one slot per decode step) and one slot index
serves the batch, which lets a CUDA graph replay a decode step. `valid` marks the slots that hold real tokens;
a query attends to the valid slots at or before its own (padding is never seen), through an additive mask in the
cache's dtype (0 where attended, -inf elsewhere: what SDPA adds to the scores, so it converts nothing per layer).
A row's rotary position is its count of real tokens before the slot (the generator's position_ids), so padding
never shifts positions.

    cache = KVCache.for_model(model.config, model.layout, batch=4, max_length=256, device=..., dtype=...)
    cache.begin_step(real_tokens)                              # [b, s] bool: which new tokens are not padding
    logits = model.forward_with_cache(ids, position_ids, cache)  # each layer: cache.layer(i)(q, k, v)
    cache.begin_decode_step()                                  # then one real token per row and step

Static mode (`use_static_step_buffers`, for CUDA graphs): decode steps read their mask and slot from fixed
buffers, so the step's tensors never change address, and attend over the first `span` slots: the written ones
rounded up to SPAN_GRANULE, so that a graph captured for one span serves SPAN_GRANULE steps and the attention reads
about the filled part of the cache, not all of it (cuda_graph.py keeps one graph per span). Unwritten slots stay
masked. A decode step right after another only adds its own slot to the mask (three small writes, no rebuild).
"""
from __future__ import annotations

import torch

from megatron_llama.config import ModelConfig
from megatron_llama.model.attention import grouped_sdpa
from megatron_llama.parallel.state import ParallelLayout

SPAN_GRANULE = 128  # static mode: a decode step attends over the written slots rounded up to a multiple of this


class KVCache:
    """Keys and values [b, max_length, local kv heads, d] per layer, the valid-slot map and this step's mask
    over the first `span` slots."""

    def __init__(self, num_layers: int, batch: int, max_length: int, kv_heads: int, head_dim: int, *,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (batch, max_length, kv_heads, head_dim)
        # Zeros, not empty: masked slots are multiplied by zero weights, and 0 * NaN would poison the output.
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.valid = torch.zeros(batch, max_length, dtype=torch.bool, device=device)
        self.batch, self.max_length, self.length, self.span = batch, max_length, 0, 0
        self.step_slots = torch.zeros(0, dtype=torch.long, device=device)  # [s]: the slots this step writes
        # [b, 1, s, columns >= span]: 0 where a query attends, -inf elsewhere
        self.step_mask = torch.zeros(batch, 1, 0, 0, dtype=dtype, device=device)
        self.static_buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # (slots, mask) of static mode
        self.static_mask_slot: int | None = None  # the decode slot the static mask was last made for

    @classmethod
    def for_model(cls, config: ModelConfig, layout: ParallelLayout, batch: int, max_length: int, *, device,
                  dtype) -> KVCache:
        """A cache for one tensor rank's share of the key/value heads of `config`'s model built for `layout`."""
        kv_heads = config.kv_heads // layout.tensor_size
        return cls(config.num_layers, batch, max_length, kv_heads, config.head_dim, device=device, dtype=dtype)

    def reset(self) -> None:
        """Forget every cached token (the buffers keep their memory and addresses)."""
        self.valid.zero_()
        self.length = self.span = 0
        self.static_mask_slot = None

    def use_static_step_buffers(self, step_length: int = 1) -> None:
        """Static mode: steps of `step_length` tokens (the decode steps) read fixed mask and slot buffers and attend
        over the written slots rounded up to SPAN_GRANULE; steps of other lengths (the prefill) still attend over
        the written slots only."""
        device = self.valid.device
        self.static_buffers = (torch.zeros(step_length, dtype=torch.long, device=device),
                               torch.zeros(self.batch, 1, step_length, self.max_length, dtype=self.step_mask.dtype,
                                           device=device))

    def _static_span(self, end: int) -> int:
        return min(-(-end // SPAN_GRANULE) * SPAN_GRANULE, self.max_length)

    def begin_step(self, real_tokens: torch.Tensor) -> None:
        """Reserve the next s slots for a step of s tokens; real_tokens [b, s] is False at padding."""
        steps = real_tokens.shape[1]
        self._check_room(steps)
        self.static_mask_slot = None  # the mask is rebuilt here; its slots' validity is not known on the host
        device = self.valid.device
        first, end = self.length, self.length + steps
        self.valid[:, first:end] = real_tokens
        static = self.static_buffers is not None and self.static_buffers[0].shape[0] == steps
        columns = self.max_length if static else end
        query_slots = torch.arange(first, end, device=device)[:, None]  # [s, 1]
        key_slots = torch.arange(columns, device=device)[None, :]  # [1, columns]
        visible = self.valid[:, None, :columns] & (key_slots <= query_slots)  # [b, s, columns]
        # A padding query sees only itself, so no row of the softmax is empty (an empty row would give NaN).
        attended = (visible | (key_slots == query_slots)).unsqueeze(1)  # [b, 1, s, columns]
        mask = torch.zeros(attended.shape, dtype=self.step_mask.dtype, device=device)
        mask.masked_fill_(~attended, float("-inf"))
        if static:
            self.step_slots, self.step_mask = self.static_buffers
            self.step_slots.copy_(query_slots.view(-1))
            self.step_mask.copy_(mask)
        else:
            self.step_slots, self.step_mask = query_slots.view(-1), mask
        self.length = end
        self.span = self._static_span(end) if static else end

    def begin_decode_step(self) -> None:
        """Reserve the next slot for a step of one real token per row. In static mode, after another such step, the
        mask of slot p is the previous one (valid slots <= p - 1, slot p - 1 now valid) plus slot p itself."""
        slot = self.length
        static = self.static_buffers is not None and self.static_buffers[0].shape[0] == 1
        if not static or self.static_mask_slot != slot - 1:
            self.begin_step(torch.ones(self.batch, 1, dtype=torch.bool, device=self.valid.device))
        else:
            self._check_room(1)
            self.valid[:, slot] = True
            self.step_mask[:, :, :, slot] = 0.0
            self.step_slots.fill_(slot)
            self.length = slot + 1
            self.span = self._static_span(self.length)
        self.static_mask_slot = slot if static else None

    def _check_room(self, steps: int) -> None:
        if self.length + steps > self.max_length:
            raise ValueError(f"the KV cache holds {self.max_length} tokens per sequence; {self.length} are used and "
                             f"{steps} more do not fit (raise the generation's maximum length)")

    def layer(self, index: int) -> CachedAttention:
        return CachedAttention(self, index)


class CachedAttention:
    """One layer's view of the cache: store this step's k, v in their slots, attend q over the visible slots."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        keys, values = cache.keys[self.index], cache.values[self.index]
        keys.index_copy_(1, cache.step_slots, k)  # k, v: [b, s, kv_heads, d] into slots [b, max_length, ...]
        values.index_copy_(1, cache.step_slots, v)
        span = cache.span
        return masked_attention(q, keys[:, :span], values[:, :span], cache.step_mask[..., :span])


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v: q [b, s, q_heads, d], k/v [b, span, kv_heads, d], mask [b, 1, s, span]
    (0: attend, -inf: not) -> [b, s, q_heads, d]. Grouped-query: query head j reads key/value head
    j // (q_heads / kv_heads)."""
    return grouped_sdpa(q, k, v, attn_mask=mask)
