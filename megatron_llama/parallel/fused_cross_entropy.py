"""Output head and vocabulary-parallel cross entropy in one, over chunks of tokens.

    loss = fused_vocab_parallel_cross_entropy(hidden, weight, labels, vocab_size, layout.tensor_group)
    # hidden [b, s, h] (already gathered / copied into the tensor-parallel region), weight [V / tp, h]
    # (this rank's vocabulary rows), labels [b, s] -> per-token loss [b, s] fp32

equals `vocab_parallel_cross_entropy(hidden @ weight^T, labels, vocab_size, tensor_group)`
(parallel/cross_entropy.py has the math) without ever holding fp32 logits of the whole batch. Forward walks the tokens in chunks of
`chunk_tokens`: each chunk's logits [c, V / tp] are computed in the model dtype, reduced to per-token
statistics (log-sum-exp over this rank's real columns, the target's logit), the statistics combined over
tensor ranks (all-reduce MAX of the log-sum-exps, then one all-reduce SUM of the rescaled sums and target
logits), and the chunk's d loss / d logits = softmax - one_hot written in the model dtype; the chunk's
logits are then dropped. Backward is two matmuls over all tokens with that saved gradient, each token's
row scaled by its incoming loss gradient:

    grad_hidden = g * (D @ W)        grad_weight = D^T @ (g * hidden)        (g [T, 1], D [T, V / tp])

so it is exact for any per-token loss weighting, and memory holds D (the size of the model-dtype logits)
instead of fp32 logits and softmax. Vocabulary padding columns are left out of the statistics and get zero
gradient; a label of -100 gives loss 0 and no gradient. The two elementwise steps are plain functions
(`cross_entropy_statistics`, `write_cross_entropy_grad`) that model/compile.py hands in compiled.
"""
from __future__ import annotations

import types

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_llama.parallel import comm
from megatron_llama.parallel.cross_entropy import IGNORE_INDEX

DEFAULT_CHUNK_TOKENS = 4096


def cross_entropy_statistics(logits: torch.Tensor, local_labels: torch.Tensor,
                             label_here: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-sum-exp over these (real, unpadded) columns and the target's logit where this rank holds it.

    logits [t, v], local_labels [t] (a column index; any valid one where not label_here), label_here [t] bool
    -> log_sum_exp [t] fp32, target_logit [t] fp32 (0 where not label_here).
    """
    logits = logits.float()
    target = logits.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1)
    return torch.logsumexp(logits, dim=-1), torch.where(label_here, target, 0.0)


def write_cross_entropy_grad(out: torch.Tensor, logits: torch.Tensor, log_sum_exp: torch.Tensor,
                             local_labels: torch.Tensor, label_here: torch.Tensor, ignored: torch.Tensor) -> None:
    """out[t, j] = softmax(logits)[t, j] - [j == label of t], 0 on ignored tokens: d loss_t / d logit_tj.

    out [t, width] (columns past the logits' v are vocabulary padding and get 0), logits [t, v], log_sum_exp [t]
    over the whole vocabulary (every tensor rank), local_labels / label_here / ignored [t].
    """
    columns = torch.arange(logits.shape[-1], device=logits.device)
    is_target = (columns == local_labels.unsqueeze(-1)) & label_here.unsqueeze(-1)  # [t, v]
    grad = torch.exp(logits.float() - log_sum_exp.unsqueeze(-1)) - is_target.float()
    grad = torch.where(ignored.unsqueeze(-1), 0.0, grad)
    out.copy_(F.pad(grad, (0, out.shape[-1] - logits.shape[-1])))


EAGER_CROSS_ENTROPY_KERNELS = types.SimpleNamespace(cross_entropy_statistics=cross_entropy_statistics,
                                                    write_cross_entropy_grad=write_cross_entropy_grad)


def _combine_over_tensor_ranks(log_sum_exp: torch.Tensor, target_logit: torch.Tensor,
                               group) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-vocabulary log-sum-exp and target logit from every rank's partial ones ([t] fp32 each)."""
    top = comm.all_reduce(log_sum_exp.clone(), group, op=dist.ReduceOp.MAX)  # [t]; finite: every rank has columns
    sums = comm.all_reduce(torch.stack([torch.exp(log_sum_exp - top), target_logit]), group)  # [2, t]
    return top + torch.log(sums[0]), sums[1]


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_size, group, chunk_tokens, kernels, need_grad):
        # hidden [T, h], weight [V_local, h], labels [T] -> loss [T] fp32
        local_width = weight.shape[0]
        vocab_start = comm.group_rank(group) * local_width
        real_columns = max(0, min(local_width, vocab_size - vocab_start))  # columns left of the padding
        ignored = labels == IGNORE_INDEX
        label_here = (labels >= vocab_start) & (labels < vocab_start + real_columns)
        local_labels = (labels - vocab_start).masked_fill(~label_here, 0)
        tensor_parallel = comm.group_size(group) > 1
        loss = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
        grad_logits = torch.empty(hidden.shape[0], local_width, dtype=hidden.dtype, device=hidden.device) \
            if need_grad else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logits = hidden[rows] @ weight[:real_columns].t()  # [c, real_columns], model dtype
            if real_columns:
                log_sum_exp, target_logit = kernels.cross_entropy_statistics(logits, local_labels[rows],
                                                                             label_here[rows])
            else:  # a rank holding only vocabulary padding: nothing to add to the sums
                log_sum_exp = torch.full(logits.shape[:1], float("-inf"), device=logits.device)
                target_logit = torch.zeros(logits.shape[:1], device=logits.device)
            if tensor_parallel:
                log_sum_exp, target_logit = _combine_over_tensor_ranks(log_sum_exp, target_logit, group)
            loss[rows] = (log_sum_exp - target_logit).masked_fill(ignored[rows], 0.0)
            if need_grad:
                kernels.write_cross_entropy_grad(grad_logits[rows], logits, log_sum_exp, local_labels[rows],
                                                 label_here[rows], ignored[rows])
        ctx.save_for_backward(hidden, weight, grad_logits)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, grad_logits = ctx.saved_tensors
        if grad_logits is None:
            raise RuntimeError("backward through a fused cross entropy computed without gradients (need_grad=False)")
        scale = grad_loss.unsqueeze(-1)  # [T, 1] fp32
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = ((grad_logits @ weight).float() * scale).to(hidden.dtype)  # [T, h]
        if ctx.needs_input_grad[1]:
            grad_weight = grad_logits.t() @ (hidden.float() * scale).to(hidden.dtype)  # [V_local, h]
        return grad_hidden, grad_weight, None, None, None, None, None, None


def fused_vocab_parallel_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                       vocab_size: int, tensor_group, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                                       kernels=None) -> torch.Tensor:
    """Per-token loss of the output head: hidden [b, s, h], weight [V / tp, h] (this rank's rows of
    `tensor_group`'s vocabulary split), labels [b, s] -> [b, s] fp32.

    `kernels` has `cross_entropy_statistics` and `write_cross_entropy_grad` (default: the eager ones above).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss = _FusedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                          vocab_size, tensor_group, chunk_tokens,
                                          kernels or EAGER_CROSS_ENTROPY_KERNELS, need_grad)
    return loss.view(labels.shape)
