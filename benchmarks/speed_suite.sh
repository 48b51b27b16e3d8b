#!/usr/bin/env bash
# The standard-shape comparison on one GPU, in one command: our training step with and without fusions, and
# Hugging Face's best modes (benchmarks/RESULTS_speed.md holds a run's table).
#
#   bash benchmarks/speed_suite.sh LOG_DIR      # HF_BASELINE=path runs another reference script
#
# Needs liger-kernel importable for the last Hugging Face mode. Each run's output goes to LOG_DIR/NAME.log; the
# RESULT lines are collected in LOG_DIR/results.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${1:?usage: speed_suite.sh LOG_DIR}
HF_BASELINE=${HF_BASELINE:-benchmarks/hf_baseline.py}
SHAPE=(--layers 8 --seq 2048 --mbs 4 --accum 4)
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1

run() {  # name, command...
  local name=$1; shift
  echo "=== $name: $*"
  timeout "${RUN_TIMEOUT:-240}" "$@" > "$LOG_DIR/$name.log" 2>&1
  echo "exit $?"
  grep -E '^(CHECK|PROFILE|RESULT)|Error|error:' "$LOG_DIR/$name.log" | tail -30
  grep '^RESULT' "$LOG_DIR/$name.log" | sed "s/^RESULT /{\"run\": \"$name\", \"result\": /; s/\$/}/" >> "$LOG_DIR/results.jsonl"
}

run ours python3 benchmarks/bench_train_step.py "${SHAPE[@]}" --profile
run ours_no_fusions python3 benchmarks/bench_train_step.py "${SHAPE[@]}" --no-compile-blocks --unfused-cross-entropy \
  --no-gradient-accumulation-fusion \
  --profile
run hf_amp python3 "$HF_BASELINE" "${SHAPE[@]}" --mode amp
run hf_amp_compile python3 "$HF_BASELINE" "${SHAPE[@]}" --mode amp --compile
run hf_bf16_compile python3 "$HF_BASELINE" "${SHAPE[@]}" --mode bf16 --compile
run hf_bf16_liger python3 "$HF_BASELINE" "${SHAPE[@]}" --mode bf16 --liger
