"""Smoke tests: every script in ``examples/`` runs to completion with its quick flag.

Each example runs in a fresh interpreter, as a user would run it. Examples that read
MNIST get the local mirror through ``MANIFOLD_NETS_MIRROR`` (the Makefile exports it) and
are skipped when no mirror is there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

#: Every example, its smoke-test arguments, and whether it reads MNIST.
CASES = {
    "declare_custom_model.py": (["--quick"], True),
    "train_arch2_un.py": (["--quick"], True),
    "check_invariance.py": (["--quick"], False),
    "discover_symmetries.py": (["--quick"], False),
    "train_ddp.py": (["--quick"], True),
}

#: Examples started by a launcher, as their docstring says, rather than by python alone.
LAUNCHERS = {
    # torchrun --standalone --nproc-per-node=2: rendezvous on this machine only
    "train_ddp.py": ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"],
}


def _mirror() -> str | None:
    mirror = os.environ.get("MANIFOLD_NETS_MIRROR")
    return mirror if mirror and Path(mirror).is_dir() else None


def test_every_example_has_a_smoke_test():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == sorted(CASES), "add new examples to CASES in tests/test_examples.py"


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script):
    args, needs_data = CASES[script]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if needs_data:
        if _mirror() is None:
            pytest.skip("no local MNIST mirror (set MANIFOLD_NETS_MIRROR)")
    proc = subprocess.run(
        [sys.executable, *LAUNCHERS.get(script, []), str(EXAMPLES / script), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip(), f"{script} printed nothing"


def test_ddp_example_keeps_the_replicas_identical():
    """``torchrun --nproc-per-node=2 examples/train_ddp.py``: 2 processes (gloo), UN with
    InvariantSGD through DDP; the script exits 1 unless the replicas agree exactly and the
    filters have unit norm, and says so."""
    if _mirror() is None:
        pytest.skip("no local MNIST mirror (set MANIFOLD_NETS_MIRROR)")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, *LAUNCHERS["train_ddp.py"], str(EXAMPLES / "train_ddp.py"),
         "--steps", "10", "--batch", "50"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ("2 processes, 10 steps: largest difference between the processes' weights "
            "0.0e+00; filter norms in [1.000000, 1.000000]") in proc.stdout
