"""Figures of a signal-propagation report and of training curves.

matplotlib is an optional extra (``pip install jstab[demo]``) and is imported
only here: ``import jstab`` never imports it, ``import jstab.plots`` does.
Figures are built with :class:`matplotlib.figure.Figure` directly, not with
pyplot, so they need no display and leave no global state; in a notebook,
the returned figure shows itself as the cell's value.

A report is what :func:`jstab.signal_propagation` returns, or anything with
its fields: ``layers`` (names in forward order), one value per layer in
``grad_norm`` and ``activation_std``, and the ``vanishing`` and
``exploding`` verdicts. Several runs are drawn side by side from a
``{name: report}`` mapping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# Layer names label the x ticks only if there are at most this many of them,
# none longer than _MAX_NAME characters; otherwise the ticks are indices.
_MAX_NAMED_LAYERS = 30
_MAX_NAME = 32


def _runs(report: Any) -> tuple[dict[str, Any], bool]:
    """``({name: report}, named)``: a single report has the name ``""``."""
    if isinstance(report, Mapping):
        if not report:
            raise ValueError(
                "`report` must be a report or a non-empty {name: report} "
                "mapping, got an empty mapping."
            )
        return {str(name): run for name, run in report.items()}, True
    return {"": report}, False


def _values(argument: str, report: Any, field: str) -> tuple[tuple[str, ...], Any]:
    """``(layers, values)`` of ``report.field``, or raises naming ``argument``."""
    if not hasattr(report, "layers") or not hasattr(report, field):
        raise TypeError(
            f"`{argument}` must be a report of jstab.signal_propagation (with "
            f"`layers` and `{field}`) or a {{name: report}} mapping of them, "
            f"got {type(report).__name__}."
        )
    layers = tuple(str(layer) for layer in report.layers)
    values = _array(f"{argument}.{field}", getattr(report, field))
    if values.shape != (len(layers),):
        raise ValueError(
            f"`{argument}.{field}` must hold one value per layer "
            f"({len(layers)}), got shape {values.shape}."
        )
    return layers, values


def _array(argument: str, values: Any) -> np.ndarray:
    """``values`` as a 1-D float64 array, or raises naming ``argument``."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"`{argument}` must be a sequence of numbers, got {type(values).__name__}."
        ) from error
    if array.ndim != 1:
        raise ValueError(
            f"`{argument}` must be 1-D, got an array of shape {array.shape}."
        )
    return array


def _verdict(report: Any) -> str:
    """``"vanishing"``, ``"exploding"``, both, or ``""``."""
    found = [v for v in ("vanishing", "exploding") if bool(getattr(report, v, False))]
    return ", ".join(found)


def _masked(values: np.ndarray, *, log: bool) -> np.ndarray:
    """``values`` with what an axis cannot draw (non-finite, or ≤ 0 on a log
    axis) replaced by NaN, which matplotlib leaves as a gap."""
    keep = np.isfinite(values) & (values > 0 if log else True)
    return np.where(keep, values, np.nan)


def _axes(ax: Axes | None, width: float = 6.4) -> Axes:
    """``ax``, or the only axes of a new figure."""
    if ax is not None:
        return ax
    return Figure(figsize=(width, 4.2), layout="constrained").add_subplot()


def _figure(ax: Axes) -> Figure:
    """The figure ``ax`` is drawn into (the root one if in a subfigure)."""
    figure = ax.figure
    return getattr(figure, "figure", figure)


