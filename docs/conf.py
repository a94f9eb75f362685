"""Sphinx configuration for manifold-nets.

The build needs no network: intersphinx is off, and MathJax is served from the
``sphinx-mathjax-offline`` package when it is installed (otherwise Sphinx's default CDN
URL is used, which needs a network connection in the reader's browser only).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import manifold_nets  # noqa: E402

project = "manifold-nets"
author = "manifold-nets developers"
copyright = "2025, manifold-nets developers"
release = manifold_nets.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
]
if importlib.util.find_spec("sphinx-mathjax-offline") is not None:
    # Copies MathJax 3 into _static/ so that math renders without a network.
    extensions.append("sphinx-mathjax-offline")

templates_path: list[str] = []
exclude_patterns = ["_build", "figures"]
root_doc = "index"
nitpicky = False

# -- autodoc / numpydoc ---------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "none"
autodoc_default_options = {"show-inheritance": True}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()

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
