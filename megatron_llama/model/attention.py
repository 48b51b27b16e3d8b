"""Core attention backends, chosen by name (`--attention-backend sdpa|xformers|eager`).

Each backend computes causal softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017) on
q [b, s, q_heads, d] and k, v [b, s, kv_heads, d] and returns [b, s, q_heads, d]. Grouped-query
attention (Ainslie et al. 2023): query head j reads key/value head j // (q_heads / kv_heads), so
the q heads of one group sit next to each other.

- "sdpa": torch.nn.functional.scaled_dot_product_attention (FlashAttention-2, cuDNN or
  memory-efficient kernels on GPU); the default, needs nothing beyond torch.
- "xformers": xformers.ops.memory_efficient_attention, only when xformers imports and its
  kernels run (it has no CPU kernels); otherwise selecting it raises AttentionBackendError.
- "eager": plain matmul + causal mask + fp32 softmax; the reference the tests compare against.

Packed sequences (several documents in one row: --sft-packing, --reset-attention-mask) pass document ids
[b, s]: a query attends only to the keys of its own document at or before it (block-diagonal causal attention).
"sdpa" runs each document as its own sequence through torch's variable-length FlashAttention
(torch.nn.attention.varlen) on CUDA in bf16/fp16, which skips the blocks between documents, and otherwise (CPU,
fp32) SDPA with a boolean mask (`document_causal_mask`); "eager" takes the mask; "xformers" takes no document ids.
On one H200 the variable-length kernel ran the forward and backward of a layer's attention over packed rows in
1.60 ms against the mask's 3.34 ms (FlexAttention with a document block mask: 7.33 ms), measured by
`python benchmarks/bench_sft.py --attention-kernels`. Without document ids every backend runs its plain causal
path, unchanged.

Usage: `core_attention = get_core_attention("sdpa"); out = core_attention(q, k, v)` (or `(q, k, v, document_ids)`).
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
import torch.nn.functional as F

# torch >= 2.5 lets sdpa read grouped key/value heads directly; torch 2.4 needs them repeated.
_SDPA_HAS_ENABLE_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
    _VARLEN_PARAMETERS = inspect.signature(varlen_attn).parameters
except ImportError:
    varlen_attn, _VARLEN_PARAMETERS = None, {}


class AttentionBackendError(RuntimeError):
    """The chosen attention backend cannot run in this environment."""


def repeat_kv(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """[b, kv_heads, s, d] -> [b, kv_heads * repeats, s, d], each kv head repeated for its query group."""
    if repeats == 1:
        return x
    b, kv_heads, s, d = x.shape
    return x[:, :, None].expand(b, kv_heads, repeats, s, d).reshape(b, kv_heads * repeats, s, d)


def grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **mask) -> torch.Tensor:
    """torch's scaled_dot_product_attention on [b, s, heads, d] tensors whose key/value heads serve groups of query
    heads; `mask` is SDPA's own (is_causal=True, or attn_mask=[b, 1, s, span] True where attended)."""
    # [b, s, heads, d] -> [b, heads, s, d] as strided views, no copies: the fused kernels read
    # this layout directly (last dimension contiguous) and return [b, s, heads, d] memory.
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    repeats = q.shape[1] // k.shape[1]
    if repeats == 1:
        out = F.scaled_dot_product_attention(q, k, v, **mask)
    elif _SDPA_HAS_ENABLE_GQA:
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **mask)
    else:
        out = F.scaled_dot_product_attention(q, repeat_kv(k, repeats), repeat_kv(v, repeats), **mask)
    return out.transpose(1, 2)  # [b, heads, s, d] -> [b, s, heads, d]


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] document ids -> [b, 1, s, s] boolean mask, True where query i may attend key j: j <= i, same document."""
    s = document_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()  # [s, s]
    same_document = document_ids[:, :, None] == document_ids[:, None, :]  # [b, s, s]
    return (same_document & causal)[:, None]  # [b, 1, s, s], broadcast over heads


def document_bounds(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[b, s] document ids (each document one run of equal ids, as data/packing.py numbers them) -> the offsets of
    the documents in the flattened [b * s] tokens ([documents + 1], int32, rows never sharing a document) and the
    longest document's length (one host sync)."""
    b, s = document_ids.shape
    flat = (document_ids + s * torch.arange(b, device=document_ids.device)[:, None]).flatten()  # [b * s]
    starts = torch.nonzero(torch.diff(flat, prepend=flat[:1] - 1)).flatten()  # first token of each document
    bounds = torch.cat([starts, starts.new_tensor([b * s])]).to(torch.int32)
    return bounds, int(torch.diff(bounds).max())


