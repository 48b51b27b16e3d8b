"""The Llama network (Touvron et al. 2023): embedding -> blocks -> RMSNorm -> output head.

Pre-norm blocks: h = h + Attention(RMSNorm(h)); h = h + SwiGLU(RMSNorm(h)), with rotary
position embeddings and grouped-query attention. Options: output head tied to the input
embedding (Open-Llama's shared input-output embedding) and Open-Llama's stable embedding
(a LayerNorm right after the token embedding).

It reads as a single-device model. Every linear and embedding layer is a class of
parallel/layers.py, built for the model's `layout` (parallel/state.py ParallelLayout, handed down
from the constructor), so tensor parallelism changes those classes, never this file; attention
views use -1 for the head count, so the same code runs on the local heads of any tensor
rank. A pipeline stage holds the blocks of its `layer_range` (keyed by GLOBAL index, so
parameter names never depend on the layout); a stage without the embedding takes hidden
states as input. Activations are [b, s, h] everywhere.

Usage:
    model = build_model(model_config_from_preset("tiny"), seed=1234)   # layout=: default the installed one
    logits = model(input_ids)              # [b, s] -> [b, s, padded_vocab]
    loss = model(input_ids, labels)        # per-token loss [b, s], fp32
    loss = model(input_ids, labels, position_ids, document_ids)   # packed rows: several documents each
    compile_blocks(model)                  # model/compile.py: fused elementwise kernels (CUDA default)

The elementwise work between the matmuls (norms, residual adds, rotary, SwiGLU, the cross entropy's
softmax) goes through `model.kernels` (model/compile.py: eager, or torch.compile'd regions). With labels and
`fuse_cross_entropy = True` (pretrain.py sets it on CUDA) the output head and the cross entropy run fused over
chunks of tokens (parallel/fused_cross_entropy.py), never materialising the logits in fp32; otherwise the
logits come first and vocab_parallel_cross_entropy follows (the reference path).

Packed rows (--sft-packing, --reset-position-ids, --reset-attention-mask): position_ids [b, s] restart the rotary
positions at each document and document_ids [b, s] keep attention inside each document (model/attention.py); a
row's documents then compute what each would alone. Either may be None (positions 0..s-1; plain causal attention).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from megatron_llama.config import ModelConfig
from megatron_llama.model.attention import get_core_attention
from megatron_llama.model.compile import EAGER_KERNELS, ElementwiseKernels, rms_norm
from megatron_llama.model.rotary import RotaryEmbedding
from megatron_llama.parallel import state
from megatron_llama.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_llama.parallel.fused_cross_entropy import fused_vocab_parallel_cross_entropy
from megatron_llama.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                            column_parallel_linear, enter_column_parallel_region,
                                            initialize_parameters)
from megatron_llama.parallel.state import ParallelLayout


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), computed in fp32."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, norm: Callable = rms_norm) -> torch.Tensor:
        """`norm`: the eager function, or its compiled region (model/compile.py)."""
        return norm(x, self.weight, self.eps)


def output_projection_std(config: ModelConfig) -> float:
    """std of the projections that write into the residual stream: std / sqrt(2 * layers)."""
    return config.init_method_std / math.sqrt(2.0 * config.num_layers)


class CoreAttention(nn.Module):
    """softmax(q k^T / sqrt(d)) v by the configured backend; no parameters (a module so recompute can wrap it)."""

    def __init__(self, backend: str):
        super().__init__()
        # Resolved per call (a dict lookup), so a model can be built on the meta device (checkpoint
        # tools) where the backend cannot run; build_model checks it up front.
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        if document_ids is None:
            return get_core_attention(self.backend)(q, k, v)  # [b, s, q_heads, d]
        return get_core_attention(self.backend)(q, k, v, document_ids)  # block-diagonal causal


class SelfAttention(nn.Module):
    """Fused qkv projection -> rotary -> causal core attention -> dense projection.

    qkv rows in grouped layout: for each key/value group g, [q heads of g, k_g, v_g], each head
    head_dim rows. A contiguous tensor-parallel slice of the rows therefore holds whole groups.
    """

    def __init__(self, config: ModelConfig, layout: ParallelLayout):
        super().__init__()
        d, heads, groups = config.head_dim, config.num_attention_heads, config.kv_heads
        self.head_dim = d
        self.q_heads_per_group = heads // groups
        self.qkv = ColumnParallelLinear(config.hidden_size, (heads + 2 * groups) * d, init_std=config.init_method_std,
                                        layout=layout)
        self.dense = RowParallelLinear(heads * d, config.hidden_size, init_std=output_projection_std(config),
                                       layout=layout)
        self.core_attention = CoreAttention(config.attention_backend)

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, kernels: ElementwiseKernels,
                position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        # x: [b, s, h], or the sequence shard [b, s/tp, h] that the column-parallel qkv all-gathers.
        qkv = self._grouped_qkv(x)
        cos, sin = rotary(qkv.shape[1], qkv.device, qkv.dtype)  # [s, d/2] each
        if position_ids is not None:
            cos, sin = cos[position_ids], sin[position_ids]  # [b, s, d/2]: each token at its document's position
        if document_ids is None:
            return self._attend(qkv, cos, sin, self.core_attention, kernels)
        # positional, so a recomputed core attention (model/recompute.py) replays it with the same ids
        return self._attend(qkv, cos, sin, lambda q, k, v: self.core_attention(q, k, v, document_ids), kernels)

    def forward_with_cache(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                           kernels: ElementwiseKernels = EAGER_KERNELS) -> torch.Tensor:
        """Inference: forward at each sequence's own positions (cos/sin [b, s, d/2]); `attend` (one layer of
        megatron_llama.inference.kv_cache.KVCache) stores k, v in the cache and attends over every cached slot."""
        return self._attend(self._grouped_qkv(x), cos, sin, attend, kernels)

    def _grouped_qkv(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)  # [b, s, local (heads + 2 groups) * d]
        b, s, _ = qkv.shape
        # -1 is the number of LOCAL groups: all of them at tp=1, groups/tp on each tensor rank.
        return qkv.view(b, s, -1, self.q_heads_per_group + 2, self.head_dim)  # [b, s, groups, q/g + 2, d]

    def _attend(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: Callable,
                kernels: ElementwiseKernels) -> torch.Tensor:
        b, s = qkv.shape[:2]
        # q [b, s, q_heads, d], k [b, s, kv_heads, d], both rotated and contiguous
        q, k = kernels.rotate_queries_and_keys(qkv, cos, sin, self.q_heads_per_group)
        v = qkv[:, :, :, -1]  # [b, s, kv_heads, d], strided view of qkv
        out = attention(q, k, v)  # [b, s, q_heads, d]
        return self.dense(out.reshape(b, s, -1))  # [b, s, q_heads * d] -> [b, s, h] (or [b, s/tp, h])


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, config: ModelConfig, layout: ParallelLayout):
        super().__init__()
        h, ffn = config.hidden_size, config.ffn_hidden_size
        self.gate = ColumnParallelLinear(h, ffn, init_std=config.init_method_std, layout=layout)
        self.up = ColumnParallelLinear(h, ffn, init_std=config.init_method_std, layout=layout)
        self.down = RowParallelLinear(ffn, h, init_std=output_projection_std(config), layout=layout)

    def forward(self, x: torch.Tensor, kernels: ElementwiseKernels) -> torch.Tensor:
        return self.down(kernels.swiglu(self.gate(x), self.up(x)))  # [b, s, h] -> [b, s, ffn] -> [b, s, h]


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layout: ParallelLayout):
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.norm_epsilon)
        self.attention = SelfAttention(config, layout)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.norm_epsilon)
        self.mlp = SwiGLUMLP(config, layout)

    def forward(self, hidden: torch.Tensor, rotary: RotaryEmbedding, kernels: ElementwiseKernels = EAGER_KERNELS,
                position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self._around_attention(
            hidden, lambda normed: self.attention(normed, rotary, kernels, position_ids, document_ids), kernels)

    def forward_with_cache(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend,
                           kernels: ElementwiseKernels = EAGER_KERNELS) -> torch.Tensor:
        """Inference: forward with the attention over a KV cache (SelfAttention.forward_with_cache)."""
        return self._around_attention(
            hidden, lambda normed: self.attention.forward_with_cache(normed, cos, sin, attend, kernels), kernels)

    def _around_attention(self, hidden: torch.Tensor, attention: Callable, kernels: ElementwiseKernels):
        normed = self.input_norm(hidden, kernels.rms_norm)
        hidden, normed = kernels.add_rms_norm(hidden, attention(normed), self.post_attention_norm.weight,
                                              self.post_attention_norm.eps)
        return hidden + self.mlp(normed, kernels)


class LlamaModel(nn.Module):
    """The whole network, or the part of it one pipeline stage holds.

    pre_process: this stage embeds token ids (first stage); post_process: it applies the final
    norm and output head (last stage); layer_range: global [first, last) block indices held here.
    With a tied head, a last stage without pre_process holds its own `embedding.weight` (same
    name, hence same initial values); the pipeline keeps the two copies' gradients in sync.
    `layout`: the ParallelLayout every parallel layer is built for (default: the installed one,
    parallel.state.current_layout()). The config must pass ModelConfig.check at its tensor-parallel size
    (ValueError names the flag to change). The vocabulary is padded for that size
    (ModelConfig.padded_vocab_size); with tensor parallelism the logits are this rank's vocabulary
    columns, which vocab_parallel_cross_entropy consumes without gathering.
    """

    def __init__(self, config: ModelConfig, *, layout: ParallelLayout | None = None, pre_process: bool = True,
                 post_process: bool = True, layer_range: tuple[int, int] | None = None):
        super().__init__()
        layout = layout if layout is not None else state.current_layout()
        tensor_parallel_size = layout.tensor_size
        config.check(tensor_parallel_size)
        first, last = layer_range if layer_range is not None else (0, config.num_layers)
        if not 0 <= first <= last <= config.num_layers:
            raise ValueError(f"layer_range ({first}, {last}) must lie within the model's "
                             f"{config.num_layers} layers (--num-layers)")
        self.config, self.layout, self.pre_process, self.post_process = config, layout, pre_process, post_process
        self.kernels = EAGER_KERNELS  # model/compile.compile_blocks swaps in the compiled ones
        self.fuse_cross_entropy = False
        self.layer_range = (first, last)
        self.tied_output = not config.untie_embeddings_and_output_weights
        padded_vocab = config.padded_vocab_size(tensor_parallel_size)
        h = config.hidden_size

        if pre_process or (post_process and self.tied_output):
            self.embedding = VocabParallelEmbedding(padded_vocab, h, init_std=config.init_method_std, layout=layout)
        if pre_process and config.use_stable_embedding:
            self.embedding_norm = nn.LayerNorm(h)
        self.rotary = RotaryEmbedding(config.head_dim, config.rotary_base)
        self.layers = nn.ModuleDict({str(index): TransformerBlock(config, layout) for index in range(first, last)})
        if post_process:
            self.final_norm = RMSNorm(h, config.norm_epsilon)
            if not self.tied_output:
                self.output = ColumnParallelLinear(h, padded_vocab, init_std=config.init_method_std, layout=layout)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        # token ids [b, s] -> [b, s, h], or hidden states [b, s, h] from the previous pipeline stage
        hidden = self._embed(input_ids) if self.pre_process else input_ids
        for block in self.layers.values():
            hidden = block(hidden, self.rotary, self.kernels, position_ids, document_ids)
        if not self.post_process:
            return hidden
        hidden = self.final_norm(hidden, self.kernels.rms_norm)
        if labels is not None and self.fuse_cross_entropy:
            def loss_of(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
                # hidden [b, s, h] on every tensor rank, weight [V / tp, h] -> [b, s] fp32
                return fused_vocab_parallel_cross_entropy(hidden, weight, labels, self.config.vocab_size,
                                                          self.layout.tensor_group, kernels=self.kernels)

            if self.tied_output:  # the embedding's bucket is gathered first, before any block runs
                return loss_of(enter_column_parallel_region(hidden, self.layout), self.embedding.weight)
            return self.output(hidden, weight_consumer=loss_of)  # a module call: its parameter-gather hook waits
        logits = self._logits(hidden)
        if labels is None:
            return logits
        return vocab_parallel_cross_entropy(logits, labels, self.config.vocab_size,
                                            self.layout.tensor_group)  # [b, s] fp32

    def forward_with_cache(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache,
                           last_position_only: bool = False) -> torch.Tensor:
        """Inference (megatron_llama.inference): token ids [b, s] at rotary positions position_ids [b, s]; each
        block stores its keys and values in `cache.layer(index)` (inference.kv_cache.KVCache) and attends over
        every cached slot. Returns this tensor rank's logits [b, s, padded_vocab / tp] ([b, 1, ..] for the last
        position only). The whole model only: pipeline stages decode nothing."""
        if not (self.pre_process and self.post_process):
            raise ValueError("KV-cache inference runs the whole model in one pipeline stage; load the model with "
                             "pipeline-parallel size 1")
        hidden = self._embed(input_ids)
        cos, sin = self.rotary(cache.max_length, hidden.device, hidden.dtype)  # [max_length, d/2]
        cos, sin = cos[position_ids], sin[position_ids]  # [b, s, d/2]
        for index, block in self.layers.items():
            hidden = block.forward_with_cache(hidden, cos, sin, cache.layer(int(index)), self.kernels)
        if last_position_only:
            hidden = hidden[:, -1:]  # [b, s, h] -> [b, 1, h]
        return self._logits(self.final_norm(hidden, self.kernels.rms_norm))

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(input_ids)  # [b, s] -> [b, s, h]
        return self.embedding_norm(hidden) if self.config.use_stable_embedding else hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This tensor rank's logits: [b, s, h] -> [b, s, padded_vocab / tp]."""
        if self.tied_output:  # the embedding's vocabulary rows act as a column-parallel linear's weight
            return column_parallel_linear(hidden, self.embedding.weight, self.layout)
        return self.output(hidden)


def build_model(config: ModelConfig, seed: int, *, layout: ParallelLayout | None = None,
                device: torch.device | str | None = None, dtype: torch.dtype | None = None, pre_process: bool = True,
                post_process: bool = True, layer_range: tuple[int, int] | None = None) -> LlamaModel:
    """Construct the (stage's) model for `layout` (LlamaModel's default when None) on `device`, initialise it
    layout-independently, cast to `dtype`.

    Checks first that the attention backend can run here (AttentionBackendError says why not).
    """
    get_core_attention(config.attention_backend)
    with torch.device(device if device is not None else "cpu"):
        model = LlamaModel(config, layout=layout, pre_process=pre_process, post_process=post_process,
                           layer_range=layer_range)
    initialize_parameters(model, seed, model.layout)
    if dtype is not None:
        model.to(dtype=dtype)
    return model
