"""The trajectory gap of Adam-family optimisers under a per-filter rescaling, measured.

On the conv net of ``tests/test_my_model.py`` (float64, batch norm with eps 1e-12) the
first element of ``rescalings(model, inputs, update="sm")`` (the simplest one hypothesis
finds: a per-filter scaling that batch norm makes a symmetry) is applied, and each
optimiser takes 4 steps from w and from g.w; printed: the relative gap of the two models'
outputs before the first step and after each step (``assert_update_equivariant``).

    python benchmarks/adam_invariance.py > benchmarks/results/adam-invariance-2026-12-01.txt
"""

import sys
import warnings
from pathlib import Path

import torch
from hypothesis import find

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from manifold_nets.testing import assert_update_equivariant, rescalings  # noqa: E402
from tests.test_adam import adam, adamp, adamw, riemannian_adam  # noqa: E402
from tests.test_my_model import inputs, loss_fn, model  # noqa: E402

warnings.simplefilter("ignore")
g = find(rescalings(model, inputs, update="sm"), lambda g: True)
print(f"element: {g.label}; torch {torch.__version__}")
print("| optimiser | declared | gap before the first step, then after steps 1-4 |")
print("|---|---|---|")
for name, opt, update in [("InvariantAdam", adam, "sm"), ("InvariantAdam", adam, "un"),
                          ("torch AdamW", adamw, "bsgd"), ("AdamP (adamp 0.3)", adamp, "bsgd"),
                          ("geoopt RiemannianAdam, weight decay 1e-2", riemannian_adam, "sm")]:
    gaps = assert_update_equivariant(model, g, inputs, loss_fn, update=update, steps=4,
                                     optimizer=opt, rtol=1e9)
    print(f"| {name} | {update} | {' '.join(f'{x:.1e}' for x in gaps)} |")
