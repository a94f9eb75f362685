#!/usr/bin/env bash
# The two controls of the 100-epoch CPU configuration (see README.md), B-SGD seed 0 each:
# - class weights computed from the training labels (median frequency) instead of
#   SegNet-Basic's published ones (which weight SignSymbol 9.6, the computed 3.8);
# - plain torch.optim.SGD instead of InvariantSGD: the training pipeline against torch's
#   own optimiser.
# Two lanes side by side, one torch thread each. Resumable like run.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
train() {  # out, extra options...
  local out=$1; shift
  manifold-nets camvid train --update bsgd --lr 0.1 --epochs 100 --val-every 5 \
    --seeds 0 --height 120 --width 160 --filters 32 --threads 1 --out "$out" "$@"
}
(train results/camvid/runs-100-computed --class-weights computed) &
(train results/camvid/runs-100-torch-sgd --optimizer torch-sgd) &
wait
for out in results/camvid/runs-100-computed results/camvid/runs-100-torch-sgd; do
  manifold-nets camvid report "$out" > "$out/metrics.md"
done
