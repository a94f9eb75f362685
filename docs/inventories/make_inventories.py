"""Write the intersphinx inventories that keep the docs build offline.

``python.inv`` is Python's own inventory, copied from Debian's ``python3-doc`` package
(``/usr/share/doc/python3.11/html/objects.inv``). torch, numpy and geoopt publish theirs
online only, so this script writes an inventory of the names these docs reference, each
pointing at its page in the project's official documentation. Add a name here when the
nitpicky build (``make docs``) reports it unresolved, then run::

    python docs/inventories/make_inventories.py

It needs ``sphobjinv`` (``pip install sphobjinv``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import sphobjinv as soi

HERE = Path(__file__).resolve().parent
PYTHON_INV = Path("/usr/share/doc/python3.11/html/objects.inv")

# name -> (role, page relative to the project's documentation root, anchor or None).
# An anchor of None means the name itself.
TORCH_VERSION = "2.13"
TORCH = {
    "torch": ("module", "torch.html", "module-torch"),
    "torch.Tensor": ("class", "tensors.html", None),
    "torch.dtype": ("class", "tensor_attributes.html", None),
    "torch.device": ("class", "tensor_attributes.html", None),
    "torch.Generator": ("class", "generated/torch.Generator.html", None),
    "torch.save": ("function", "generated/torch.save.html", None),
    "torch.load": ("function", "generated/torch.load.html", None),
    "torch.compile": ("function", "generated/torch.compile.html", None),
    "torch.nn.Module": ("class", "generated/torch.nn.Module.html", None),
    "torch.nn.modules.module.Module": (
        "class", "generated/torch.nn.Module.html", "torch.nn.Module"),
    "torch.nn.Parameter": ("class", "generated/torch.nn.parameter.Parameter.html",
                           "torch.nn.parameter.Parameter"),
    "torch.nn.Linear": ("class", "generated/torch.nn.Linear.html", None),
    "torch.nn.Conv1d": ("class", "generated/torch.nn.Conv1d.html", None),
    "torch.nn.Conv2d": ("class", "generated/torch.nn.Conv2d.html", None),
    "torch.nn.Embedding": ("class", "generated/torch.nn.Embedding.html", None),
    "torch.nn.BatchNorm1d": ("class", "generated/torch.nn.BatchNorm1d.html", None),
    "torch.nn.BatchNorm2d": ("class", "generated/torch.nn.BatchNorm2d.html", None),
    "torch.nn.LayerNorm": ("class", "generated/torch.nn.LayerNorm.html", None),
    "torch.nn.GroupNorm": ("class", "generated/torch.nn.GroupNorm.html", None),
    "torch.nn.MultiheadAttention": (
        "class", "generated/torch.nn.MultiheadAttention.html", None),
    "torch.nn.Sequential": ("class", "generated/torch.nn.Sequential.html", None),
    "torch.nn.ReLU": ("class", "generated/torch.nn.ReLU.html", None),
    "torch.nn.CrossEntropyLoss": ("class", "generated/torch.nn.CrossEntropyLoss.html", None),
    "torch.nn.functional.cross_entropy": (
        "function", "generated/torch.nn.functional.cross_entropy.html", None),
    "torch.optim": ("module", "optim.html", "module-torch.optim"),
    "torch.optim.sgd": ("module", "generated/torch.optim.SGD.html", "torch.optim.SGD"),
    "torch.optim.SGD": ("class", "generated/torch.optim.SGD.html", None),
    "torch.optim.Adam": ("class", "generated/torch.optim.Adam.html", None),
    "torch.optim.AdamW": ("class", "generated/torch.optim.AdamW.html", None),
    "torch.optim.adam.adam": ("function", "generated/torch.optim.Adam.html", "torch.optim.Adam"),
    "torch.optim.Optimizer": ("class", "optim.html", None),
    "torch.optim.optimizer.Optimizer": ("class", "optim.html", "torch.optim.Optimizer"),
    "torch.fx": ("module", "fx.html", "module-torch.fx"),
    "torch.func.jvp": ("function", "generated/torch.func.jvp.html", None),
    "torch.func.vmap": ("function", "generated/torch.func.vmap.html", None),
    "torch.func.functional_call": (
        "function", "generated/torch.func.functional_call.html", None),
    "torch.utils.data.DataLoader": ("class", "data.html", None),
    "torch.distributed.fsdp.fully_shard": (
        "function", "distributed.fsdp.fully_shard.html", None),
    "torch.distributed.tensor.DTensor": ("class", "distributed.tensor.html", None),
    "torch.distributed.checkpoint": (
        "module", "distributed.checkpoint.html", "module-torch.distributed.checkpoint"),
}
NUMPY = {
    "numpy": ("module", "reference/index.html", "module-numpy"),
    "numpy.ndarray": ("class", "reference/generated/numpy.ndarray.html", None),
    "numpy.random.Generator": ("class", "reference/random/generator.html", None),
}
GEOOPT = {
    "geoopt": ("module", "index.html", "module-geoopt"),
    "geoopt.Manifold": ("class", "manifolds.html", "geoopt.manifolds.Euclidean"),
    "geoopt.manifolds.base.Manifold": (
        "class", "manifolds.html", "geoopt.manifolds.Euclidean"),
    "geoopt.manifolds.Euclidean": ("class", "manifolds.html", None),
    "geoopt.Euclidean": ("class", "manifolds.html", "geoopt.manifolds.Euclidean"),
    "geoopt.manifolds.Sphere": ("class", "manifolds.html", None),
    "geoopt.Sphere": ("class", "manifolds.html", "geoopt.manifolds.Sphere"),
    "geoopt.ManifoldParameter": ("class", "tensors.html", "geoopt.tensor.ManifoldParameter"),
    "geoopt.tensor.ManifoldParameter": ("class", "tensors.html", None),
    "geoopt.ManifoldTensor": ("class", "tensors.html", "geoopt.tensor.ManifoldTensor"),
    "geoopt.optim.RiemannianSGD": ("class", "optimizers.html", None),
    "geoopt.optim.RiemannianAdam": ("class", "optimizers.html", None),
}


def write(project: str, version: str, names: dict, path: Path) -> None:
    inv = soi.Inventory()
    inv.project, inv.version = project, version
    for name, (role, page, anchor) in sorted(names.items()):
        anchor = name if anchor is None else anchor
        inv.objects.append(soi.DataObjStr(
            name=name, domain="py", role=role, priority="1",
            uri=f"{page}#{anchor}", dispname="-"))
    soi.writebytes(path, soi.compress(inv.data_file(contract=True)))


def main() -> None:
    if PYTHON_INV.exists():
        shutil.copyfile(PYTHON_INV, HERE / "python.inv")
    write("PyTorch", TORCH_VERSION, TORCH, HERE / "torch.inv")
    write("NumPy", "2", NUMPY, HERE / "numpy.inv")
    write("geoopt", "0.5", GEOOPT, HERE / "geoopt.inv")


if __name__ == "__main__":
    main()
