"""The ``manifold-nets`` command line.

Each sub-command lives beside the code it drives: a module that offers commands defines
``register_cli(subparsers)``, which adds its parsers and sets ``func`` on them. Invalid
arguments exit with status 2 and a usage message (argparse's convention).
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: Modules that contribute sub-commands, in the order they are listed in ``--help``.
COMMAND_MODULES = (
    "manifold_nets.demo",
    "manifold_nets.symmetry",
    "manifold_nets.training",
    "manifold_nets.reproduce",
    "manifold_nets.bench",
    "manifold_nets.segmentation",
)


def positive_int(value: str) -> int:
    """An argparse type: an integer >= 1 (invalid values exit 2 with the usage message)."""
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {value!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="manifold-nets",
        description="Symmetry-invariant optimisation of deep networks (SM and UN updates).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    status = args.func(args)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
