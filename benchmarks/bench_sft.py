"""Post-training throughput on one device: packed against padded SFT, a DPO step against an SFT step, and the
kernels that can compute block-diagonal causal (packed) attention.

Records have token counts drawn from a log-normal distribution (median --median-length, shape --sigma, cut to
[--min-length, seq]); with the defaults (median 300, sigma 1.0, seq 2048) the records drawn have median 280 and
mean 435 tokens, and 2% are cut to 2,048. Each record's last 60% is its answer (learned tokens).

- padded: one record per row, then padding (plain SFT);
- packed: whole records one after another while they fit (data/packing.pack_greedily; --sft-packing), each row
  carrying document ids and positions, so attention stays inside each record;
- dpo: pairs (two records sharing a prompt), a chosen and a rejected row each, padded; the step runs the frozen
  reference forward and the policy forward-backward (objectives/dpo.DPOObjective), as `--dpo` does.

Every mode runs the trainer's assembly and step (assembly.build_run, training.train_step: fp32 main grads, AdamW over
fp32 masters) and objectives on micro-batches
of --mbs rows, --accum per step, and reports useful tokens/s: the non-padding tokens of the rows (for DPO, of both
rows of each pair) per second. --attention-kernels also times the candidate kernels for packed rows alone
(forward + backward of one layer's attention): torch SDPA with a boolean mask, what the sdpa backend runs for packed
rows (model/attention.sdpa_attention: variable-length FlashAttention on CUDA), FlexAttention with a document block
mask, and for scale SDPA's plain causal kernel on the same rows (ignoring the documents); each with its errors
against an fp32 computation, checked (the backend's kernel within ERROR_GROWTH_TOLERANCE x the masked kernel's).

    python benchmarks/bench_sft.py --layers 8 --seq 2048 --mbs 4 --accum 4 --attention-kernels
CPU smoke test (fp32):
    python benchmarks/bench_sft.py --device cpu --layers 2 --hidden 64 --ffn 176 --heads 4 --vocab 1000 --seq 64 \\
        --median-length 20 --min-length 4 --mbs 2 --accum 2 --steps 2 --warmup 1
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from model_shape import add_model_shape_arguments, model_config

from megatron_llama.assembly import build_run, build_stage_model
from megatron_llama.config import RunConfig, TrainingConfig
from megatron_llama.data.packing import pack_greedily, positions_within_documents
from megatron_llama.model.attention import document_causal_mask, grouped_sdpa, sdpa_attention
from megatron_llama.model.compile import default_on_cuda
from megatron_llama.objectives.dpo import DPOObjective
from megatron_llama.objectives.language_model import LanguageModelObjective
from megatron_llama.parallel.cross_entropy import IGNORE_INDEX
from megatron_llama.parallel.state import ParallelLayout
from megatron_llama.training import train_step

ANSWER_SHARE = 0.6  # the learned tail of each record
ERROR_GROWTH_TOLERANCE = 1.25  # the packed-attention kernel's error against fp32 may exceed the masked kernel's by this


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_shape_arguments(parser)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--mbs", type=int, default=4, help="rows per micro-batch")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--median-length", type=float, default=300.0, help="median record length in tokens")
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal shape of the record lengths")
    parser.add_argument("--min-length", type=int, default=16)
    parser.add_argument("--modes", nargs="+", choices=("padded", "packed", "dpo"), default=["padded", "packed", "dpo"])
    parser.add_argument("--attention-kernels", action="store_true", help="also time packed-attention kernels alone")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    return parser.parse_args(argv)


def record_lengths(count: int, args, rng: np.random.Generator) -> np.ndarray:
    lengths = rng.lognormal(np.log(args.median_length), args.sigma, count)
    return np.clip(lengths.round(), args.min_length, args.seq).astype(np.int64)


def record_labels(tokens: np.ndarray, length: int) -> np.ndarray:
    """Labels of one record [length]: the next token on the answer (last ANSWER_SHARE), IGNORE_INDEX elsewhere."""
    labels = np.full(length, IGNORE_INDEX, dtype=np.int64)
    answer_start = length - max(1, int(ANSWER_SHARE * length))
    labels[answer_start:length - 1] = tokens[answer_start + 1:length]
    return labels


def padded_rows(lengths, args, rng) -> list[dict]:
    """One record per row [seq]; the rest is padding (label IGNORE_INDEX)."""
    rows = []
    for length in lengths:
        tokens = np.zeros(args.seq, dtype=np.int64)
        tokens[:length] = rng.integers(3, args.vocab, length)
        labels = np.full(args.seq, IGNORE_INDEX, dtype=np.int64)
        labels[:length] = record_labels(tokens[:length], length)
        rows.append(dict(tokens=tokens, labels=labels, useful=int(length)))
    return rows


def packed_rows(lengths, args, rng) -> list[dict]:
    """Whole records per row while they fit; the tail is padding, a document of its own."""
    rows = []
    for members in pack_greedily([int(length) for length in lengths], args.seq):
        tokens = np.zeros(args.seq, dtype=np.int64)
        labels = np.full(args.seq, IGNORE_INDEX, dtype=np.int64)
        documents = np.zeros(args.seq, dtype=np.int64)
        used = 0
        for document, member in enumerate(members):
            length = int(lengths[member])
            tokens[used:used + length] = rng.integers(3, args.vocab, length)
            labels[used:used + length] = record_labels(tokens[used:used + length], length)
            documents[used:used + length] = document
            used += length
        documents[used:] = len(members)
        rows.append(dict(tokens=tokens, labels=labels, document_ids=documents,
                         position_ids=positions_within_documents(documents), useful=used))
    return rows


def micro_batches(rows: list[dict], args, device) -> tuple[list[dict], int]:
    """The first mbs x accum rows as micro-batches of tensors, and their useful tokens."""
    needed = args.mbs * args.accum
    if len(rows) < needed:
        raise SystemExit(f"only {len(rows)} rows were built; {needed} are needed")
    batches = []
    for start in range(0, needed, args.mbs):
        group = rows[start:start + args.mbs]
        batches.append({key: torch.from_numpy(np.stack([row[key] for row in group])).to(device)
                        for key in group[0] if key != "useful"})
    return batches, sum(row["useful"] for row in rows[:needed])


def dpo_rows(lengths, args, rng) -> list[dict]:
    """Pairs as adjacent rows (chosen, rejected): one prompt (the first 40% of the first record) and two answers."""
    rows = []
    for chosen_length, rejected_length in zip(lengths[0::2], lengths[1::2]):
        prompt_length = max(1, int((1 - ANSWER_SHARE) * chosen_length))
        prompt = rng.integers(3, args.vocab, prompt_length)
        for answer_length in (chosen_length - prompt_length, max(1, rejected_length - prompt_length)):
            length = min(prompt_length + answer_length, args.seq)
            tokens = np.zeros(args.seq, dtype=np.int64)
            tokens[:prompt_length] = prompt
            tokens[prompt_length:length] = rng.integers(3, args.vocab, length - prompt_length)
            labels = np.full(args.seq, IGNORE_INDEX, dtype=np.int64)
            labels[prompt_length - 1:length - 1] = tokens[prompt_length:length]
            rows.append(dict(tokens=tokens, labels=labels, useful=int(length)))
    return rows


def timed_steps(step, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / steps


def flex_document_attention():
    """FlexAttention (compiled) with a block mask of causal attention within each document; None if unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    compiled = torch.compile(flex_attention, dynamic=False)

    def attend(q, k, v, document_ids):
        b, s = document_ids.shape

        def within_document(batch, head, query, key):
            return (key <= query) & (document_ids[batch, query] == document_ids[batch, key])

        block_mask = create_block_mask(within_document, b, None, s, s, device=q.device)
        out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                       enable_gqa=q.shape[2] != k.shape[2])  # [b, heads, s, d]
        return out.transpose(1, 2)

    return attend


