#!/usr/bin/env bash
# The full 7B presets on one GPU with the real trainer: examples/pretrain_7b.sh's flags on mock data, without
# checkpoints (a 7B checkpoint with its optimizer state is about 100 GB), at micro-batch 1 and 2 without
# recompute. Prints each run's last two iteration lines (tokens/s, MFU, peak memory); the whole log is in
# LOG_DIR/<run>.log.
#
#   bash benchmarks/bench_7b.sh [LOG_DIR]                 # ITERS=6 by default; RECOMPUTE_ARGS adds recompute flags
set -u
cd "$(dirname "$0")/.."
LOG_DIR=${1:-/tmp/bench_7b}
mkdir -p "$LOG_DIR"

run() {  # name micro-batch extra-args...
  local name=$1 micro_batch=$2; shift 2
  echo "=== $name: micro-batch $micro_batch $*"
  # shellcheck disable=SC2086  # RECOMPUTE_ARGS is a list of flags
  ${PYTHON:-python3} -m megatron_llama.pretrain --mock-data --use-distributed-optimizer --overlap-grad-reduce \
    --overlap-param-gather ${RECOMPUTE_ARGS:-} --seq-length 2048 --max-position-embeddings 2048 \
    --micro-batch-size "$micro_batch" --global-batch-size 16 --train-iters "${ITERS:-6}" --lr 3e-4 --min-lr 3e-5 \
    --lr-decay-style cosine --lr-warmup-iters 2 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 \
    --clip-grad 1.0 --bf16 --eval-interval 100000 --eval-iters 1 --log-interval 1 --seed 1234 "$@" \
    > "$LOG_DIR/$name.log" 2>&1
  grep -E "^\[train\] iteration|rror|out of memory" "$LOG_DIR/$name.log" | tail -2
}

run llama2-7b_mb1 1 --model-preset llama2-7b --vocab-size 32000
run llama2-7b_mb2 2 --model-preset llama2-7b --vocab-size 32000
run openllama-7b_mb1 1 --model-preset openllama-7b --vocab-size 100000
run openllama-7b_mb2 2 --model-preset openllama-7b --vocab-size 100000
