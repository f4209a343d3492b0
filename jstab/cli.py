"""The ``jstab`` command line: ``jstab demo`` (and ``jstab --version``)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from collections.abc import Sequence
from pathlib import Path

from jstab import __version__


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Returns the argument parser of the ``jstab`` command."""
    parser = argparse.ArgumentParser(
        prog="jstab",
        description=(
            "jstab: initializers, gradient clipping and diagnostics against "
            "vanishing and exploding gradients in JAX, Flax and Optax."
        ),
    )
    parser.add_argument("--version", action="version", version=f"jstab {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command")
    demo = commands.add_parser(
        "demo",
        help="train deep MLPs and RNNs that vanish, explode, and are fixed",
        description=(
            "Diagnose and train a deep MLP on scikit-learn's digits and "
            "recurrent networks on the adding problem, with each "
            "initialization, architecture and clipping rule; print a table "
            "and write it, the plots and a JSON record into --out. About 5 "
            "minutes on 2 CPU cores; --quick runs a reduced set in about one."
        ),
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the table, plots and results.json "
        "(default: a new folder ./jstab-demo-<date>-<time>)",
    )
    demo.add_argument(
        "--quick", action="store_true", help="a reduced set and budget, for CI"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of every key")
    demo.add_argument(
        "--seeds", type=_positive, default=None, help="models per configuration"
    )
    demo.add_argument(
        "--steps", type=_positive, default=None, help="Adam steps per model"
    )
    demo.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar"
    )
    return parser


def _demo(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as error:
        print(
            f"jstab demo needs the demo extra ({error.name} is missing): "
            "pip install 'jstab[demo]'",
            file=sys.stderr,
        )
        return 1
    from jstab import demo

    budget = demo.QUICK if args.quick else demo.DEFAULT
    overrides = {"seeds": args.seeds, "steps": args.steps}
    budget = dataclasses.replace(
        budget, **{k: v for k, v in overrides.items() if v is not None}
    )
    configs = [c for c in demo.CONFIGS if c.quick or not args.quick]
    out = args.out
    if out is None:
        out = Path(f"jstab-demo-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    results = demo.run(
        configs, budget, out, seed=args.seed, progress=not args.no_progress
    )
    print(demo.report.table(results, budget))
    print(f"\nTable, plots and results.json written to {out}/")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line with ``argv`` (default: ``sys.argv[1:]``).

    Returns the process exit code. An unknown argument or command exits with
    code 2 and a message naming it, as argparse does.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    parser.print_help()
    return 0
