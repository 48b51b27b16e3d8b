"""Where a run's time goes: a torch.profiler trace of chosen iterations, and each rank's own compute time.

    python -m megatron_llama.pretrain ... --profile --profile-step-start 10 --profile-step-end 12 \\
        --profile-ranks 0 7 --tensorboard-dir runs/tb     # iterations 10 and 11 of ranks 0 and 7
    tensorboard --logdir runs/tb                          # the PyTorch Profiler tab (torch-tb-profiler), or open
                                                          # rank0.*.pt.trace.json in chrome://tracing / Perfetto

StepProfiler records iterations [start, end) on the ranks it is enabled on (Megatron's --profile-step-start /
--profile-step-end meaning) and writes one Chrome trace per rank, rank{R}.*.pt.trace.json, into the TensorBoard
folder, else beside the metrics file (trace_folder). CPU activity always, CUDA kernels on a GPU run.

ComputeTimer sums the seconds this rank spends in forward and backward between two log lines; the training loop
reduces it to a minimum and a maximum over all ranks at the log interval. The wall time of a step is the same on
every rank (they wait for each other in the gradient reduction), the time before that wait is not: a slow GPU
shows as a maximum above the others' minimum. On CUDA the time is taken by events read at log time, so no step
waits for the device.
"""
from __future__ import annotations

import contextlib
import os
import time

import torch


def trace_folder(tensorboard_dir: str | None, metrics_path: str | None) -> str:
    """Where --profile writes its traces: the TensorBoard folder, else the metrics file's folder."""
    if tensorboard_dir is not None:
        return tensorboard_dir
    if metrics_path is None:
        raise ValueError("a profile trace needs --tensorboard-dir, --save or --metrics-path to be written to")
    return os.path.dirname(os.path.abspath(metrics_path))


class StepProfiler:
    """torch.profiler over iterations [start, end) when `enabled`; call step_begins(iteration) before each
    iteration and finish() after the loop (it writes the trace when the run stopped inside the window)."""

    def __init__(self, folder: str, start: int, end: int, rank: int, device: torch.device, enabled: bool = True):
        self.folder, self.start, self.end, self.rank, self.enabled = folder, start, end, rank, enabled
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler: torch.profiler.profile | None = None

    def step_begins(self, iteration: int):
        if not self.enabled:
            return
        if iteration == self.start:
            handler = torch.profiler.tensorboard_trace_handler(self.folder, worker_name=f"rank{self.rank}")
            self.profiler = torch.profiler.profile(activities=self.activities, record_shapes=True,
                                                   on_trace_ready=handler)
            self.profiler.start()
        elif iteration == self.end:
            self.finish()

    def finish(self):
        if self.profiler is not None:
            self.profiler.stop()  # calls on_trace_ready: the trace file is written here
            self.profiler = None


class ComputeTimer:
    """Seconds spent inside `measure()` blocks since the last `take()`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.host_seconds = 0.0

    @contextlib.contextmanager
    def measure(self):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((start, end))
        else:
            began = time.perf_counter()
            yield
            self.host_seconds += time.perf_counter() - began

    def take(self) -> float:
        """The measured seconds, and start over."""
        if self.events:
            self.events[-1][1].synchronize()  # the last block's kernels are done, so are the earlier ones
        seconds = self.host_seconds + sum(start.elapsed_time(end) for start, end in self.events) / 1000
        self.events, self.host_seconds = [], 0.0
        return seconds
