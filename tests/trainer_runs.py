"""Helpers of the trainer-layout tests (test_pp_training.py, test_dp_training.py): runs of pretrain.main in this
process with one intra-op thread, and the JSON-lines metrics a run wrote.

    from trainer_runs import metrics, run_in_process   # pytest puts tests/ on sys.path
    run_in_process([flags_a, flags_b])                  # each main(flags) must exit 0
"""
from __future__ import annotations

import json
import os

import torch

from megatron_llama.pretrain import main


def run_in_process(runs: list[list[str]]) -> None:
    """main(flags) for each run, with one intra-op thread as the gloo ranks use (tiny matmuls on a shared 2-core
    machine spend up to 100x longer when two threads wait for each other); each must exit with status 0."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for flags in runs:
            assert main(flags) == 0, flags
    finally:
        torch.set_num_threads(previous)


def metrics(save) -> list[dict]:
    """The records of `save`/metrics.jsonl, in order."""
    with open(os.path.join(save, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]
