#!/usr/bin/env bash
# Time a policy against the unpruned model and the oracle (the unwrapped model on a prompt that simply has the kept
# token count) on a published architecture built with random weights: no download.
#
#   bash examples/bench_policy.sh                               # llava-1.5-7b at full size: needs a GPU (DEVICE=cuda)
#   SHRINK=8 bash examples/bench_policy.sh                      # widths and depths / 8: minutes on a CPU
#   ARCH=qwen2-vl-7b POLICY=fastv DEVICE=cuda bash examples/bench_policy.sh
set -euo pipefail
ARCH=${ARCH:-llava-1.5-7b}
POLICY=${POLICY:-visionzip}
BUDGET=${BUDGET:-0.25}
SHRINK=${SHRINK:-1}
DEVICE=${DEVICE:-cpu}
REPEATS=${REPEATS:-5}
mmprune bench --arch "$ARCH" --shrink "$SHRINK" --policy "$POLICY" --budget "$BUDGET" --device "$DEVICE" \
    --repeats "$REPEATS" --oracle
