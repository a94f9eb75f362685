#!/usr/bin/env bash
# SegNet-Basic on CamVid with SegNet's full protocol, for a CUDA GPU: full resolution
# (360x480), 64 filters, 100 epochs (about 9,200 iterations of batch 4, near the reference's
# 10,000), the rate selected over 5-epoch runs, two seeds per update.
# Resumable like run.sh: each run checkpoints after every epoch, so a job stopped by a time
# limit continues where it was when rerun.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-results/camvid/gpu}
for update in un sm bsgd; do
  manifold-nets camvid train --update "$update" --lr-grid 0.01 0.03 0.1 --select-epochs 5 \
    --epochs 100 --seeds 0 1 --height 360 --width 480 --filters 64 --device cuda \
    --threads 8 --out "$OUT"
done
manifold-nets camvid report "$OUT" --figure "$OUT/predictions.png" --curves "$OUT/curves.png" \
  > "$OUT/metrics.md"
