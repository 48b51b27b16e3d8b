#!/usr/bin/env bash
# Preference tuning (DPO): train an SFT checkpoint on chosen/rejected answer pairs, then export it.
#
#   bash examples/quickstart.sh && bash examples/sft.sh && bash examples/dpo.sh     # tiny model, ~1 minute on CPU
#   GPUS_PER_NODE=8 LOAD=runs/sft-7b/checkpoints TOKENIZER_MODEL=tokenizer/llama_zh_en.model \
#     MODEL_ARGS="--model-preset openllama-7b --bf16" SEQ_LENGTH=2048 DATA=my_prefs.jsonl bash examples/dpo.sh
#
# DATA is a jsonl file of {"prompt": ..., "chosen": ..., "rejected": ...} records, or {"messages": [...], "chosen",
# "rejected"} where the answers are the final assistant turn (examples/dpo_sample.jsonl shows both). Both
# conversations are rendered with the chat template (--chat-template, Open-Llama's by default); the loss covers the
# answers only (megatron_llama/data/preference_dataset.py). The weights of LOAD are the policy that trains and,
# frozen, the reference it is measured against (megatron_llama/objectives/dpo.py); --finetune starts at iteration 0 with a fresh
# optimizer. MICRO_BATCH and GLOBAL_BATCH count pairs (each is two sequences). The result goes to OUT.
# `bash examples/dpo.sh --dpo-precompute-reference` computes the reference's log-probabilities once and frees its copy
# of the model (the memory a 7B run on few GPUs needs); `--valid-data-path held_out.jsonl --eval-iters N` evaluates.
# The reference's folder is recorded in OUT's checkpoints: the trainer resumes them (--load OUT/checkpoints, without
# --finetune) against the same reference.
# Every variable below can be set from the environment; extra arguments are passed to the trainer. LAUNCHER is put
# before the two commands (LAUNCHER=echo prints them instead of running them).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# shellcheck source=examples/torchrun_env.sh
source examples/torchrun_env.sh  # GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, TORCHRUN

LOAD=${LOAD:-runs/sft/checkpoints}                 # the instruction-tuned checkpoint (examples/sft.sh)
TOKENIZER_MODEL=${TOKENIZER_MODEL:-runs/quickstart/tokenizer.model}
MODEL_ARGS=${MODEL_ARGS:-"--model-preset tiny --num-layers 4 --hidden-size 128 --ffn-hidden-size 352 \
--num-attention-heads 4 --num-query-groups 2 --max-position-embeddings 128"}   # must match LOAD's model
DATA=${DATA:-examples/dpo_sample.jsonl}
OUT=${OUT:-runs/dpo}
SEQ_LENGTH=${SEQ_LENGTH:-128}                      # longer pairs are left out and counted in the log
MICRO_BATCH=${MICRO_BATCH:-2}
GLOBAL_BATCH=${GLOBAL_BATCH:-4}                    # a multiple of MICRO_BATCH x data-parallel size
TRAIN_ITERS=${TRAIN_ITERS:-20}
LR=${LR:-1e-4}
BETA=${BETA:-0.1}
LOSS=${LOSS:-sigmoid}                              # sigmoid (DPO) or ipo
TP=${TP:-1}
PP=${PP:-1}

mkdir -p "$OUT"
echo "== 1/2 DPO on $DATA from $LOAD"
# shellcheck disable=SC2086  # MODEL_ARGS is a list of flags on purpose, LAUNCHER a command prefix (or none)
${LAUNCHER:-} "${TORCHRUN[@]}" -m megatron_llama.pretrain $MODEL_ARGS \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --dpo --train-data-path "$DATA" --dpo-beta "$BETA" --dpo-loss "$LOSS" --eval-iters 0 \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL" \
  --load "$LOAD" --finetune --save "$OUT/checkpoints" --save-interval "$TRAIN_ITERS" \
  --seq-length "$SEQ_LENGTH" --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" \
  --train-iters "$TRAIN_ITERS" --lr "$LR" --lr-decay-style constant --lr-warmup-iters 2 --weight-decay 0.0 \
  --clip-grad 1.0 --log-interval 5 --seed 1234 "$@"

if [ "$NODE_RANK" -eq 0 ]; then
  echo "== 2/2 export to Hugging Face format"
  ${LAUNCHER:-} "$PYTHON" tools/convert_to_hf.py --load "$OUT/checkpoints" --save "$OUT/hf"
fi
