"""Rotary position embeddings (RoFormer, Su et al. 2021), rotate-half convention.

Position p rotates each pair (x_i, x_{i + d/2}) of a head vector by the angle
p * theta_i, theta_i = base^(-2i/d). Pairing dimension i with i + d/2 ("rotate half") is the
convention of Hugging Face's LlamaForCausalLM, so query/key weights map to it unpermuted.

Usage: `cos, sin = rotary(seq_len, device, dtype)` once per forward, then
`apply_rotary(x, cos, sin)` on every query/key tensor of shape [b, s, ..., d].
"""
from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """cos/sin tables of the rotation angles, computed in fp32 and cached per sequence length."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim} "
                             "(hidden size / attention heads)")
        self.head_dim, self.base = head_dim, base
        # Plain dict, not buffers: model.to(bfloat16) would otherwise round the angles of far positions.
        self._fp32_tables: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._cast_tables: dict[tuple[int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _fp32(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (seq_len, device)
        if key not in self._fp32_tables:
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32)
            inverse_frequencies = 1.0 / (self.base ** (exponents / self.head_dim))  # [d/2]
            positions = torch.arange(seq_len, device=device, dtype=torch.float32)  # [s]
            angles = torch.outer(positions, inverse_frequencies)  # [s, d/2]
            self._fp32_tables[key] = (angles.cos(), angles.sin())
        return self._fp32_tables[key]

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [s, d/2] in `dtype` (the activations' dtype, as Hugging Face does)."""
        device = torch.device(device)
        key = (seq_len, device, dtype)
        if key not in self._cast_tables:
            cos, sin = self._fp32(seq_len, device)
            self._cast_tables[key] = (cos.to(dtype), sin.to(dtype))
        return self._cast_tables[key]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [b, s, *heads, d] by cos/sin [s, d/2] (every sequence at positions 0..s-1), or by cos/sin
    [b, s, d/2] (each sequence at its own positions: KV-cache decoding); returns a new contiguous tensor of x's shape.

    With x = (x1, x2) split in halves: (x1 cos - x2 sin, x2 cos + x1 sin), which equals
    x * cat(cos, cos) + rotate_half(x) * cat(sin, sin) without materialising rotate_half.
    """
    broadcast_shape = cos.shape[:-1] + (1,) * (x.dim() - 3) + cos.shape[-1:]  # [(b,) s, 1.., d/2]
    cos, sin = cos.view(broadcast_shape), sin.view(broadcast_shape)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
