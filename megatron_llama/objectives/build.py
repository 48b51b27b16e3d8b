"""The run's objective from its configuration (objectives/base.py's interface).

    objective = build_objective(config, run, layout, datasets, resume_from, log)

A DPO run's frozen reference is built here: a second copy of this rank's chunks (assembly.build_stage_model)
holding the weights of config.data.dpo_reference (checkpoint.dpo_reference_folder resolved it before the run
started), or the policy's own weights when the reference is the checkpoint the policy was just loaded from; with
--dpo-precompute-reference its log-probabilities of every pair are computed once and the copy is freed.
"""
from __future__ import annotations

import os
import time
from typing import Callable

from megatron_llama.assembly import Run, build_stage_model
from megatron_llama.checkpoint import load_weights
from megatron_llama.config import RunConfig
from megatron_llama.data.datasets import Datasets
from megatron_llama.objectives.base import Objective
from megatron_llama.objectives.dpo import DPOObjective, precompute_reference_logps
from megatron_llama.objectives.language_model import LanguageModelObjective
from megatron_llama.parallel.state import ParallelLayout


def build_objective(config: RunConfig, run: Run, layout: ParallelLayout, datasets: Datasets,
                    resume_from: str | None, log: Callable[[str], None]) -> Objective:
    """The objective of `config` over `run`'s model (already resumed: a DPO reference may be its weights)."""
    training, data = config.training, config.data
    if not data.dpo:
        return LanguageModelObjective(layout, training.global_batch_size, training.seq_length,
                                      count_loss_tokens=data.sft or data.eod_mask_loss, device=run.device)
    reference, _ = build_stage_model(config, layout, run.device)
    if data.dpo_reference in (None, resume_from and os.path.abspath(resume_from)):
        reference.load_state_dict(run.model.state_dict())  # the policy holds those weights now: no second read
    else:
        load_weights(data.dpo_reference, reference, config, layout)
    log(f"DPO: {data.dpo_loss} loss, beta {data.dpo_beta}, reference policy: "
        f"{data.dpo_reference or 'the initial weights'}, frozen")
    if data.dpo_precompute_reference:
        started = time.perf_counter()
        for dataset in (datasets.train, datasets.valid):
            if dataset is not None:
                dataset.reference_logps = precompute_reference_logps(reference, dataset, training.micro_batch_size,
                                                                     layout, run.device)
        reference = None  # its log-probabilities are all the run needs of it
        log(f"DPO: the reference's log-probabilities of every pair computed in {time.perf_counter() - started:.1f} s; "
            f"the reference model is freed")
    return DPOObjective(layout, reference, data.dpo_beta, data.dpo_loss, training.global_batch_size)
