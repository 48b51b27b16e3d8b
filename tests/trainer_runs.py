"""Helpers of the trainer-layout tests (test_tp_training.py, test_pp_training.py, test_dp_training.py, ...): runs of
pretrain.main in this process with one intra-op thread, the JSON-lines metrics a run wrote, and the check that a run
reproduced another (its logged losses and gradient norms, and the weights it saved at the end).

    from trainer_runs import assert_same_run, metrics, run_in_process   # pytest puts tests/ on sys.path
    run_in_process([flags_a, flags_b])                  # each main(flags) must exit 0
    assert_same_run(save_a, save_b)                     # within the measured agreement below
"""
from __future__ import annotations

import json
import os

import torch

from megatron_llama.checkpoint import open_checkpoint, read_model_checkpoint
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


# How closely a run at another layout (tensor, sequence, pipeline, data parallel, distributed optimizer; or resumed
# there from a checkpoint) reproduces one process on the same global batches, fp32 on CPU gloo ranks, measured over
# every run of the layout tests (test_tp/pp/dp_training.py, test_elastic_checkpoint.py, test_sft.py,
# test_dpo_layouts.py; assert_same_run prints them, shown under pytest -s):
#   logged losses, gradient norms (and DPO's rewards)   relative <= 3.1e-7 (a few float32 ulps; pretraining 2.3e-7)
#   final weights, root mean square of the differences  <= 1.5e-8
#   final weights, root mean square of the differences  <= 5.7e-8 at lr 1e-2 (DPO), 1.5e-8 at lr 3e-3
#   final weights, largest difference                   <= 1.1e-3 x the peak lr (3.1e-6 at lr 3e-3: pp2 x tp2, 5 of
#                                                          45k elements beyond 2e-7; 1.13e-5 at lr 1e-2: DPO at tp2)
# The largest weight differences all arise in the first step, at elements whose gradient cancels to about Adam's
# eps = 1e-8 (the worst one's first step is 0.58 lr instead of lr): the step lr * g / (|g| + eps) has a slope in g of
# up to lr / eps, so float rounding of such a gradient (~1e-11) becomes about 1e-3 lr of weight; later steps keep
# that offset. Everywhere else the weights agree to about 1e-8. The tolerances stand 2-3x above what was measured.
RECORD_RTOL = 1e-6
WEIGHT_RMS_TOL = 1e-7
WEIGHT_ATOL_PER_LR = 3e-3  # the largest weight difference, in units of the reference run's peak learning rate


def differences(ours, reference, *, keys=("loss", "grad_norm"), after_iteration: int = 0,
                weights: bool = True) -> dict[str, float]:
    """The largest relative difference of each logged key of run `ours` against run `reference` (their save
    directories) over the records past `after_iteration`, and (with `weights`) the root mean square and the largest
    absolute difference of the weights each saved last ("weights_rms", "weights_max"). The records must be of the
    same kinds and iterations, in the same order; a key counts in the records that hold it (grad_norm: train)."""
    ours_records = metrics(ours)
    reference_records = [record for record in metrics(reference) if record["iteration"] > after_iteration]
    assert [(r["kind"], r["iteration"]) for r in ours_records] == \
        [(r["kind"], r["iteration"]) for r in reference_records]
    found = {}
    for key in keys:
        pairs = [(mine[key], theirs[key]) for mine, theirs in zip(ours_records, reference_records) if key in theirs]
        assert pairs, f"no record of {reference} logs {key}"
        found[key] = max(abs(mine - theirs) / abs(theirs) if theirs else abs(mine) for mine, theirs in pairs)
    if weights:
        _, our_weights, _ = read_model_checkpoint(str(ours))
        _, their_weights, _ = read_model_checkpoint(str(reference))
        assert sorted(our_weights) == sorted(their_weights)
        gaps = torch.cat([(our_weights[name] - value).flatten() for name, value in their_weights.items()])
        found["weights_rms"], found["weights_max"] = float(gaps.square().mean().sqrt()), float(gaps.abs().max())
    return found


def assert_same_run(ours, reference, **options) -> None:
    """Run `ours` reproduced run `reference`: differences(ours, reference, **options) within the tolerances above."""
    found = differences(ours, reference, **options)
    report = f"{ours} against {reference}: " + ", ".join(f"{key} {value:.2e}" for key, value in found.items())
    print(report)
    tolerances = {"weights_rms": WEIGHT_RMS_TOL}
    if "weights_max" in found:
        tolerances["weights_max"] = WEIGHT_ATOL_PER_LR * open_checkpoint(str(reference))[1].training.lr
    beyond = [key for key, value in found.items() if not value <= tolerances.get(key, RECORD_RTOL)]
    assert not beyond, f"{', '.join(beyond)} beyond tolerance (logged values {RECORD_RTOL:.0e} relative, weights " \
                       f"{WEIGHT_RMS_TOL:.0e} root mean square, {WEIGHT_ATOL_PER_LR:.0e} x lr largest): {report}"
