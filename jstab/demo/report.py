"""The demo's outputs: the table, the plots and a JSON record of the run."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jstab.demo import data
from jstab.demo.experiments import Budget, Result

_PARTS = {
    "digits": "A. Deep MLP on digits (test accuracy; 10 classes, chance 0.1)",
    "adding": (
        "B. Recurrent networks on the adding problem (test MSE; always "
        f"predicting 1 gives {data.ADDING_BASELINE:.3f})"
    ),
}
_HEAD = (
    "configuration",
    "grad ratio first/last",
    "diagnosis",
    "peak grad norm",
    "train loss",
    "test",
    "clipped",
    "skipped",
    "time (s)",
)


def _number(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def _spread(values: np.ndarray) -> str:
    """``mean ± std`` over the seeds; a non-finite value shows as such."""
    if not np.all(np.isfinite(values)):
        return _number(float(np.mean(values)))
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def _count(values: np.ndarray | None, steps: int) -> str:
    return "—" if values is None else f"{np.mean(values):.0f}/{steps}"


def row(result: Result, steps: int) -> tuple[str, ...]:
    """The table's cells for ``result``: means over the seeds (the peak
    gradient norm: their median)."""
    return (
        result.config.name,
        _number(result.ratio),
        result.diagnosis,
        _number(float(np.median(result.peak))),
        _number(float(np.mean(result.train_loss))),
        _spread(result.metric),
        _count(result.clipped, steps),
        _count(result.skipped, steps),
        f"{result.seconds:.1f}",
    )


def table(results: Sequence[Result], budget: Budget) -> str:
    """The results as Markdown tables, one per part of the demo."""
    blocks = []
    for task, title in _PARTS.items():
        rows = [row(r, budget.steps) for r in results if r.config.task == task]
        if not rows:
            continue
        widths = [
            max(len(c) for c in column) for column in zip(_HEAD, *rows, strict=True)
        ]
        lines = [
            "| "
            + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
            + " |"
            for cells in (_HEAD, *rows)
        ]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        blocks.append(f"{title}\n\n" + "\n".join(lines))
    return "\n\n".join(blocks)


def record(results: Sequence[Result], budget: Budget, **about: Any) -> dict:
    """A JSON-ready record: the budget, ``about`` and every seed's numbers."""

    def listed(values: np.ndarray | None) -> list | None:
        return None if values is None else [float(v) for v in np.ravel(values)]

    return {
        "budget": vars(budget),
        **about,
        "results": [
            {
                "name": r.config.name,
                "task": r.config.task,
                "ratio": r.ratio,
                "diagnosis": r.diagnosis,
                "peak": listed(r.peak),
                "train_loss": listed(r.train_loss),
                "metric": listed(r.metric),
                "clipped": listed(r.clipped),
                "skipped": listed(r.skipped),
                "seconds": r.seconds,
            }
            for r in results
        ],
    }


def _plain(result: Result) -> bool:
    return result.config.clip is None and result.config.wrap is None


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, values.size))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plots(results: Sequence[Result], out: Path) -> list[Path]:
    """Writes the demo's figures into ``out`` as PNG files; returns their paths.

    - ``grad_norm_at_init.png``: each MLP layer's gradient norm at
      initialization, one line per initialization and architecture;
    - ``grad_over_time_at_init.png``: the recurrent networks' gradient with
      respect to each time step's input, at initialization;
    - ``training_curves.png``: the training loss of every configuration.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jstab import plots as jplots

    written = []
    # The rows with a clip or a wrapper share their initialization with a
    # plain one.
    unclipped = [r for r in results if _plain(r)]
    reports = {r.config.name: r.report for r in unclipped if r.report is not None}
    if reports:
        fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
        jplots.plot_grad_norms(reports, ax=ax, title="Gradient norm at initialization")
        written.append(_save(fig, out / "grad_norm_at_init.png", plt))

    profiles = [r for r in unclipped if r.config.task == "adding"]
    if profiles:
        fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
        for r in profiles:
            ax.semilogy(
                np.arange(1, r.profile.size + 1), r.profile, label=r.config.name
            )
        ax.set_xlabel("time step t")
        ax.set_ylabel("‖∂L/∂x_t‖")
        ax.set_title("Gradient reaching each time step, at initialization")
        ax.legend()
        ax.grid(True, alpha=0.3)
        written.append(_save(fig, out / "grad_over_time_at_init.png", plt))

    recurrent = [r for r in results if r.config.task == "adding"]
    groups = {
        "digits: initializations and architectures": [
            r for r in results if r.config.task == "digits" and _plain(r)
        ],
        "digits: the exploding MLP, clipped": [
            r for r in results if r.config.task == "digits" and not _plain(r)
        ],
        "adding problem": recurrent,
    }
    groups = {title: rs for title, rs in groups.items() if rs}
    if groups:
        fig, axes = plt.subplots(
            1, len(groups), figsize=(6.5 * len(groups), 5), layout="constrained"
        )
        for ax, (title, rs) in zip(np.atleast_1d(axes), groups.items(), strict=True):
            window = max(1, rs[0].loss.size // 40)
            curves = {r.config.name: _smooth(r.loss, window) for r in rs}
            jplots.plot_training_curves(curves, ax=ax, title=title)
            ax.set_xlabel(f"step (moving average of {window})")
            ax.legend(fontsize="small")
        written.append(_save(fig, out / "training_curves.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results: Sequence[Result], budget: Budget, out: Path, **about: Any) -> None:
    """Writes ``table.md``, ``results.json`` and the plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table(results, budget) + "\n")
    (out / "results.json").write_text(
        json.dumps(record(results, budget, **about), indent=1) + "\n"
    )
    plots(results, out)
