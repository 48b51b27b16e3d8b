"""Throughput and numerical parity of parallel layouts, each a real `torchrun -m megatron_llama.pretrain` run.

Every layout trains the same model on the same global batch of mock tokens (same seed), so the
loss curves and gradient norms must agree across layouts (within bf16 rounding) and tokens/s per GPU
compares the layouts' efficiency. The first layout is the reference for the differences. Compare the
gradient norms, not only the losses: a gradient summed over the wrong ranks (a sequence-parallel norm
weight's, a data-parallel average over the wrong count) moved the tests' fp32 losses by as little as
3e-7 relative, their gradient norms by 1e-4 to 50%. --compare-weights also saves each layout's final
checkpoint (weights and optimizer state, about 14 bytes per parameter: some 26 GB at the default shape)
and reports the largest and root-mean-square difference of the weights.

    python benchmarks/bench_layouts.py --layouts tp1:1 tp2:2 tp2sp:2:--sequence-parallel

A layout is NAME:NPROC[:EXTRA FLAGS separated by commas]; the parallel sizes are read from NAME
(tpN, ppN, vN = virtual stages... are only labels: pass the flags in EXTRA or use the shorthands
tpN -> --tensor-model-parallel-size N, ppN -> --pipeline-model-parallel-size N, sp -> --sequence-parallel).
Defaults (--layers/--hidden/--ffn/--heads/--seq change them): 8 layers of Llama-2-7B dimensions, seq 2048, micro-batch 4, global batch 16, bf16, 10 iterations,
the first 3 untimed. Prints one RESULT json line per layout and a table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from megatron_llama.checkpoint import read_model_checkpoint

SHORTHANDS = {"tp": "--tensor-model-parallel-size", "pp": "--pipeline-model-parallel-size"}


def layout_flags(name: str) -> list[str]:
    flags = []
    for prefix, size in re.findall(r"(tp|pp)(\d+)", name):
        flags += [SHORTHANDS[prefix], size]
    if name.endswith("sp") or "sp-" in name:
        flags.append("--sequence-parallel")
    return flags


def model_flags(args) -> list[str]:
    return ["--num-layers", str(args.layers), "--hidden-size", str(args.hidden), "--ffn-hidden-size", str(args.ffn),
            "--num-attention-heads", str(args.heads), "--vocab-size", "32000", "--seq-length", str(args.seq),
            "--max-position-embeddings", str(args.seq), "--micro-batch-size", str(args.mbs),
            "--global-batch-size", str(args.global_batch), "--train-iters", str(args.iters), "--lr", "1e-4",
            "--min-lr", "1e-5", "--lr-warmup-iters", "2", "--clip-grad", "1.0", "--bf16", "--mock-data",
            "--log-interval", "1", "--seed", "1234"]


def run_layout(spec: str, args, workdir: Path) -> dict:
    name, nproc, *extra = spec.split(":")
    metrics = workdir / f"{name}.jsonl"
    save = ["--save", str(workdir / name)] if args.compare_weights else []
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "megatron_llama.pretrain", *model_flags(args), *layout_flags(name),
               *(extra[0].split(",") if extra and extra[0] else []), "--metrics-path", str(metrics), *save]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        print(completed.stdout[-3000:], completed.stderr[-5000:], file=sys.stderr)
        return {"layout": name, "error": f"exit {completed.returncode}"}
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [row for row in rows if row.get("kind") == "train"]
    timed = train[args.warmup:]
    return {
        "layout": name, "gpus": int(nproc),
        "tokens_per_s_per_gpu": round(statistics.median(row["tokens_per_s_per_gpu"] for row in timed)),
        "mfu": round(statistics.median(row["mfu"] for row in timed), 4),
        "step_s": round(statistics.median(row["step_time_s"] for row in timed), 4),
        "peak_mem_gib": round(max(row["peak_mem_gib"] for row in timed), 1),
        "losses": [row["loss"] for row in train],
        "grad_norms": [row["grad_norm"] for row in train],
    }


def max_relative_difference(values: list[float], reference: list[float]) -> float:
    return max(abs(value - expected) / abs(expected) if expected else abs(value)
               for value, expected in zip(values, reference))


def weight_differences(save: Path, reference: Path) -> tuple[float, float]:
    """(largest, root-mean-square) difference of the final weights of two runs' checkpoints, merged to tp=1."""
    _, weights, _ = read_model_checkpoint(str(save))
    _, expected, _ = read_model_checkpoint(str(reference))
    gaps = [(weights[name].float() - value.float()).flatten() for name, value in expected.items()]
    return (max(float(gap.abs().max()) for gap in gaps),
            (sum(float(gap.square().sum()) for gap in gaps) / sum(gap.numel() for gap in gaps)) ** 0.5)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", nargs="+", default=["tp1:1", "tp2:2", "tp2sp:2"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--mbs", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compare-weights", action="store_true",
                        help="save each layout's final checkpoint and compare its weights with the first layout's")
    args = parser.parse_args(argv)
    results, reference = [], None
    with tempfile.TemporaryDirectory() as workdir:
        for spec in args.layouts:
            result = run_layout(spec, args, Path(workdir))
            if "losses" in result:
                reference = reference or result
                result["max_rel_loss_diff"] = max_relative_difference(result["losses"], reference["losses"])
                result["max_rel_grad_norm_diff"] = max_relative_difference(result["grad_norms"],
                                                                           reference["grad_norms"])
                if args.compare_weights:
                    save = Path(workdir) / result["layout"]
                    result["max_weight_diff"], result["rms_weight_diff"] = weight_differences(
                        save, Path(workdir) / reference["layout"])
                    if result is not reference:
                        shutil.rmtree(save)  # only the reference's checkpoint is read again
            print("RESULT", json.dumps(result), flush=True)
            results.append(result)
    weight_header = f"{'max weight diff':>17}{'rms weight diff':>17}" if args.compare_weights else ""
    print(f"{'layout':<12}{'gpus':>5}{'tok/s/gpu':>11}{'MFU':>8}{'step s':>9}{'mem GiB':>9}{'max rel loss diff':>19}"
          f"{'max rel grad-norm diff':>24}{weight_header}")
    for result in results:
        if "losses" not in result:
            print(f"{result['layout']:<12} {result['error']}")
            continue
        weights = (f"{result['max_weight_diff']:>17.2e}{result['rms_weight_diff']:>17.2e}"
                   if args.compare_weights else "")
        print(f"{result['layout']:<12}{result['gpus']:>5}{result['tokens_per_s_per_gpu']:>11}{result['mfu']:>8.3f}"
              f"{result['step_s']:>9.3f}{result['peak_mem_gib']:>9.1f}{result['max_rel_loss_diff']:>19.2e}"
              f"{result['max_rel_grad_norm_diff']:>24.2e}{weights}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
