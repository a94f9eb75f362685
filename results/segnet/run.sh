#!/usr/bin/env bash
# The SegNet experiment of results/segnet/README.md: UN, SM and B-SGD, each with its
# learning rate selected on the validation canvases (seed 0) from a 3-point grid, then
# seeds 1 and 2 with that rate. One torch thread per run, runs one after another.
set -euo pipefail
export MANIFOLD_NETS_MIRROR=${MANIFOLD_NETS_MIRROR:-$(cd "$(dirname "$0")/../../.." && pwd)/shared/data}
PY=${PY:-.venv/bin/python}
for update in un sm bsgd; do
  /usr/bin/time -f "$update: %e s wall" $PY -m manifold_nets.experiments.cli segnet --update "$update" \
    --lr-grid 0.1 0.03 0.01 --seeds 0 1 2 --threads 1 --out "results/segnet/$update.json"
done
$PY -m manifold_nets.experiments.cli segnet-report results/segnet/un.json results/segnet/sm.json \
  results/segnet/bsgd.json --figure results/segnet/examples.png > results/segnet/metrics.md
