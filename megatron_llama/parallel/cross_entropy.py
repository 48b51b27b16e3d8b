"""Cross entropy over vocabulary-parallel logits, without gathering the full vocabulary.

Tensor rank r holds the logit columns [r * V_local, (r + 1) * V_local) of the padded
vocabulary. Per token (Megatron-LM's vocab-parallel cross entropy):

    m    = max over all columns              (all-reduce MAX: a number per token)
    z_t  = logit of the target column - m    (all-reduce SUM: only the owning rank adds it)
    S    = sum of exp(logit - m)              (all-reduce SUM)
    loss = log S - z_t
    d loss / d logit_j = softmax_j - [j == target]   (each rank writes its own columns)

so only three [b, s] tensors cross the network. Columns at or beyond `vocab_size` are
vocabulary padding: they are left out of the max and the sum, so padding never changes
the loss and receives zero gradient. A label of -100 (torch's ignore_index) gives loss 0
and no gradient. The tensor group (`layout.tensor_group`) is passed in; at tensor-parallel size 1 (a
group of one, or None) nothing is communicated.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_llama.parallel import comm

IGNORE_INDEX = -100


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_size, group):
        local_width = logits.shape[-1]
        vocab_start = comm.group_rank(group) * local_width
        real_columns = max(0, min(local_width, vocab_size - vocab_start))  # columns left of the padding
        shifted = logits[..., :real_columns].float()  # [b, s, real_columns]

        if real_columns > 0:
            token_max = shifted.max(dim=-1).values  # [b, s]
        else:
            token_max = torch.full(labels.shape, float("-inf"), device=logits.device)
        comm.all_reduce(token_max, group, op=dist.ReduceOp.MAX)
        shifted = shifted - token_max.unsqueeze(-1)  # a new tensor: the caller's logits stay untouched

        not_here = (labels < vocab_start) | (labels >= vocab_start + real_columns)  # [b, s]
        local_labels = (labels - vocab_start).masked_fill(not_here, 0)
        if real_columns > 0:
            target_logit = shifted.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1).masked_fill(not_here, 0.0)
        else:
            target_logit = torch.zeros(labels.shape, device=logits.device)
        comm.all_reduce(target_logit, group)

        softmax = shifted.exp_()  # in place: exp(logit - m), reused for the gradient
        sum_exp = softmax.sum(dim=-1)  # [b, s]
        comm.all_reduce(sum_exp, group)
        softmax.div_(sum_exp.unsqueeze(-1))

        ignored = labels == IGNORE_INDEX
        loss = (torch.log(sum_exp) - target_logit).masked_fill(ignored, 0.0)  # [b, s]
        ctx.save_for_backward(softmax, local_labels, not_here | ignored, ignored)
        ctx.local_width, ctx.logits_dtype = local_width, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_labels, no_target_here, ignored = ctx.saved_tensors
        grad = softmax  # modified in place: the saved softmax is used by this backward only
        if grad.shape[-1] > 0:
            grad.scatter_add_(-1, local_labels.unsqueeze(-1), (~no_target_here).to(grad.dtype).unsqueeze(-1).neg())
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))  # [b, s, real_columns]
        padding = ctx.local_width - grad.shape[-1]
        if padding:
            grad = torch.cat([grad, grad.new_zeros(grad.shape[:-1] + (padding,))], dim=-1)  # [b, s, local_width]
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                                 tensor_group) -> torch.Tensor:
    """Per-token loss. logits [b, s, padded_vocab / tp] (this rank's columns of `tensor_group`'s vocabulary split),
    labels [b, s] -> loss [b, s] (fp32)."""
    return _VocabParallelCrossEntropy.apply(logits, labels, vocab_size, tensor_group)