def time_attention_kernels(args, rows: list[dict], device, dtype) -> None:
    """Forward + backward of one layer's attention on the packed rows, per kernel, with each kernel's output and
    gradient errors against an fp32 computation of the masked attention. The kernel the sdpa backend runs for
    packed rows (sdpa_attention) may not exceed ERROR_GROWTH_TOLERANCE x the masked bf16 kernel's errors."""
    batches, _ = micro_batches(rows, args, device)
    document_ids = batches[0]["document_ids"]
    b, s, d = document_ids.shape[0], args.seq, args.hidden // args.heads
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v, grad_out = (torch.randn(b, s, args.heads, d, device=device, generator=generator) for _ in range(4))

    def masked(q, k, v):
        return grouped_sdpa(q, k, v, attn_mask=document_causal_mask(document_ids))

    reference = output_and_grads(masked, q, k, v, grad_out)  # fp32
    q, k, v, grad_out = (x.to(dtype) for x in (q, k, v, grad_out))
    kernels = {"sdpa + boolean mask": masked,
               "sdpa_attention (the backend's choice)": lambda q, k, v: sdpa_attention(q, k, v, document_ids),
               "sdpa causal, documents ignored": lambda q, k, v: sdpa_attention(q, k, v)}
    flex = flex_document_attention()
    if flex is not None:
        kernels["flex attention + block mask"] = lambda q, k, v: flex(q, k, v, document_ids)
    errors = {}
    for name, attend in kernels.items():
        try:
            seconds = timed_steps(lambda: output_and_grads(attend, q, k, v, grad_out), steps=20, warmup=3,
                                  device=device)
            errors[name] = [float((mine.float() - theirs).norm() / theirs.norm())
                            for mine, theirs in zip(output_and_grads(attend, q, k, v, grad_out), reference)]
        except Exception as error:  # noqa: BLE001 - a candidate that cannot run here is reported, not fatal
            print(f"KERNEL {name:38s} failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
            continue
        print(f"KERNEL {name:38s} {1e3 * seconds:8.3f} ms forward+backward; relative L2 error vs fp32 of out, dq, "
              f"dk, dv: {' '.join(f'{error:.1e}' for error in errors[name])}", flush=True)
    allowed = [ERROR_GROWTH_TOLERANCE * error + 1e-6 for error in errors["sdpa + boolean mask"]]
    chosen = errors["sdpa_attention (the backend's choice)"]
    if not all(error <= limit for error, limit in zip(chosen, allowed)):
        raise SystemExit(f"CHECK FAILED: the packed-attention kernel's errors {chosen} exceed "
                         f"{ERROR_GROWTH_TOLERANCE} x the masked kernel's {errors['sdpa + boolean mask']}")
    print(f"CHECK passed: the packed-attention kernel's errors within {ERROR_GROWTH_TOLERANCE} x the masked "
          "kernel's", flush=True)


def output_and_grads(attend, q, k, v, grad_out) -> list[torch.Tensor]:
    """attend(q, k, v) and the gradients of <out, grad_out> with respect to q, k, v."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = attend(q, k, v)
    out.backward(grad_out)
    return [out.detach(), q.grad, k.grad, v.grad]


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rng = np.random.default_rng(0)
    lengths = record_lengths(64 * args.mbs * args.accum, args, rng)
    print(f"records: median {np.median(lengths):.0f}, mean {lengths.mean():.0f}, p99 {np.percentile(lengths, 99):.0f}"
          f" tokens (log-normal median {args.median_length:g}, sigma {args.sigma:g}, cut to [{args.min_length}, "
          f"{args.seq}])", flush=True)
    rows = {"padded": padded_rows(lengths, args, rng), "packed": packed_rows(lengths, args, rng),
            "dpo": dpo_rows(lengths, args, rng)}
    if args.attention_kernels:
        time_attention_kernels(args, rows["packed"], device, dtype)
    config = RunConfig(model=model_config(args, max_position_embeddings=args.seq),
                       training=TrainingConfig(micro_batch_size=args.mbs, global_batch_size=args.mbs * args.accum,
                                               seq_length=args.seq, lr=1e-5, adam_beta2=0.95, weight_decay=0.0,
                                               clip_grad=1.0, precision="bf16" if dtype == torch.bfloat16 else "fp32",
                                               device=device.type, seed=0,
                                               compile_blocks=default_on_cuda(None, device),
                                               cross_entropy_loss_fusion=True))
    layout = ParallelLayout.single_process()
    run = build_run(config, layout, device)  # the trainer's own assembly
    seconds = {}
    for mode in args.modes:
        batches, useful = micro_batches(rows[mode], args, device)
        if mode == "dpo":
            reference, _ = build_stage_model(config, layout, device)
            objective = DPOObjective(layout, reference, beta=0.1, loss_type="sigmoid",
                                     pairs_in_global_batch=args.mbs * args.accum // 2)
        else:
            objective = LanguageModelObjective(layout, args.mbs * args.accum, args.seq, count_loss_tokens=True,
                                               device=device)

        def step():
            train_step(run.model, run.optimizer, objective.prepare(batches), lr=1e-5, buffers=run.buffers,
                       loss_fn=objective.loss_fn, layout=layout)

        seconds[mode] = timed_steps(step, args.steps, args.warmup, device)
        if mode == "dpo":
            del reference
        del objective
        rows_in_step = args.mbs * args.accum
        print("RESULT", json.dumps(dict(
            mode=mode, layers=args.layers, seq=args.seq, rows_per_step=rows_in_step,
            useful_tokens_per_step=useful, padding_share=round(1 - useful / (rows_in_step * args.seq), 3),
            step_s=round(seconds[mode], 4), useful_tokens_per_s=round(useful / seconds[mode]),
            peak_mem_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if device.type == "cuda" else None,
            device=str(device))), flush=True)
    if "packed" in seconds and "padded" in seconds:
        print(f"packed vs padded: {seconds['padded'] / seconds['packed']:.2f}x step time ratio", flush=True)
    if "dpo" in seconds and "padded" in seconds:
        print(f"DPO step / padded SFT step (same rows): {seconds['dpo'] / seconds['padded']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
