"""Sphinx configuration for manifold-nets.

The build needs no network. intersphinx links Python, torch, numpy and geoopt through
the inventories in ``docs/inventories/`` (``make_inventories.py`` there writes them), and
MathJax is served from the ``sphinx-mathjax-offline`` package when it is installed
(otherwise Sphinx's default CDN URL is used, which needs a network connection in the
reader's browser only). The build is nitpicky: every cross-reference must resolve.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import manifold_nets  # noqa: E402

project = "manifold-nets"
author = "manifold-nets developers"
copyright = "2026, manifold-nets developers"
release = manifold_nets.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
]
if importlib.util.find_spec("sphinx-mathjax-offline") is not None:
    # Copies MathJax 3 into _static/ so that math renders without a network.
    extensions.append("sphinx-mathjax-offline")

templates_path: list[str] = []
exclude_patterns = ["_build", "figures", "inventories"]
root_doc = "index"
# `single backticks` are code, as in the error messages the docs quote.
default_role = "code"
nitpicky = True

# -- intersphinx, offline -----------------------------------------------------------------
_INV = Path(__file__).resolve().parent / "inventories"
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", str(_INV / "python.inv")),
    "torch": ("https://docs.pytorch.org/docs/stable", str(_INV / "torch.inv")),
    "numpy": ("https://numpy.org/doc/stable", str(_INV / "numpy.inv")),
    "geoopt": ("https://geoopt.readthedocs.io/en/latest", str(_INV / "geoopt.inv")),
}

# -- autodoc / numpydoc ---------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "none"
autodoc_default_options = {"show-inheritance": True}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
# An Attributes section renders as a table; attributes that references point at carry
# their own ``#:`` doc comment instead.
numpydoc_attributes_as_param_list = False
# Every documented public callable has its parameters, its returns and an example. A
# value (a module's constant, a NamedTuple's or a dataclass's field, an instance
# attribute) is said in its doc comment and shown in the example of what makes or reads
# it: no check asks it for one.


def _values() -> set[str]:
    """The qualified names of the package's documented values: public module constants,
    the fields of its NamedTuples and dataclasses, and the instance attributes its classes
    document with a ``#:`` comment in ``__init__``."""
    import dataclasses
    import inspect
    import pkgutil

    names = set()
    for info in pkgutil.walk_packages(manifold_nets.__path__, "manifold_nets."):
        module = importlib.import_module(info.name)
        for attr in getattr(module, "__all__", ()):
            value = getattr(module, attr)
            if inspect.isclass(value):
                if value.__module__ != module.__name__:
                    continue
                fields = list(getattr(value, "_fields", ()))  # a NamedTuple
                if dataclasses.is_dataclass(value):
                    fields += [f.name for f in dataclasses.fields(value)]
                try:  # instance attributes with a doc comment in a written __init__
                    source = inspect.getsource(vars(value)["__init__"])
                except (KeyError, OSError, TypeError):
                    source = ""
                fields += re.findall(r"#:.*\n\s*self\.(\w+)\s*[:=]", source)
                names.update(f"{module.__name__}.{attr}.{f}" for f in fields)
            elif not (callable(value) or inspect.ismodule(value)):
                names.add(f"{module.__name__}.{attr}")
    return names


numpydoc_validation_checks = {"PR01", "PR02", "RT01", "EX01"}
numpydoc_validation_exclude = {r"\.__init__$", r"\._[a-z]"} | {
    rf"^{re.escape(name)}$" for name in _values()}

# -- doctest ----------------------------------------------------------------------------
doctest_global_setup = """
import torch
torch.manual_seed(0)
torch.set_num_threads(1)
"""

# -- HTML -------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"manifold-nets {release}"
html_static_path = ["_static"]
html_show_sourcelink = False
html_css_files = ["custom.css"]


# -- re-exported names -------------------------------------------------------------------
def _resolve_reexport(app, env, node, contnode):
    """Resolve a name re-exported by a package (``manifold_nets.InvariantSGD``,
    ``manifold_nets.symmetry.discover``) to the module that documents it."""
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target.startswith("manifold_nets."):
        return None
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            return None
        break
    owner = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not owner or not qualname or owner.startswith("manifold_nets") is False:
        return None
    resolved = f"{owner}.{qualname}"
    if resolved == target:
        return None
    return env.get_domain("py").resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], resolved, node, contnode)


def _public_bases(app, name, obj, options, bases):
    """Show a private base class (``nets._PoolNet``) as the public bases it derives from."""
    i = 0
    while i < len(bases):
        if bases[i].__name__.startswith("_"):
            bases[i:i + 1] = list(bases[i].__bases__)
        else:
            i += 1


def setup(app):
    app.connect("missing-reference", _resolve_reexport)
    app.connect("autodoc-process-bases", _public_bases)
