"""Training metrics to three places: stdout, TensorBoard, and a JSON-lines file.

Each record is a flat dict with "kind" ("train" or "valid"/"test") and "iteration"; the JSON-lines
file (--metrics-path, default metrics.jsonl in --save, else in --tensorboard-dir) gets one object
per line, appended, so a resumed run continues the same file and two runs can be compared by a
script. TensorBoard
(--tensorboard-dir) gets every numeric field as a scalar "{kind}/{field}", and each number of a dict field as
"{kind}/{field}/{key}". tensorboard is an install requirement (setup.py); should its import fail anyway, the logger
says why and how to mend the install, once, and carries on without events.

Train records hold: iteration, consumed_samples, loss, lr, grad_norm, loss_scale, skipped_iterations,
step_time_s, tokens_per_s_per_gpu, mfu (model FLOPs per token x tokens/s/GPU / 989e12, docs/performance.md),
peak_mem_gib (GPU: torch.cuda.max_memory_allocated; CPU: the process's peak resident memory),
rank_step_time_min_s / rank_step_time_max_s (the least and the most time any rank spent per iteration in its own
forward and backward: profiling.ComputeTimer), and samples_per_dataset ({data prefix: samples} drawn in the interval,
when the training data is a blend). With --log-memory-to-tensorboard: memory_statistics' fields.
Eval records hold: iteration, loss, perplexity (with DPO: the DPO loss and the four reward metrics instead of the
perplexity). A NaN or Inf value is written to JSON as null.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys

import torch

H100_BF16_PEAK_FLOPS = 989e12


def model_flops_utilization(flops_per_token: int, tokens_per_s_per_gpu: float) -> float:
    """MFU against an H100 SXM's dense bf16 peak, whatever the device (docs/performance.md)."""
    return flops_per_token * tokens_per_s_per_gpu / H100_BF16_PEAK_FLOPS


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux reports KiB
    return kib / 2**20


def memory_statistics(device: torch.device) -> dict:
    """The memory fields of --log-memory-to-tensorboard. GPU: allocated and reserved now, the most allocated so far,
    allocator retries (cudaFree and retry: a sign of fragmentation). CPU: the process's resident memory now."""
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        return {"mem_allocated_gib": stats["allocated_bytes.all.current"] / 2**30,
                "mem_reserved_gib": stats["reserved_bytes.all.current"] / 2**30,
                "mem_max_allocated_gib": stats["allocated_bytes.all.peak"] / 2**30,
                "mem_alloc_retries": stats["num_alloc_retries"]}
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return {"mem_resident_gib": resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**30}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


class MetricsLogger:
    """Writes records to stdout, TensorBoard (optional) and JSON lines (optional); only on the logging rank."""

    def __init__(self, *, jsonl_path: str | None = None, tensorboard_dir: str | None = None, enabled: bool = True,
                 stream=None):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        self.jsonl = None
        self.tensorboard = None
        if not enabled:
            return
        if jsonl_path:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
            self.jsonl = open(jsonl_path, "a")
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                self.print(f"tensorboard is not importable ({error}), though installing megatron_llama installs it: "
                           f"mend the environment (pip install tensorboard); --tensorboard-dir {tensorboard_dir} "
                           f"gets no events, stdout and JSON lines continue")
            else:
                self.tensorboard = SummaryWriter(log_dir=tensorboard_dir)

    def print(self, message: str):
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def log(self, record: dict):
        """Write one record everywhere; it needs "kind" and "iteration"."""
        if not self.enabled:
            return
        self.print(_format_line(record))
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(_strict_json(record), sort_keys=True, allow_nan=False) + "\n")
            self.jsonl.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("kind", "iteration") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["iteration"])
                elif isinstance(value, dict):
                    for part, number in value.items():
                        self.tensorboard.add_scalar(f"{record['kind']}/{key}/{part}", number, record["iteration"])
            self.tensorboard.flush()

    def close(self):
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def _strict_json(record: dict) -> dict:
    """NaN and Inf (an overflowing fp16 step's gradient norm) become null: every line stays standard JSON."""
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in record.items()}


_SHOWN = {"train": ("consumed_samples", "loss", "lr", "grad_norm", "loss_scale", "skipped_iterations",
                    "step_time_s", "rank_step_time_max_s", "tokens_per_s_per_gpu", "mfu", "peak_mem_gib",
                    "rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin"),  # the last four: DPO
          "eval": ("loss", "perplexity", "rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin")}


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4e}" if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5) else f"{value:.4f}"
    return str(value)


def _format_line(record: dict) -> str:
    fields = _SHOWN["train"] if record["kind"] == "train" else _SHOWN["eval"]
    shown = " | ".join(f"{name} {_format_value(record[name])}" for name in fields if name in record)
    return f"[{record['kind']}] iteration {record['iteration']} | {shown}"
