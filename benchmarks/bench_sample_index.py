"""Time build_sample_idx, the compiled helper against the numpy fallback, and print one JSON line.

Documents have lengths drawn from a geometric distribution (mean --mean-length tokens); doc_idx lists
--epochs shuffled epochs of them, as GPTDataset builds it. Both implementations must return equal arrays.

    python setup.py build_ext --inplace            # once, for the compiled helper
    python benchmarks/bench_sample_index.py --documents 10000000 --seq-length 2048
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from megatron_llama.data import helpers


def best_time(function, repeats: int) -> tuple[float, np.ndarray]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=10_000_000)
    parser.add_argument("--mean-length", type=float, default=500.0)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    random_state = np.random.RandomState(args.seed)
    sizes = random_state.geometric(1.0 / args.mean_length, size=args.documents).astype(np.int32)
    tokens_per_epoch = int(sizes.sum(dtype=np.int64))
    doc_idx = np.concatenate([random_state.permutation(args.documents).astype(np.int32) for _ in range(args.epochs)])
    build_args = (sizes, doc_idx, args.seq_length, args.epochs, tokens_per_epoch)

    numpy_seconds, expected = best_time(lambda: helpers.build_sample_idx_numpy(*build_args), args.repeats)
    record = {
        "benchmark": "build_sample_idx",
        "documents": args.documents,
        "epochs": args.epochs,
        "tokens": tokens_per_epoch * args.epochs,
        "seq_length": args.seq_length,
        "samples": len(expected) - 1,
        "numpy_seconds": round(numpy_seconds, 4),
        "cpu": platform.processor() or platform.machine(),
    }
    if helpers.compiled_helpers is not None:
        cpp_seconds, actual = best_time(lambda: helpers.compiled_helpers.build_sample_idx(*build_args), args.repeats)
        if not np.array_equal(actual, expected):
            raise SystemExit("compiled and numpy build_sample_idx disagree")
        record.update(cpp_seconds=round(cpp_seconds, 4), numpy_over_cpp=round(numpy_seconds / cpp_seconds, 2))
    else:
        record["cpp_seconds"] = None  # not built: python setup.py build_ext --inplace
    print(json.dumps(record))


if __name__ == "__main__":
    main()
