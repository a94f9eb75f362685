#!/usr/bin/env bash
# The GPU check, for a machine with one CUDA GPU: at most about 10 minutes.
#
#   1. the CUDA variants of the tests (the `device` fixture adds "cuda" where a GPU is);
#   2. the optimiser step at the sizes people train (ResNet-18's conv weights, two
#      4096 x 4096 Linear weights), momentum 0.9, against torch.optim.SGD(foreach=True)
#      and SGD(fused=True);
#   3. the same weights with InvariantAdam (its foreach path on CUDA) against
#      torch.optim.AdamW(foreach=True) and AdamW(fused=True);
#   4. one Arch2 epoch (4 x 64, batch 100): SGD, SGD(fused=True), UN, SM.
#
# Writes everything under benchmarks/results/gpu-<date>/ (OUT overrides it). Run from the
# repository root, with torch, geoopt, numpy, tqdm, pytest and hypothesis importable:
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu-$(date +%Y-%m-%d)}
PY=${PY:-python3}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)
mkdir -p "$OUT"
{ nvidia-smi; $PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; } \
  > "$OUT/machine.txt" 2>&1
status=0
timeout 240 $PY -m pytest -q -p no:cacheprovider -k cuda tests/test_manifolds.py \
  tests/test_optim.py tests/test_symmetry.py tests/test_fuzz.py tests/test_nets.py 2>&1 | tee "$OUT/tests-cuda.txt" \
  || status=1
timeout 180 $PY -m manifold_nets.experiments.cli bench --nets steps --device cuda \
  --step-threads 1 --step-rounds 7 --output "$OUT/steps.json" 2>&1 | tee "$OUT/steps.txt" \
  || status=1
timeout 120 $PY -m manifold_nets.experiments.cli bench --nets steps --device cuda \
  --step-family adam --step-threads 1 --step-rounds 7 --output "$OUT/adam-steps.json" 2>&1 \
  | tee "$OUT/adam-steps.txt" || status=1
timeout 90 $PY benchmarks/gpu_epoch.py --rounds 3 2>&1 | tee "$OUT/epoch.json" || status=1
echo "results in $OUT (status $status)"
exit $status
