#!/usr/bin/env bash
# Second seed of the computed-class-weights control (B-SGD, 100 epochs, the CPU
# configuration of run.sh). Seed 0's record is reused. Resumable like run.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
manifold-nets camvid train --update bsgd --lr 0.1 --epochs 100 --val-every 5 \
  --seeds 0 1 --height 120 --width 160 --filters 32 --threads 1 \
  --out results/camvid/runs-100-computed --class-weights computed
manifold-nets camvid report results/camvid/runs-100-computed \
  > results/camvid/runs-100-computed/metrics.md