def _per_layer(
    report: Any, field: str, ylabel: str, title: str | None, ax: Axes | None
) -> Figure:
    """One line per run of ``report.field`` against depth, on a log axis."""
    runs, named = _runs(report)
    data = {}
    for name, run in runs.items():
        argument = f"report[{name!r}]" if named else "report"
        data[name] = _values(argument, run, field)
    all_layers = {layers for layers, _ in data.values()}
    layers = next(iter(all_layers))
    label_ticks = (
        len(all_layers) == 1
        and 0 < len(layers) <= _MAX_NAMED_LAYERS
        and max(len(layer) for layer in layers) <= _MAX_NAME
    )
    ax = _axes(ax, width=max(6.4, 0.3 * len(layers)) if label_ticks else 6.4)
    for name, (run_layers, values) in data.items():
        verdict = _verdict(runs[name])
        label = f"{name} ({verdict})" if verdict and named else name
        depth = np.arange(len(run_layers))
        ax.plot(depth, _masked(values, log=True), marker="o", label=label)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    if label_ticks:
        ax.set_xticks(np.arange(len(layers)), layers, rotation=45, ha="right")
        ax.set_xlabel("layer")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer (forward order)")
    if title is None:
        title = f"{ylabel} per layer"
        verdict = "" if named else _verdict(runs[""])
        title = f"{title}: {verdict}" if verdict else title
    ax.set_title(title)
    if named:
        ax.legend()
    ax.grid(True, which="major", alpha=0.3)
    return _figure(ax)


def plot_grad_norms(
    report: Any, *, ax: Axes | None = None, title: str | None = None
) -> Figure:
    """Plots each layer's gradient norm against depth, on a log axis.

    Layers are in forward order (input on the left): gradients that vanish
    fall towards the left, gradients that explode rise towards it. Values a
    log axis cannot draw (zero, negative, NaN, inf) are left as gaps.

    Args:
      report: a report of :func:`jstab.signal_propagation`, or a
        ``{name: report}`` mapping to draw several runs side by side (each
        with its own depth range), named in the legend with their verdict.
      ax: the :class:`matplotlib.axes.Axes` to draw into; a new figure if
        ``None``.
      title: the title; by default it names the quantity (and, for a single
        report, its verdict).

    Returns:
      The :class:`matplotlib.figure.Figure` drawn into.
    """
    return _per_layer(report, "grad_norm", "Gradient norm", title, ax)


def plot_activation_std(
    report: Any, *, ax: Axes | None = None, title: str | None = None
) -> Figure:
    """Plots each layer's activation standard deviation against depth.

    The axis is logarithmic: a signal that vanishes or explodes spans
    decades. Layers are in forward order, and values a log axis cannot draw
    are left as gaps, as in :func:`plot_grad_norms`.

    Args:
      report: a report of :func:`jstab.signal_propagation`, or a
        ``{name: report}`` mapping to draw several runs side by side.
      ax: the :class:`matplotlib.axes.Axes` to draw into; a new figure if
        ``None``.
      title: the title; by default it names the quantity (and, for a single
        report, its verdict).

    Returns:
      The :class:`matplotlib.figure.Figure` drawn into.
    """
    return _per_layer(report, "activation_std", "Activation std", title, ax)


def plot_training_curves(
    histories: Mapping[str, Sequence[float] | np.ndarray],
    *,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Plots loss against step, one line per run.

    The loss axis is logarithmic if every finite loss is positive, linear
    otherwise. NaN and inf losses (a run that diverged) are left as gaps.

    Args:
      histories: a ``{name: losses}`` mapping; each ``losses`` is a 1-D
        sequence (list, NumPy or JAX array) of one loss per step. Runs may
        have different lengths.
      ax: the :class:`matplotlib.axes.Axes` to draw into; a new figure if
        ``None``.
      title: the title; ``"Training loss"`` by default.

    Returns:
      The :class:`matplotlib.figure.Figure` drawn into.
    """
    if not isinstance(histories, Mapping):
        raise TypeError(
            "`histories` must be a {name: sequence of losses} mapping, "
            f"got {type(histories).__name__}."
        )
    if not histories:
        raise ValueError(
            "`histories` must be a non-empty {name: sequence of losses} "
            "mapping, got an empty mapping."
        )
    losses = {
        str(name): _array(f"histories[{name!r}]", values)
        for name, values in histories.items()
    }
    finite = np.concatenate([v[np.isfinite(v)] for v in losses.values()])
    log = finite.size > 0 and bool(np.all(finite > 0))
    ax = _axes(ax)
    for name, values in losses.items():
        ax.plot(np.arange(values.size), _masked(values, log=log), label=name)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss" if title is None else title)
    ax.legend()
    ax.grid(True, alpha=0.3)
    return _figure(ax)
