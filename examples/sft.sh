#!/usr/bin/env bash
# Instruction tuning (SFT): fine-tune a pretrained checkpoint on prompt/response pairs, then export it.
#
#   bash examples/quickstart.sh && bash examples/sft.sh        # the quickstart's tiny model, ~1 minute on CPU
#   GPUS_PER_NODE=8 LOAD=runs/openllama-7b/checkpoints TOKENIZER_MODEL=tokenizer/llama_zh_en.model \
#     MODEL_ARGS="--model-preset openllama-7b --bf16" SEQ_LENGTH=2048 DATA=my_sft.jsonl bash examples/sft.sh
#
# DATA is a jsonl file of {"prompt": ..., "response": ...} or {"messages": [{"role", "content"}, ...]} records
# (examples/sft_sample.jsonl shows both), or the PREFIX that tools/preprocess_sft.py wrote from such files (for
# large data sets). Each record is rendered with the chat template CHAT_TEMPLATE (Open-Llama's
# "<s>user: {prompt}<s>system: {response}</s>" by default; the Hugging Face export carries the same template);
# only the assistant turns and their end markers are learned (megatron_llama/data/sft_dataset.py). PACKING puts
# several records in each sequence, each attending only to itself. --finetune loads the weights of LOAD and starts
# a new run at iteration 0 with a fresh optimizer; the result goes to OUT.
# Every variable below can be set from the environment; extra arguments are passed to the trainer. LAUNCHER is put
# before the two commands (LAUNCHER=echo prints them instead of running them); on Slurm: examples/slurm/sft.sbatch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# shellcheck source=examples/torchrun_env.sh
source examples/torchrun_env.sh  # GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, TORCHRUN

LOAD=${LOAD:-runs/quickstart/checkpoints}          # the pretrained checkpoint
TOKENIZER_MODEL=${TOKENIZER_MODEL:-runs/quickstart/tokenizer.model}
MODEL_ARGS=${MODEL_ARGS:-"--model-preset tiny --num-layers 4 --hidden-size 128 --ffn-hidden-size 352 \
--num-attention-heads 4 --num-query-groups 2 --max-position-embeddings 128"}   # must match LOAD's model
DATA=${DATA:-examples/sft_sample.jsonl}
VALID_DATA=${VALID_DATA:-}                         # optional held-out jsonl; empty: no evaluation
OUT=${OUT:-runs/sft}
SEQ_LENGTH=${SEQ_LENGTH:-128}                      # longer records are cut after their last answer that fits
CHAT_TEMPLATE=${CHAT_TEMPLATE:-openllama}          # openllama, llama2 or chatml
PACKING=${PACKING:---sft-packing}                  # empty: one record per sequence, padded
MICRO_BATCH=${MICRO_BATCH:-4}
GLOBAL_BATCH=${GLOBAL_BATCH:-8}                    # a multiple of MICRO_BATCH x data-parallel size
TRAIN_ITERS=${TRAIN_ITERS:-40}
LR=${LR:-1e-3}
TP=${TP:-1}
PP=${PP:-1}

evaluation=(--eval-iters 0)
[ -n "$VALID_DATA" ] && evaluation=(--valid-data-path "$VALID_DATA" --eval-iters 1 --eval-interval 10)

mkdir -p "$OUT"
echo "== 1/2 fine-tune $LOAD on $DATA"
# shellcheck disable=SC2086  # MODEL_ARGS is a list of flags on purpose, LAUNCHER a command prefix (or none)
${LAUNCHER:-} "${TORCHRUN[@]}" -m megatron_llama.pretrain $MODEL_ARGS \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --sft --train-data-path "$DATA" --chat-template "$CHAT_TEMPLATE" $PACKING "${evaluation[@]}" \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL" \
  --load "$LOAD" --finetune --save "$OUT/checkpoints" --save-interval "$TRAIN_ITERS" \
  --seq-length "$SEQ_LENGTH" --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" \
  --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$(awk "BEGIN { print $LR / 10 }")" --lr-decay-style cosine \
  --lr-warmup-iters 4 --weight-decay 0.0 --clip-grad 1.0 --log-interval 5 --seed 1234 "$@"

if [ "$NODE_RANK" -eq 0 ]; then
  echo "== 2/2 export to Hugging Face format"
  # shellcheck disable=SC2086
  ${LAUNCHER:-} "$PYTHON" tools/convert_to_hf.py --load "$OUT/checkpoints" --save "$OUT/hf"
fi
