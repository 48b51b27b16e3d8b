"""Adam with decoupled weight decay (Loshchilov & Hutter, AdamW) over two parameter groups.

Weight decay applies to matrices only: norms (weights of RMSNorm/LayerNorm) and biases, the
one-dimensional parameters, are in a group with weight_decay 0. The implementation is NVIDIA apex's
FusedAdam (adam_w_mode) when apex imports on a CUDA run, else torch.optim.AdamW, fused on CUDA;
`build_adamw` returns a sentence saying which one is in use for the log.
"""
from __future__ import annotations

import torch


def excluded_from_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights and biases are not decayed (they are the one-dimensional parameters)."""
    return param.ndim < 2 or name.endswith(".bias")


def weight_decay_groups(named_params: list[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    """[decayed matrices, undecayed norms and biases]; each group also lists its parameter names."""
    decayed = [(name, param) for name, param in named_params if not excluded_from_weight_decay(name, param)]
    undecayed = [(name, param) for name, param in named_params if excluded_from_weight_decay(name, param)]
    groups = []
    for members, decay in ((decayed, weight_decay), (undecayed, 0.0)):
        if members:
            groups.append({"params": [param for _, param in members], "names": [name for name, _ in members],
                           "weight_decay": decay})
    return groups


def _apex_fused_adam():
    try:
        from apex.optimizers import FusedAdam
    except Exception:  # noqa: BLE001 - apex missing, or built for another torch: fall back to torch
        return None
    return FusedAdam


def build_adamw(param_groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float,
                device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """AdamW over `param_groups` (names are kept in the groups) and a description of the implementation."""
    groups = [dict(group) for group in param_groups]
    if device.type == "cuda":
        fused_adam = _apex_fused_adam()
        if fused_adam is not None:
            return (fused_adam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True),
                    "optimizer: apex FusedAdam (AdamW mode)")
        return (torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True),
                "optimizer: torch.optim.AdamW(fused=True) (apex not importable)")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps), "optimizer: torch.optim.AdamW on CPU"