def varlen_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              document_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal attention with every document of the rows as its own sequence of one flattened batch
    (variable-length FlashAttention): q [b, s, q_heads, d], k/v [b, s, kv_heads, d] -> [b, s, q_heads, d]."""
    b, s, heads, d = q.shape
    kv_heads = k.shape[2]
    grouped = {}
    if heads != kv_heads and "enable_gqa" in _VARLEN_PARAMETERS:
        grouped = dict(enable_gqa=True)
    elif heads != kv_heads:  # [b, s, kv_heads, d] -> [b, s, heads, d], each kv head beside its query group
        k, v = (x[:, :, :, None].expand(b, s, kv_heads, heads // kv_heads, d).flatten(2, 3) for x in (k, v))
    bounds, longest = document_bounds(document_ids)
    causal = dict(window_size=(-1, 0)) if "window_size" in _VARLEN_PARAMETERS else dict(is_causal=True)
    out = varlen_attn(q.reshape(b * s, heads, d), k.reshape(b * s, k.shape[2], d), v.reshape(b * s, v.shape[2], d),
                      bounds, bounds, longest, longest, **causal, **grouped)  # [b * s, heads, d]
    return out.view(b, s, heads, d)


def varlen_supported(q: torch.Tensor) -> bool:
    """The variable-length FlashAttention kernel exists for this tensor (CUDA, half precision, head dim <= 256)."""
    return (varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] <= 256)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   document_ids: torch.Tensor | None = None) -> torch.Tensor:
    if document_ids is None:
        return grouped_sdpa(q, k, v, is_causal=True)
    if varlen_supported(q):
        return varlen_document_attention(q, k, v, document_ids)
    return grouped_sdpa(q, k, v, attn_mask=document_causal_mask(document_ids))


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    document_ids: torch.Tensor | None = None) -> torch.Tensor:
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, s, d]
    repeats = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, repeats), repeat_kv(v, repeats)
    scores = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # [b, heads, s, s]
    s = q.shape[2]
    if document_ids is None:
        hidden = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(diagonal=1)  # the future
    else:
        hidden = ~document_causal_mask(document_ids)  # the future and other documents
    scores = scores.masked_fill(hidden, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probabilities, v).transpose(1, 2)  # [b, heads, s, d] -> [b, s, heads, d]


def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       document_ids: torch.Tensor | None = None) -> torch.Tensor:
    if document_ids is not None:
        raise AttentionBackendError("--attention-backend xformers takes no document mask; packed sequences "
                                    "(--sft-packing, --reset-attention-mask) need --attention-backend sdpa or eager")
    import xformers.ops as xops

    causal = xops.LowerTriangularMask()
    b, s, kv_heads, d = k.shape
    repeats = q.shape[2] // kv_heads
    if repeats == 1:
        return xops.memory_efficient_attention(q, k, v, attn_bias=causal)
    # Grouped layout [b, s, groups, heads per group, d]; k/v expanded with stride 0 (no copy).
    grouped_q = q.unflatten(2, (kv_heads, repeats))
    k = k[:, :, :, None].expand(b, s, kv_heads, repeats, d)
    v = v[:, :, :, None].expand(b, s, kv_heads, repeats, d)
    out = xops.memory_efficient_attention(grouped_q, k, v, attn_bias=causal)
    return out.flatten(2, 3)  # [b, s, groups, heads per group, d] -> [b, s, q_heads, d]


@functools.lru_cache(maxsize=None)
def xformers_unavailable_reason() -> str | None:
    """None when xformers imports and its causal kernel runs on this machine, else why not."""
    try:
        import xformers.ops as xops
    except Exception as error:  # noqa: BLE001 - any import failure means "unavailable"
        return f"xformers does not import ({type(error).__name__}: {error})"
    if not torch.cuda.is_available():
        return "xformers has no CPU kernels and no CUDA device is visible"
    try:
        probe = torch.zeros(1, 16, 2, 64, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(probe, probe, probe, attn_bias=xops.LowerTriangularMask())
    except Exception as error:  # noqa: BLE001 - e.g. a wheel built for another torch/CUDA loads no kernels
        return (f"xformers imports but its attention kernels do not run with torch {torch.__version__} "
                f"({type(error).__name__}: {error})")
    return None


_BACKEND_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "sdpa": sdpa_attention,
    "xformers": xformers_attention,
    "eager": eager_attention,
}
ATTENTION_BACKENDS = tuple(_BACKEND_FUNCTIONS)  # the names --attention-backend accepts


def get_core_attention(name: str) -> Callable[..., torch.Tensor]:
    """The backend function for `name`; raises AttentionBackendError when it cannot run here."""
    if name not in _BACKEND_FUNCTIONS:
        raise ValueError(f"unknown attention backend {name!r} (--attention-backend); "
                         f"choose one of {', '.join(ATTENTION_BACKENDS)}")
    if name == "xformers":
        reason = xformers_unavailable_reason()
        if reason is not None:
            raise AttentionBackendError(
                f"--attention-backend xformers is unavailable: {reason}. Use --attention-backend sdpa "
                "(the default: torch's scaled_dot_product_attention, which needs nothing beyond torch).")
    return _BACKEND_FUNCTIONS[name]
