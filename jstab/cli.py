"""The ``jstab`` command line: ``jstab demo``, ``jstab bench``, ``jstab --version``."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
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
        help="train deep networks that vanish, explode, and are fixed",
        description=(
            "Diagnose and train a deep MLP and a deep CNN on scikit-learn's "
            "digits and recurrent networks on the adding problem, with each "
            "initialization, architecture, clipping rule, normalization, "
            "optimizer and greedy pretraining (parts A to E); a small GPT "
            "whose loss spikes at an aggressive learning rate and on corrupted "
            "batches, with each spike rule (part F); then residual "
            "MLPs without normalization at 16 and 64 blocks, their "
            "branches unscaled, scaled with the depth (GPT-2, Fixup), gated "
            "or batch-normalized (part G). Print the tables and write them, "
            "the plots and JSON records into --out. About 6 minutes on 2 "
            "CPU cores; --full runs every configuration and rule, and part "
            "G at 256 and 1000 blocks too; --quick a reduced set for CI, "
            "in about 90 s."
        ),
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the tables, plots, results.json, lm.json and depth.json "
        "(default: a new folder ./jstab-demo-<date>-<time>)",
    )
    level = demo.add_mutually_exclusive_group()
    level.add_argument(
        "--quick", action="store_true", help="a reduced set and budget, for CI"
    )
    level.add_argument(
        "--full",
        action="store_true",
        help="every configuration (the default run leaves out the CNN, the "
        "optimizers' table and the rows whose claim another row shows), "
        "every rule of part F at both learning rates, and part G at 256 and "
        "1000 blocks",
    )
    demo.add_argument(
        "--depth-only",
        action="store_true",
        help="run part G alone (at the budget --quick or --full selects)",
    )
    demo.add_argument(
        "--lm-only",
        action="store_true",
        help="run part F alone, loss spikes in a small GPT (at the budget "
        "--quick or --full selects)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of every key")
    demo.add_argument(
        "--seeds",
        type=_positive,
        default=None,
        help="models per configuration (parts F and G's too)",
    )
    demo.add_argument(
        "--steps",
        type=_positive,
        default=None,
        help="optimizer steps per model (parts F and G's too)",
    )
    demo.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar"
    )
    _bench_parser(commands)
    return parser


def _bench_parser(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="time what each clipping rule costs in a jit-compiled step",
        description=(
            "Time a jit-compiled optimizer step (update and apply, buffers "
            "donated) with each clipping rule of jstab and Optax chained "
            "before the optimizer (a monitor of updates: after it), against "
            "the optimizer alone, on "
            "parameter trees shaped like a ResNet-50, a Transformer and "
            "2000 tiny leaves, and a whole training step of a deep MLP. "
            "Prints a table per tree: median time, the median of paired "
            "ratios to the bare optimizer with their min and max, the "
            "memory-traffic floor, and compile times."
        ),
    )
    bench.add_argument(
        "--tree",
        choices=["resnet", "transformer", "tiny", "all"],
        action="append",
        help="a parameter tree to time (repeatable; default: all)",
    )
    bench.add_argument(
        "--optimizer", choices=["adam", "sgd"], default="adam", help="the baseline"
    )
    bench.add_argument("--json", type=Path, metavar="FILE", help="also write JSON")
    bench.add_argument(
        "--quick", action="store_true", help="small trees and 3 pairs, for CI"
    )
    bench.add_argument("--repeats", type=_positive, help="timed pairs per variant")
    bench.add_argument(
        "--variants",
        metavar="NAMES",
        help="comma-separated variants to time (default: all), e.g. "
        "jstab.clip_by_global_norm,optax.clip_by_global_norm",
    )
    bench.add_argument(
        "--fusions", action="store_true", help="count each step's XLA fusions"
    )
    bench.add_argument(
        "--no-training-step", action="store_true", help="skip the MLP's whole step"
    )
    bench.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar"
    )


def _bench(args: argparse.Namespace) -> int:
    from jstab import bench

    trees = args.tree or ["all"]
    if "all" in trees:
        trees = list(bench.trees.TREES)
    chosen = None
    if args.variants:
        chosen = [name.strip() for name in args.variants.split(",") if name.strip()]
        known = bench.variants.default()
        unknown = [name for name in chosen if name not in known]
        if unknown:
            print(
                f"jstab bench: unknown --variants {unknown}; known: {', '.join(known)}",
                file=sys.stderr,
            )
            return 2
    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            per_table = 1 + len(chosen or bench.variants.default())
            tables = len(trees) + (not args.no_training_step)
            bar = tqdm(total=per_table * tables, unit="variant", file=sys.stderr)

    started = []

    def progress(label: str) -> None:  # a variant starts: the last one is done
        if bar is not None:
            bar.update(len(started) > 0)
            bar.set_description(label)
            started.append(label)

    # Compile times must be compiles: with JAX's persistent compilation
    # cache on (for this user, or this machine), a step found there would be
    # loaded instead, also when the variants of one run lower alike.
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    tables = bench.run(
        trees,
        optimizer=args.optimizer,
        quick=args.quick,
        repeats=args.repeats,
        training=not args.no_training_step,
        variants=chosen,
        fusions=args.fusions,
        progress=progress,
    )
    if bar is not None:
        bar.update(1)
        bar.close()
    machine = bench.machine()
    print(
        f"jstab bench on {machine['device']} ({machine['backend']}, "
        f"{machine['cpu_cores']} CPU cores), jax {machine['jax']}, "
        f"optax {machine['optax']}"
    )
    print(
        "ratio: median over pairs of (variant time / bare optimizer time), "
        "[min, max]; floor: the ratio a memory-bound step cannot beat; ×: "
        "compile time over the bare optimizer's; faults: minor page faults "
        "per step (pages of fresh memory its temporaries touched)\n"
    )
    for table in tables:
        print(bench.format_table(table), end="\n\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(bench.record(tables), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


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
    depth_budget = demo.depth.QUICK if args.quick else demo.depth.DEFAULT
    if args.full:
        depth_budget = demo.depth.FULL
    overrides = {"seeds": args.seeds, "steps": args.steps}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    budget = dataclasses.replace(budget, **overrides)
    depth_budget = dataclasses.replace(depth_budget, **overrides)
    lm_budget = demo.lm.QUICK if args.quick else demo.lm.DEFAULT
    if args.full:
        lm_budget = demo.lm.FULL
    lm_budget = demo.lm.resize(lm_budget, **overrides)
    if args.lm_only and not args.depth_only:
        depth_budget = None
    if args.depth_only and not args.lm_only:
        lm_budget = None
    if args.depth_only or args.lm_only:
        configs = []
    elif args.quick:
        configs = [c for c in demo.CONFIGS if c.quick]
    else:
        configs = [c for c in demo.CONFIGS if args.full or not c.full]
    out = args.out
    if out is None:
        out = Path(f"jstab-demo-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    results = demo.run(
        configs,
        budget,
        out,
        seed=args.seed,
        progress=not args.no_progress,
        depth_budget=depth_budget,
        lm_budget=lm_budget,
    )
    if results:
        print(demo.report.table(results, budget) + "\n")
    if lm_budget is not None:
        print((out / "lm.md").read_text())
    if depth_budget is not None:
        print((out / "depth.md").read_text(), end="")
    print(f"\nTables, plots and JSON records written to {out}/")
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
    if args.command == "bench":
        return _bench(args)
    parser.print_help()
    return 0
