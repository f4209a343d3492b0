"""``jstab demo``: vanishing and exploding gradients, and their remedies, measured.

Part A trains a deep MLP on scikit-learn's digits with each initialization,
architecture, clipping rule and spectral normalization; part B trains
recurrent networks on the adding problem; part C a deep CNN on the digits'
images; part D the exploding MLP with each optimizer; part E the deep
sigmoid MLP after greedy layer-wise pretraining; part F a small GPT
learning the characters of Python's documentation, whose loss spikes at
an aggressive learning rate and on corrupted batches, with each spike
rule; part G residual MLPs without normalization at 16 and 64 blocks (256
and 1000 with ``--full``), their branches unscaled, scaled with the depth
(GPT-2, Fixup), gated (:class:`jstab.nn.ResidualGate`) or
batch-normalized. Every configuration is diagnosed at initialization and
trained for several seeds; the results make tables and plots.

The pieces are meant to be read and forked:

- :mod:`jstab.demo.data`: the digits split and the adding problem;
- :mod:`jstab.demo.models`: the MLP, the CNN and the recurrent regressor
  (Flax Linen);
- :mod:`jstab.demo.pretrain`: greedy layer-wise pretraining (RBMs with
  CD-1, denoising autoencoders);
- :mod:`jstab.demo.train`: the training loop (seeds vmapped, steps scanned);
- :mod:`jstab.demo.experiments`: the configurations, and measuring one;
- :mod:`jstab.demo.lm` and :mod:`jstab.demo.gpt`: part F, its GPT (Flax
  NNX), data, spike counter, budget, table and plot;
- :mod:`jstab.demo.depth`: part G, its networks, budget, table and plot;
- :mod:`jstab.demo.report`: the table, the plots and the JSON record.

Needs the ``demo`` extra (scikit-learn, matplotlib, tqdm).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from jstab.demo import data, depth, lm, report
from jstab.demo.experiments import (
    CONFIGS,
    DEFAULT,
    QUICK,
    Budget,
    Config,
    Result,
    measure,
)

__all__ = [
    "CONFIGS",
    "DEFAULT",
    "QUICK",
    "Budget",
    "Config",
    "Result",
    "measure",
    "run",
]


def run(
    configs: Sequence[Config] = CONFIGS,
    budget: Budget = DEFAULT,
    out: Path | str | None = None,
    *,
    seed: int = 0,
    progress: bool = True,
    depth_budget: depth.Budget | None = None,
    lm_budget: lm.Budget | None = None,
) -> list[Result]:
    """Measures ``configs`` one after the other; writes the outputs to ``out``.

    Args:
      configs: the configurations, in the table's order.
      budget: the sizes and the training budget of every configuration.
      out: the folder of the table, plots and JSON record
        (:func:`report.write`); nothing is written if ``None``.
      seed: the seed of every key (initializations, minibatches, test data).
      progress: whether to show a progress bar (tqdm) on stderr.
      depth_budget: part G's budget (``jstab.demo.depth.DEFAULT``,
        ``QUICK`` or ``FULL``), to run it after ``configs`` and write
        ``depth.md``, ``depth.json`` and ``depth.png`` into ``out``
        (:func:`jstab.demo.depth.write`); ``None`` leaves part G out.
      lm_budget: part F's budget (``jstab.demo.lm.DEFAULT``, ``QUICK`` or
        ``FULL``), to run it after ``configs`` (before part G) and write
        ``lm.md``, ``lm.json`` and ``lm.png`` into ``out``
        (:func:`jstab.demo.lm.write`); ``None`` leaves part F out.

    Returns:
      One :class:`~jstab.demo.experiments.Result` per configuration (part
      G's rows are in ``out``; :func:`jstab.demo.depth.sweep` returns them).
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    split = data.digits()
    bar = tqdm(
        total=len(configs) * budget.steps,
        unit="step",
        disable=not progress,
        leave=False,
    )
    results = []
    with bar:
        for config in configs:
            bar.set_description(config.name)
            done = bar.n

            def advance(steps: int, done: int = done) -> None:
                bar.update(done + steps - bar.n)

            results.append(
                measure(config, budget, seed=seed, split=split, progress=advance)
            )
    about = {
        "seed": seed,
        "jax": jax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    if out is not None and results:
        report.write(
            results,
            budget,
            Path(out),
            seconds=time.perf_counter() - start,
            **about,
        )
    if lm_budget is not None:
        _part(
            "part F",
            lm.runs(lm_budget) * lm_budget.seeds * lm_budget.steps,
            lambda advance: lm.sweep(lm_budget, seed=seed, progress=advance),
            lambda rows, **kw: lm.write(rows, lm_budget, **kw),
            out,
            progress,
            about,
        )
    if depth_budget is not None:
        _part(
            "part G",
            len(depth_budget.depths)
            * len(depth.groups(depth_budget))
            * depth_budget.steps,
            lambda advance: depth.sweep(
                depth_budget, seed=seed, split=split, progress=advance
            ),
            lambda rows, **kw: depth.write(rows, depth_budget, **kw),
            out,
            progress,
            about,
        )
    return results


def _part(
    name: str,
    total: int,
    sweep: Callable[[Callable[[int], Any]], list],
    write: Callable[..., None],
    out: Path | str | None,
    progress: bool,
    about: dict,
) -> None:
    """A part with a table of its own (F or G): ``sweep(advance)`` under a
    progress bar of ``total`` steps, then ``write`` of its rows into ``out``."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    with tqdm(
        total=total, unit="step", disable=not progress, leave=False, desc=name
    ) as bar:
        rows = sweep(lambda steps: bar.update(steps - bar.n))
    if out is not None:
        seconds = time.perf_counter() - start
        write(rows, out=Path(out), seconds=seconds, **about)
