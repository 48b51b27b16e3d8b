#!/usr/bin/env bash
# Quickstart: raw text to a trained, exported tiny Llama, end to end, on CPU (or a GPU when present).
#
#   bash examples/quickstart.sh            # about 3 minutes on 2 CPU cores, the install included
#
# Steps: install into .venv -> train a SentencePiece tokenizer on examples/data (real text, see
# examples/data/SOURCES.md) -> preprocess to .bin/.idx -> pretrain a tiny Llama -> evaluate ->
# export to Hugging Face format -> generate text with transformers from the export.
# QUICKSTART_ITERS / QUICKSTART_OUT / QUICKSTART_LOG_INTERVAL override the iteration count, output folder and
# logging interval (tests use a small run logged every iteration).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${QUICKSTART_OUT:-runs/quickstart}
ITERS=${QUICKSTART_ITERS:-300}
LOG_INTERVAL=${QUICKSTART_LOG_INTERVAL:-10}
PYTHON=${PYTHON:-python3}

if [ -z "${QUICKSTART_SKIP_INSTALL:-}" ]; then
  "$PYTHON" -m venv .venv
  . .venv/bin/activate
  PYTHON=python
  python -m pip install -q --upgrade pip setuptools wheel pybind11
  python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
  python -m pip install -q --no-build-isolation -e ".[test]"
fi
mkdir -p "$OUT"

echo "== 1/5 tokenizer"
"$PYTHON" tools/train_tokenizer.py --input examples/data --json-keys text \
  --vocab-size 8000 --model-prefix "$OUT/tokenizer" --seed 1234

echo "== 2/5 preprocess"
"$PYTHON" tools/preprocess_data.py --input examples/data --json-keys text \
  --output-prefix "$OUT/corpus" --tokenizer-type SentencePieceTokenizer \
  --tokenizer-model "$OUT/tokenizer.model" --append-eod --workers 2

echo "== 3/5 pretrain"
"$PYTHON" -m megatron_llama.pretrain --model-preset tiny \
  --num-layers 4 --hidden-size 128 --ffn-hidden-size 352 --num-attention-heads 4 --num-query-groups 2 \
  --seq-length 128 --max-position-embeddings 128 \
  --micro-batch-size 8 --global-batch-size 16 --train-iters "$ITERS" \
  --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 20 --weight-decay 0.1 --clip-grad 1.0 \
  --data-path "$OUT/corpus_text_document" --split 98,2,0 --data-cache-path "$OUT/cache" \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model" \
  --save "$OUT/checkpoints" --save-interval "$ITERS" --eval-interval "$ITERS" --eval-iters 5 \
  --log-interval "$LOG_INTERVAL" --seed 1234

echo "== 4/5 export to Hugging Face format"
"$PYTHON" tools/convert_to_hf.py --load "$OUT/checkpoints" --save "$OUT/hf"

echo "== 5/5 generate with transformers"
"$PYTHON" - "$OUT" <<'PY'
import json, sys
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

out = sys.argv[1]
rows = [json.loads(line) for line in open(f"{out}/checkpoints/metrics.jsonl")]
train = [row for row in rows if row.get("kind") == "train"]
valid = [row for row in rows if row.get("kind") == "valid"]
print(f"train loss: first logged {train[0]['loss']:.3f} (iteration {train[0]['iteration']}), "
      f"last {train[-1]['loss']:.3f} (iteration {train[-1]['iteration']}); validation loss {valid[-1]['loss']:.3f}")
tokenizer = AutoTokenizer.from_pretrained(f"{out}/hf")
model = LlamaForCausalLM.from_pretrained(f"{out}/hf").eval()
torch.manual_seed(0)
for prompt in ["The ", "床前明月光，"]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=40, do_sample=True, top_k=20, temperature=0.8)
    print(repr(tokenizer.decode(generated[0], skip_special_tokens=True)))
PY
