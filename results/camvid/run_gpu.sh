#!/usr/bin/env bash
# SegNet-Basic on CamVid with SegNet-Basic's full protocol, on one CUDA GPU: CamVid's
# 360x480, 64 filters, 100 epochs (9,200 iterations of batch 4), SegNet-Basic's rate 0.1,
# seed 0 of UN, SM and B-SGD side by side (three processes share the GPU; cuDNN picks its
# kernels for the fixed shapes), validation every 10 epochs.
# Budget: one step is about 2.2 TFLOP (7x7 convs of 64 filters over 2.7x the pixels of
# one image through encoder and decoder, forward and backward, 4 images), so the three
# runs' 27,600 steps are about 61 PFLOP: about 7 minutes at 150 TFLOP/s sustained (an
# estimate; not yet run on a GPU). On this project's CPU one such step took 19-20 s of one
# core's time (measured, 3 steps; about 115 GFLOP/s, which agrees with the count), so one
# 100-epoch run at full size would need about 50 CPU-hours.
# Resumable like run.sh: each run checkpoints after every epoch.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-results/camvid/gpu}
for update in un sm bsgd; do
  manifold-nets camvid train --update "$update" --lr 0.1 --epochs 100 --val-every 10 \
    --seeds 0 --height 360 --width 480 --filters 64 --device cuda --threads 4 \
    --out "$OUT" > "$OUT-$update.log" 2>&1 &
done
wait
manifold-nets camvid report "$OUT" --figure "$OUT/predictions.png" --curves "$OUT/curves.png" \
  > "$OUT/metrics.md"
