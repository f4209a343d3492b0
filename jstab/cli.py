"""The ``jstab`` command line.

Subcommands are added as the capabilities they run exist (``demo``,
``bench``); today the command shows its help and its version.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from jstab import __version__


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line with ``argv`` (default: ``sys.argv[1:]``).

    Returns the process exit code. An unknown argument or command exits with
    code 2 and a message naming it, as argparse does.
    """
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0
