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

# The tables, by Config.table, in the order they are printed.
PARTS = {
    "digits": "A. Deep MLP on digits (test accuracy; 10 classes, chance 0.1)",
    "precision": (
        "A′. Mixed precision: the MLP of part A with float16 or bfloat16 "
        "parameters and forward pass (test accuracy)"
    ),
    "adding": (
        "B. Recurrent networks on the adding problem (test MSE; always "
        f"predicting 1 gives {data.ADDING_BASELINE:.3f})"
    ),
    "cnn": "C. Deep CNN on the digits' 8×8 images (test accuracy)",
    "optimizers": (
        "D. Optimizers: the exploding MLP (ReLU + N(0, 1)) with each, "
        "with and without clipping (test accuracy)"
    ),
    "pretraining": (
        "E. Greedy layer-wise pretraining of the deep sigmoid MLP, then "
        "Adam (test accuracy)"
    ),
}
# What a table's numbers do not say by themselves, printed below it.
NOTES = {
    "digits": (
        "No clipping rescues ReLU + N(0, 1): its forward pass is broken "
        "before any step. N(0, 1) kernels have 32 times He's variance (a gain "
        "of √32 per layer), so the logits at initialization are about 32^10 "
        "times too large and the softmax is saturated. Clipping bounds the "
        "step, not the forward pass. "
        "ReLU + He with SGD at a large learning rate is the case clipping is "
        "for: the network is sound at initialization, the gradient explodes "
        "in training, and clipping its global norm bounds every step and "
        "rescues the run."
    ),
    "pretraining": (
        "The same network without pretraining is part A's first row, "
        "sigmoid + small N(0, 0.01²), trained with the same Adam; with "
        "--full it is also this table's first row."
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
    for part, title in PARTS.items():
        rows = [row(r, budget.steps) for r in results if r.config.table == part]
        if rows:
            note = f"\n\n{NOTES[part]}" if part in NOTES else ""
            blocks.append(f"{title}\n\n{markdown(_HEAD, rows)}{note}")
    return "\n\n".join(blocks)


def markdown(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table: the header ``head`` and ``rows``, columns aligned."""
    widths = [max(len(c) for c in column) for column in zip(head, *rows, strict=True)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
        for cells in (head, *rows)
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


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
                "table": r.config.table,
                "baseline": r.config.baseline,
                "ratio": r.ratio,
                "diagnosis": r.diagnosis,
                "peak": listed(r.peak),
                "train_loss": listed(r.train_loss),
                "metric": listed(r.metric),
                "clipped": listed(r.clipped),
                "skipped": listed(r.skipped),
                "seconds": r.seconds,
                "flushed": listed(r.flushed),
            }
            for r in results
        ],
    }


def _plain(result: Result) -> bool:
    return result.config.clip is None and result.config.wrap is None


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, values.size))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def _initializations(results: Sequence[Result]) -> dict[str, Result]:
    """The first row of each distinct model and initialization, by name:
    rows with a clip or another optimizer start from the same network as
    one without."""
    found: dict[tuple, Result] = {}
    for r in results:
        c = r.config
        found.setdefault((c.model, c.lsuv, c.pretrain), r)
    return {r.config.name: r for r in found.values()}


def _curve_groups(results: Sequence[Result]) -> dict[str, list[Result]]:
    def rows(table: str, keep) -> list[Result]:
        return [r for r in results if r.config.table == table and keep(r)]

    exploding = lambda r: r.config.name.startswith("ReLU + N(0, 1)")  # noqa: E731
    return {
        "MLP: initializations and architectures": rows(
            "digits", lambda r: not exploding(r)
        ),
        "MLP: N(0, 1), clipped or normalized": rows("digits", exploding),
        "adding problem": rows("adding", bool),
        "CNN": rows("cnn", bool),
        "exploding MLP: optimizers": rows("optimizers", bool),
        "sigmoid MLP: pretraining and initializations": rows("pretraining", bool),
        "MLP: float32, float16 and bfloat16": rows("precision", bool),
    }


def _panels(plt, count: int):
    columns = min(3, count)
    rows = -(-count // columns)
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(6.5 * columns, 5 * rows),
        layout="constrained",
        squeeze=False,
    )
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, axes.flat[:count]


def plots(results: Sequence[Result], out: Path) -> list[Path]:
    """Writes the demo's figures into ``out`` as PNG files; returns their paths.

    - ``grad_norm_at_init.png``: each layer's gradient norm at
      initialization, one panel per table of deep networks (MLP, CNN,
      pretrained sigmoid MLP), one line per initialization and
      architecture;
    - ``activation_std_at_init.png``: the same for the standard deviation
      of each layer's output;
    - ``grad_over_time_at_init.png``: the recurrent networks' gradient with
      respect to each time step's input, at initialization;
    - ``training_curves.png``: the training loss of every configuration,
      in groups;
    - ``precision.png``: for the half-precision rows, the fraction of each
      layer's gradient that float16 (or bfloat16) flushes to zero at
      initialization, and the loss scale at every step.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jstab import plots as jplots

    written = []
    panels = {}
    for table, title in (
        ("digits", "MLP"),
        ("cnn", "CNN"),
        ("pretraining", "sigmoid MLP"),
    ):
        found = _initializations([r for r in results if r.config.table == table])
        reports = {name: r.report for name, r in found.items() if r.report}
        if reports:
            panels[title] = reports
    for plot, what, name in (
        (jplots.plot_grad_norms, "gradient norm", "grad_norm_at_init.png"),
        (jplots.plot_activation_std, "activation std", "activation_std_at_init.png"),
    ):
        if not panels:
            break
        fig, axes = _panels(plt, len(panels))
        for ax, (title, reports) in zip(axes, panels.items(), strict=True):
            plot(reports, ax=ax, title=f"{title}: {what} at initialization")
            ax.legend(fontsize="small")
        written.append(_save(fig, out / name, plt))

    profiles = _initializations([r for r in results if r.config.task == "adding"])
    if profiles:
        fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
        for name, r in profiles.items():
            ax.semilogy(np.arange(1, r.profile.size + 1), r.profile, label=name)
        ax.set_xlabel("time step t")
        ax.set_ylabel("‖∂L/∂x_t‖")
        ax.set_title("Gradient reaching each time step, at initialization")
        ax.legend()
        ax.grid(True, alpha=0.3)
        written.append(_save(fig, out / "grad_over_time_at_init.png", plt))

    groups = {title: rs for title, rs in _curve_groups(results).items() if rs}
    if groups:
        fig, axes = _panels(plt, len(groups))
        for ax, (title, rs) in zip(axes, groups.items(), strict=True):
            window = max(1, rs[0].loss.size // 40)
            curves = {r.config.name: _smooth(r.loss, window) for r in rs}
            jplots.plot_training_curves(curves, ax=ax, title=title)
            ax.set_xlabel(f"step (moving average of {window})")
            ax.legend(fontsize="small")
        written.append(_save(fig, out / "training_curves.png", plt))

    half = [r for r in results if r.flushed is not None]
    if half:
        written.append(_precision(half, out, plt))
    return written


def _precision(results: Sequence[Result], out: Path, plt) -> Path:
    """``precision.png``: flushed gradient per layer, and the loss scale."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    # Rows of one dtype start from the same network: one line per dtype.
    by_dtype = {r.config.dtype: r.flushed for r in reversed(results)}
    for dtype, flushed in by_dtype.items():
        left.plot(np.arange(1, flushed.size + 1), flushed, marker="o", label=dtype)
    left.set_xlabel("layer")
    left.set_ylabel("fraction of gradient elements flushed to 0")
    left.set_title("Gradient lost to the format, at initialization")
    left.set_ylim(-0.02, 1.02)
    left.xaxis.get_major_locator().set_params(integer=True)
    left.legend(fontsize="small")
    left.grid(True, alpha=0.3)
    for r in results:
        if r.loss_scale is not None:
            right.semilogy(
                np.arange(r.loss_scale.size), r.loss_scale, label=r.config.name
            )
    right.set_xlabel("step")
    right.set_ylabel("loss scale")
    right.set_title("dynamic_loss_scale: the scale at every step (seed 0)")
    right.legend(fontsize="small", loc="upper right")
    right.grid(True, alpha=0.3)
    return _save(fig, out / "precision.png", plt)


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
