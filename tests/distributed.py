"""Run a function on N CPU processes joined by a gloo process group; collect what each returns.

    from distributed import run_distributed   # pytest puts tests/ on sys.path
    results = run_distributed(check_something, world_size=4, args=(config,))
    # results[rank] is what rank `rank` returned; an exception on any rank is raised here,
    # with that rank's traceback in the message.

Each child gets the environment torchrun would give it (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a free port) and, unless
`init_process_group=False`, a started gloo default group, torn down with every group built on
it when the function returns (the child then exits, taking any installed parallel layout with
it). Processes are forked (Linux), so the function and its arguments need not be picklable and
no interpreter start-up is paid; return values must be picklable (tensors are fine: they come back by value). Each child uses one intra-op thread.
"""
from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import queue
import socket
import sys
import traceback

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(rank: int, world_size: int, port: int, function, args, kwargs, init_process_group: bool,
           timeout_s: float, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        if init_process_group:
            dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        value = function(*args, **kwargs)
        results.put((rank, True, pickle.dumps(value)))  # by value: no shared-memory handles to an exiting child
    except BaseException:  # noqa: BLE001 - every failure must reach the parent with its traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()


def run_distributed(function, world_size: int, args: tuple = (), kwargs: dict | None = None, *,
                    init_process_group: bool = True, timeout_s: float = 120.0) -> list:
    """function(*args, **kwargs) on `world_size` forked gloo ranks; returns the values in rank order."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_child, daemon=True,
                                 args=(rank, world_size, port, function, args, kwargs or {}, init_process_group,
                                       timeout_s, results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    values, failures = {}, {}
    try:
        while len(values) + len(failures) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout_s)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(values) - set(failures))
                raise TimeoutError(f"ranks {missing} of {world_size} gave no result within {timeout_s} s "
                                   f"(a hang in a collective?); failures so far: {failures}") from None
            if ok:
                values[rank] = pickle.loads(value)
            else:
                failures[rank] = value
            if failures:  # the other ranks may wait forever on the failed one
                break
    finally:
        for process in processes:
            if failures and process.is_alive():
                process.terminate()
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    if failures:
        rank = min(failures)
        raise AssertionError(f"rank {rank} of {world_size} failed:\n{failures[rank]}")
    return [values[rank] for rank in range(world_size)]
