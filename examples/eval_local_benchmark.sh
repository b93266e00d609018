#!/usr/bin/env bash
# Evaluate a policy against the unpruned model on a benchmark folder you downloaded (here POPE in its Hugging Face
# layout: parquet shards with question_id, question, answer, category, image), scored as lmms-eval scores it.
#
#   huggingface-cli download lmms-lab/POPE --repo-type dataset --local-dir data/POPE
#   bash examples/eval_local_benchmark.sh                  # llava-hf/llava-1.5-7b-hf, 100 questions
#   MODEL=Qwen/Qwen2.5-VL-7B-Instruct POLICY=fastv LIMIT=500 bash examples/eval_local_benchmark.sh
#
# Re-running resumes from OUT/samples.jsonl; OUT/results.json holds both runs side by side.
set -euo pipefail
MODEL=${MODEL:-llava-hf/llava-1.5-7b-hf}
DATA=${DATA:-data/POPE}
POLICY=${POLICY:-visionzip}
BUDGET=${BUDGET:-0.25}
LIMIT=${LIMIT:-100}
OUT=${OUT:-runs/pope}
mmprune eval --model "$MODEL" --task pope --data "$DATA" --policy none --limit "$LIMIT" --out "$OUT"
mmprune eval --model "$MODEL" --task pope --data "$DATA" --policy "$POLICY" --budget "$BUDGET" --limit "$LIMIT" --out "$OUT"
