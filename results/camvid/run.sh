#!/usr/bin/env bash
# SegNet-Basic on CamVid at SegNet-Basic's schedule, the CPU configuration (see README.md):
# 100 epochs (9,200 iterations of batch 4) at 120x160 with 32 filters, SegNet-Basic's rate
# 0.1, validation every 5 epochs, seeds 0 and 1 of UN, SM and B-SGD.
# Two lanes side by side, one torch thread each, seed 0 of every update first. Resumable:
# rerunning continues a killed run from its last epoch and skips finished ones.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-results/camvid/runs-100}
train() {  # update, seeds...
  local update=$1; shift
  manifold-nets camvid train --update "$update" --lr 0.1 --epochs 100 --val-every 5 \
    --seeds "$@" --height 120 --width 160 --filters 32 --threads 1 --out "$OUT"
}
(train un 0 && train sm 0 && train un 0 1) &
(train bsgd 0 && train bsgd 0 1 && train sm 0 1) &
wait
manifold-nets camvid report "$OUT" --figure "$OUT/predictions.png" --curves "$OUT/curves.png" \
  > "$OUT/metrics.md"
