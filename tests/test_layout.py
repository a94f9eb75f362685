"""The architecture holds: the library never imports the experiments, the package's import
graph has no cycle, and the command line speaks one language."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import manifold_nets
from manifold_nets.experiments.cli import build_parser, main

PACKAGE = Path(manifold_nets.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of the package that ``name`` imports, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in modules and t != name}
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_graph_sees_imports():
    """The checks below read the real imports (a control: an empty graph passes them)."""
    graph = _graph()
    assert "manifold_nets.math" in graph["manifold_nets.optim"]
    assert "manifold_nets.declare" in graph["manifold_nets.audit"]
    assert "manifold_nets.symmetry.structure" in graph["manifold_nets.declare"]
    assert "manifold_nets.experiments.loop" in graph["manifold_nets.experiments.engines"]
    assert "manifold_nets.optim" in graph["manifold_nets.experiments.stacked"]


def test_library_never_imports_the_experiments():
    bad = {(m, t) for m, targets in _graph().items() if not m.startswith(
        "manifold_nets.experiments") for t in targets if t.startswith("manifold_nets.experiments")}
    assert not bad, f"library modules import experiments: {sorted(bad)}"


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                cycle = visit(t)
                if cycle:
                    return cycle
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for t in graph[todo.pop()] - seen:
            seen.add(t)
            todo.append(t)
    return seen


#: What declares, optimises or audits: the symmetry package never reaches any of it.
ABOVE_SYMMETRY = {"manifold_nets.declare", "manifold_nets.optim", "manifold_nets.adam",
                  "manifold_nets.audit", "manifold_nets.testing",
                  "manifold_nets.distributed"}


def test_the_symmetry_package_sits_below_declare():
    graph = _graph()
    symmetry = [m for m in graph if m.startswith("manifold_nets.symmetry")]
    bad = {(m, t) for m in symmetry for t in _reach(graph, m) & ABOVE_SYMMETRY}
    assert not bad, f"the symmetry package reaches above itself: {sorted(bad)}"
    # the control: what sits above does reach both declare and the analysis
    assert {"manifold_nets.declare", "manifold_nets.symmetry.structure"} <= _reach(
        graph, "manifold_nets.audit")


def _private_imports(name: str, source: str, modules: set[str], package: str | None = None
                     ) -> set[str]:
    """``module._name`` that ``name``'s source takes from another module of the package:
    ``from module import _name``, or ``alias._name`` on a module it imported. ``package``:
    what its relative imports start from (default: the package holding ``name``)."""
    package = package or name.rpartition(".")[0]
    found, aliases = set(), {}
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module is not None or (
                isinstance(node, ast.ImportFrom) and node.level):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                if f"{base}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{base}.{a.name}"
                elif base in modules and base != name and a.name.startswith("_") \
                        and not a.name.startswith("__"):
                    found.add(f"{base}.{a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in aliases and node.attr.startswith("_") \
                and not node.attr.startswith("__") and aliases[node.value.id] != name:
            found.add(f"{aliases[node.value.id]}.{node.attr}")
    return found


def test_no_module_takes_the_private_names_of_another():
    modules = _modules()
    names = set(modules)
    bad = {m: _private_imports(m, p.read_text(), names,
                               m if p.name == "__init__.py" else None)
           for m, p in modules.items()}
    bad = {m: sorted(v) for m, v in bad.items() if v}
    assert not bad, f"private names taken across modules: {bad}"
    # the control: both forms are seen
    source = ("from .groups import _make\nfrom . import fused as kernel\n"
              "kernel._load()\nfrom .groups import ScalingSpace\n")
    assert _private_imports("manifold_nets.symmetry.audit", source, names | {
        "manifold_nets.symmetry.fused"}) == {"manifold_nets.symmetry.groups._make",
                                            "manifold_nets.symmetry.fused._load"}


def test_importing_the_library_loads_no_experiment():
    code = ("import sys, manifold_nets; "
            "print(sorted(m for m in sys.modules if m.startswith('manifold_nets.experiments')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
    code = ("import sys, manifold_nets.experiments.config; "
            "print('manifold_nets.experiments.config' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "True"  # the control: importing them does load them
    with pytest.raises(AttributeError):  # no experiment name is forwarded from the top
        manifold_nets.TrainConfig  # noqa: B018


def test_the_experiments_run_without_tqdm_and_say_how_to_get_the_bars():
    """tqdm is in the experiments extra: without it a run is the same, drawing nothing,
    and one line names the extra; with it the bars are tqdm's (the control)."""
    code = ("import sys; sys.modules['tqdm'] = sys.modules['tqdm.auto'] = None; "
            "from manifold_nets.experiments import engines, grid, loop; "
            "from manifold_nets.experiments.progress import tqdm; "
            "print(tqdm.__name__); "
            "bar = tqdm(total=2); bar.update(); bar.set_postfix_str('x'); bar.close(); "
            "tqdm(total=1).close(); tqdm.write('written')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["_Silent", "written"]
    assert out.stderr.count("manifold-nets[experiments]") == 1  # said once
    code = "from manifold_nets.experiments.progress import tqdm; print(tqdm.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out.startswith("tqdm")


def test_public_api_stays():
    from manifold_nets import (  # noqa: F401
        Arch1,
        Arch2,
        Declaration,
        DiagScaledEuclidean,
        InvariantSGD,
        ObliqueManifold,
        declare,
    )

    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        manifold_nets.no_such_name  # noqa: B018


def _subcommands(parser=None, prefix="") -> dict[str, argparse.ArgumentParser]:
    """Every command and nested subcommand (``camvid train``) by its full name."""
    parser = parser or build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = {}
    for name, p in action.choices.items():
        found[prefix + name] = p
        if any(isinstance(a, argparse._SubParsersAction) for a in p._actions):
            found.update(_subcommands(p, f"{prefix}{name} "))
    return found


def test_every_command_and_option_is_described():
    commands = _subcommands()
    assert {"demo", "check", "train", "reproduce", "bench", "camvid", "camvid train",
            "camvid evaluate", "camvid report"} <= set(commands)
    assert not {"segnet", "segnet-report"} & set(commands)  # the canvases are retired
    missing = []
    for name, p in commands.items():
        if not p.description:
            missing.append(f"{name}: no description")
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            if not a.help:
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}: no help")
    assert not missing, missing


