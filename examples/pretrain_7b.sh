#!/usr/bin/env bash
# Pretrain Open-Llama's 7B model on one or many nodes with torchrun.
#
#   bash examples/pretrain_7b.sh                                   # one node, all its GPUs
#   NNODES=20 NODE_RANK=$i MASTER_ADDR=node0 bash examples/pretrain_7b.sh   # on every node i of 20
#   sbatch --nodes 20 examples/slurm/pretrain_7b.sbatch           # Slurm sets the four variables above
#
# Every variable below can be set from the environment. Data paths follow Megatron's
# --data-path syntax (weight prefix pairs); DATA_PATH=mock trains on random tokens (a smoke test).
# LAUNCHER is put before torchrun: LAUNCHER=echo prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=examples/torchrun_env.sh
source examples/torchrun_env.sh  # GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, TORCHRUN

TP=${TP:-1}                      # tensor-parallel size (within a node)
PP=${PP:-1}                      # pipeline stages
VPP_LAYERS=${VPP_LAYERS:-}       # layers per virtual stage (interleaved 1F1B), empty: plain 1F1B
MICRO_BATCH=${MICRO_BATCH:-2}
GLOBAL_BATCH=${GLOBAL_BATCH:-512}   # sequences of SEQ_LENGTH tokens per optimizer step
SEQ_LENGTH=${SEQ_LENGTH:-2048}
TRAIN_ITERS=${TRAIN_ITERS:-250000}
WARMUP_ITERS=${WARMUP_ITERS:-2000}
# none | selective | full. none is fastest and fits: on one H200 the whole 7B state (18 bytes per parameter with
# fp32 masters, grads and Adam) plus micro-batch 2's activations peaks at 132-135 GiB (README, "Full 7B on one
# H200"), and the distributed optimizer shards the 12 bytes of masters and Adam over data-parallel ranks. Use
# full on smaller cards when TP/PP do not make it fit; selective recomputes only the attention core, which
# the flash kernels already keep small.
RECOMPUTE=${RECOMPUTE:-none}

DATA_PATH=${DATA_PATH:-"0.5 data/pile_text_document 0.5 data/wudao_title_content_document"}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-tokenizer/llama_zh_en.model}
OUTPUT_DIR=${OUTPUT_DIR:-runs/openllama-7b}

parallel=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
          --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather)
[ "$TP" -gt 1 ] && parallel+=(--sequence-parallel)
[ -n "$VPP_LAYERS" ] && parallel+=(--num-layers-per-virtual-pipeline-stage "$VPP_LAYERS")
case "$RECOMPUTE" in
  full) parallel+=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1) ;;
  selective) parallel+=(--recompute-granularity selective) ;;
esac

if [ "$DATA_PATH" = mock ]; then
  data=(--mock-data --vocab-size 100000)
else
  # shellcheck disable=SC2206  # the weight/prefix list is split on purpose
  data=(--data-path $DATA_PATH --split 969,30,1 --data-cache-path "$OUTPUT_DIR/index_cache"
        --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL")
fi

mkdir -p "$OUTPUT_DIR/checkpoints"  # --load of the empty --save folder starts fresh, later runs resume
# shellcheck disable=SC2086  # LAUNCHER is a command prefix of several words, or none
exec ${LAUNCHER:-} "${TORCHRUN[@]}" -m megatron_llama.pretrain --model-preset openllama-7b \
  "${parallel[@]}" "${data[@]}" \
  --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH" \
  --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS" \
  --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters "$WARMUP_ITERS" \
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16 \
  --save "$OUTPUT_DIR/checkpoints" --load "$OUTPUT_DIR/checkpoints" --save-interval "${SAVE_INTERVAL:-1000}" \
  --eval-interval "${EVAL_INTERVAL:-1000}" --eval-iters 10 --log-interval "${LOG_INTERVAL:-1}" \
  --tensorboard-dir "$OUTPUT_DIR/tensorboard" --exit-signal-handler --seed 1234 "$@"
