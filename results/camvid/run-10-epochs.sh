#!/usr/bin/env bash
# SegNet-Basic on CamVid with UN, SM and B-SGD: the CPU configuration (see README.md).
# The three updates run side by side, one torch thread each. Resumable: rerunning
# continues a killed run from its last epoch and skips finished ones.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-results/camvid/runs}
train() {
  manifold-nets camvid train --update "$1" --lr-grid 0.01 0.1 --select-epochs 2 \
    --epochs 10 --seeds 0 1 --height 180 --width 240 --filters 32 --threads "$2" --out "$OUT"
}
train un 1 &
train sm 1 &
train bsgd 1 &
wait
manifold-nets camvid report "$OUT" --figure results/camvid/predictions.png \
  --curves results/camvid/curves.png > results/camvid/metrics.md