def test_one_language_across_commands():
    """``--arch`` takes the same values everywhere; lists are space-separated values."""
    arch_choices, list_options = set(), []
    for name, p in _subcommands().items():
        for a in p._actions:
            if a.dest in ("arch", "archs"):
                arch_choices.add(tuple(a.choices))
            if a.dest in ("lr_grid", "seeds", "updates", "depths", "figure_updates"):
                list_options.append((name, a.dest, a.nargs))
    assert arch_choices == {("arch1", "arch2")}
    assert list_options and all(n == "+" for _, _, n in list_options), list_options


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"manifold-nets {manifold_nets.__version__}"


ROOT = PACKAGE.parent


def test_entry_points_resolve():
    """The console script of pyproject.toml and every ``-m module`` the Makefile runs
    exist: the commands of the README work after a move of modules."""
    import importlib
    import re

    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1]
    section = section.split("\n[")[0]
    scripts = dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section, re.M))
    assert scripts, "pyproject.toml declares no console script"
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
    modules = re.findall(r"-m ([\w.]+)", (ROOT / "Makefile").read_text())
    assert "manifold_nets.experiments.cli" in modules
    for module in modules:
        if module.startswith("manifold_nets"):
            importlib.import_module(module)


def test_installed_command_runs():
    """``manifold-nets --version`` from the environment's scripts folder, as a user types
    it (skipped where the package is not installed with its scripts)."""
    import shutil

    exe = shutil.which("manifold-nets", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the manifold-nets script is not installed next to this interpreter")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"manifold-nets {manifold_nets.__version__}"


def test_scripts_import_what_exists():
    """Every ``from manifold_nets... import name`` in the scripts beside the package
    (examples, benchmarks, the results' and the docs' scripts) names something that exists."""
    import importlib

    scripts = [p for folder in ("examples", "benchmarks", "results", "docs")
               for p in (ROOT / folder).rglob("*.py") if "_build" not in p.parts]
    assert len(scripts) >= 8
    missing = []
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "manifold_nets"):
                module = importlib.import_module(node.module)
                missing += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}"
                            for a in node.names if not hasattr(module, a.name)
                            and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert not missing, missing
