"""Preprocessing throughput: MB/s of input text and tokens/s of tools/preprocess_data.py for 1 and 2 workers.

    python benchmarks/bench_preprocess.py --work-dir /tmp/bench
    python benchmarks/bench_preprocess.py --work-dir /tmp/bench --workers 1 2 4 --tokenizer-model my.model

Builds the >= 100 MB real-text corpus with make_bench_corpus.py when --work-dir has none, trains a
32,000-piece SentencePiece BPE tokenizer on 300,000 of its lines when no --tokenizer-model is given
(timed too), then runs preprocess_data.py once per worker count as a fresh process, timing the whole
run from start to exit (interpreter start, reading, tokenizing, writing .bin/.idx). The peak memory (RSS)
of the largest process is reported too: reading streams, so it is set by the longest document (SentencePiece
needs ~80 bytes per character of the document it encodes), not by the corpus size.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_llama.data.indexed_dataset import IndexedDataset  # noqa: E402


def run_timed(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB of the process or of its largest worker) of a command that must succeed."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr.decode(errors='replace')}")
    return elapsed, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--corpus", default=None, help="a .jsonl corpus (default: WORK_DIR/corpus.jsonl, built if absent)")
    parser.add_argument("--tokenizer-model", default=None, help="a SentencePiece .model (default: train one)")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    python = sys.executable

    corpus = args.corpus or os.path.join(args.work_dir, "corpus.jsonl")
    if not os.path.exists(corpus):
        subprocess.run([python, os.path.join(REPO, "benchmarks", "make_bench_corpus.py"), "--output", corpus], check=True)
    corpus_mb = os.path.getsize(corpus) / 1e6

    tokenizer_model = args.tokenizer_model
    if tokenizer_model is None:
        prefix = os.path.join(args.work_dir, f"bench_tokenizer_{args.vocab_size}")
        seconds, _ = run_timed(
            [python, os.path.join(REPO, "tools", "train_tokenizer.py"), "--input", corpus, "--json-keys", "text",
             "--vocab-size", str(args.vocab_size), "--max-sentences", "300000", "--model-prefix", prefix]
        )  # fmt: skip
        print(f"trained a {args.vocab_size}-piece BPE tokenizer on 300,000 sampled lines in {seconds:.1f}s")
        tokenizer_model = prefix + ".model"

    print(f"corpus {corpus}: {corpus_mb:.1f} MB of JSON lines; {os.cpu_count()} CPU cores; tokenizer {tokenizer_model}")
    print("| workers | seconds | MB/s of input | tokens/s | documents | tokens | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for workers in args.workers:
        output = os.path.join(args.work_dir, f"bench_w{workers}")
        seconds, peak_rss_mb = run_timed(
            [python, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", corpus, "--output-prefix", output,
             "--json-keys", "text", "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer_model,
             "--append-eod", "--workers", str(workers), "--log-interval", "1000000"]
        )  # fmt: skip
        dataset = IndexedDataset(output + "_text_document")
        tokens = dataset.num_tokens
        print(
            f"| {workers} | {seconds:.1f} | {corpus_mb / seconds:.2f} | {tokens / seconds:,.0f} | {len(dataset):,} | "
            f"{tokens:,} | {peak_rss_mb:.0f} MB |"
        )


if __name__ == "__main__":
    main()
