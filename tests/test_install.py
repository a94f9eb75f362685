"""The package that users install is the package that is tested: a wheel and an sdist,
each installed into a fresh virtual environment away from the source tree, build and run
the fused kernel, read the files the package ships, and answer ``--version``.

The fresh environments install manifold-nets alone (``--no-deps``); its dependencies come
from the test run's own environment through a ``.pth`` line, which adds that
``site-packages`` to the path without running its ``.pth`` files, so the editable install
of the checkout is not seen.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import manifold_nets

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
#: Files the package reads at run time, by their path inside the package.
SHIPPED = ("csrc/fused_step.cpp", "experiments/camvid/camvid.sha256", "py.typed")

#: Run in the fresh environment: the import is quiet, the kernel builds from the installed
#: source and takes a UN step with momentum, and the shipped files are the checkout's.
PROBE = r"""
import hashlib, sys, warnings
warnings.simplefilter("error")
import manifold_nets, torch, geoopt
from pathlib import Path
from manifold_nets import InvariantSGD, ObliqueManifold, fused
root = Path(manifold_nets.__file__).parent
assert str(root).startswith(sys.prefix), (root, sys.prefix)
assert fused._SOURCE == root / "csrc" / "fused_step.cpp", fused._SOURCE
oblique = ObliqueManifold(ndim=3)
w = geoopt.ManifoldParameter(oblique.random(8, 3, 3, 3, dtype=torch.float64), manifold=oblique)
w.grad = torch.randn_like(w)
opt = InvariantSGD([w], lr=0.1, momentum=0.9, fused=True)
opt.step()
opt.step()
assert fused.available(), fused.reason()
assert torch.allclose(w.detach().flatten(1).norm(dim=1), torch.ones(8, dtype=torch.float64))
for name in sys.argv[1:]:
    print(name, hashlib.sha256((root / name).read_bytes()).hexdigest())
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _fresh_venv(path: Path) -> Path:
    """A new virtual environment with no package of its own; through a ``.pth`` line it
    sees this environment's site-packages (the dependencies, pip and setuptools)."""
    _run([sys._base_executable, "-m", "venv", "--without-pip", path])
    python = path / "bin" / "python"
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    Path(site.stdout.strip(), "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """An sdist of the checkout, and a wheel built from that sdist (as pip builds one)."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
          "print(b.build_sdist(sys.argv[1]))", out], cwd=ROOT)
    sdist = next(out.glob("manifold_nets-*.tar.gz"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", out, sdist], cwd=out)
    return {"sdist": sdist, "wheel": next(out.glob("manifold_nets-*.whl"))}


def test_the_wheel_and_the_sdist_carry_every_file_the_package_reads(dists):
    with zipfile.ZipFile(dists["wheel"]) as wheel:
        names = set(wheel.namelist())
    with tarfile.open(dists["sdist"]) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    for name in SHIPPED:
        assert f"manifold_nets/{name}" in names, name
        assert f"manifold_nets/{name}" in members, name


def test_a_wheel_without_the_kernel_source_fails_the_probe_and_says_why(dists, tmp_path):
    """The control: the same probe on a wheel that lacks the kernel source fails, and the
    warning names the missing file and the fix."""
    broken = tmp_path / dists["wheel"].name
    with zipfile.ZipFile(dists["wheel"]) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            if not item.filename.endswith("fused_step.cpp"):
                dst.writestr(item, src.read(item))
    python = _fresh_venv(tmp_path / "venv")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
          "-q", broken], cwd=tmp_path)
    result = subprocess.run([python, "-c", PROBE], cwd=tmp_path, capture_output=True,
                            text=True, env=dict(os.environ, MANIFOLD_NETS_FUSED="1"))
    assert result.returncode != 0
    assert "fused_step.cpp is missing from the installed package" in result.stderr
    assert "reinstall manifold-nets" in result.stderr


def test_installed_from_the_wheel_and_the_sdist_the_kernel_runs(dists, tmp_path):
    """Both installs run side by side, each building the kernel from its installed source
    into its own extension folder."""
    procs = {}
    try:
        for kind in ("wheel", "sdist"):
            python = _fresh_venv(tmp_path / kind)
            _run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                  "--no-index", "--ignore-installed", "-q", dists[kind]], cwd=tmp_path)
            env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / f"ext-{kind}"))
            env.pop("MANIFOLD_NETS_FUSED", None)
            env.pop("PYTHONPATH", None)
            version = _run([python.parent / "manifold-nets", "--version"], cwd=tmp_path,
                           env=env)
            assert version.stdout.strip() == f"manifold-nets {manifold_nets.__version__}"
            procs[kind] = subprocess.Popen([python, "-c", PROBE, *SHIPPED], cwd=tmp_path,
                                           env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)
        for kind, proc in procs.items():
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"{kind}:\n{out}\n{err}"
            shas = dict(line.split() for line in out.splitlines())
            assert shas == {name: _sha(ROOT / "manifold_nets" / name) for name in SHIPPED}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
