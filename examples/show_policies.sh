#!/usr/bin/env bash
# Compare what policies keep on one image: one PNG per policy, the kept / dropped visual tokens of each stage
# drawn on the image's patch grid.
#
#   bash examples/show_policies.sh                         # llava-hf/llava-1.5-7b-hf on a drawn picture (downloads)
#   MODEL=testbed-llava bash examples/show_policies.sh     # the built-in test-bed, no download
#   MODEL=Qwen/Qwen2-VL-2B-Instruct IMAGE=cat.jpg BUDGET=0.1 bash examples/show_policies.sh
set -euo pipefail
MODEL=${MODEL:-llava-hf/llava-1.5-7b-hf}
OUT=${OUT:-show}
BUDGET=${BUDGET:-0.25}
PROMPT=${PROMPT:-"What is the red shape?"}
mkdir -p "$OUT"
if [ -z "${IMAGE:-}" ]; then  # no image given: draw one
    IMAGE="$OUT/input.png"
    python -c "from PIL import Image, ImageDraw; im = Image.new('RGB', (336, 336), 'white'); ImageDraw.Draw(im).ellipse((60, 60, 200, 200), fill='red'); im.save('$IMAGE')"
fi
for policy in uniform fastv visionzip divprune; do
    mmprune show --model "$MODEL" --image "$IMAGE" --prompt "$PROMPT" --policy "$policy" --budget "$BUDGET" --out "$OUT/$policy.png"
done
ls "$OUT"/*
