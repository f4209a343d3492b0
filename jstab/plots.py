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


# Fields of a history that hold one value per layer: the key's rest is a path.
_PER_LAYER = frozenset({"layer_norms", "update_norms", "param_norms", "update_ratio"})
# Fields that flag or count events; drawn only if named in `keys`.
_MARKERS = frozenset(
    {"clipped", "skipped", "spike", "clip_count", "skip_count"}
    | {"nonfinite", "vanishing", "exploding"}
)
# Fields that span decades (as do those named "...norm..."): a log axis.
_LOG = frozenset({"update_ratio", "threshold", "mean", "std"})
_STYLES = {
    "threshold": {"linestyle": "--", "color": "0.35"},
    "mean": {"linewidth": 0.8},
}


def _split(key: str) -> tuple[str, str, str, bool]:
    """``(group, field, label, per_layer)`` of a key of a history.

    ``"zclip/norm"`` is ``("zclip", "norm", "norm", False)``, ``"loss"`` is
    ``("loss", "loss", "loss", False)``; a per-layer key is grouped by its
    field, labelled by its layer path: ``"monitor_gradients/layer_norms/
    Dense_0/kernel"`` is ``("monitor_gradients/layer_norms", "layer_norms",
    "Dense_0/kernel", True)``.
    """
    parts = key.split("/")
    for i in range(1, len(parts) - 1):  # parts[0] is a rule or a prefix
        if parts[i] in _PER_LAYER or parts[i] == "norm":
            group, label = "/".join(parts[: i + 1]), "/".join(parts[i + 1 :])
            return group, parts[i], label, True
    return "/".join(parts[:-1]) or key, parts[-1], parts[-1], False


def _history(history: Any) -> dict[str, np.ndarray]:
    """``{key: values}``, one float64 value per step, or raises."""
    import jax  # a dependency of jstab; fetches all the arrays at once

    if isinstance(history, Mapping):
        values = jax.device_get(list(history.values()))  # a list keeps the order
        data = {
            str(key): _array(f"history[{key!r}]", value)
            for key, value in zip(history, values, strict=True)
        }
        lengths = {key: value.size for key, value in data.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"`history` must hold as many values for each key, got {lengths}."
            )
    elif isinstance(history, Sequence) and not isinstance(history, (str, bytes)):
        for i, record in enumerate(history):
            if not isinstance(record, Mapping):
                raise TypeError(
                    f"`history[{i}]` must be a {{key: scalar}} dict, "
                    f"got {type(record).__name__}."
                )
        values = jax.device_get([list(record.values()) for record in history])
        data = {}
        for i, record in enumerate(history):
            for key, value in zip(record, values[i], strict=True):
                try:
                    value = np.asarray(value, dtype=np.float64)
                except (TypeError, ValueError) as error:
                    raise TypeError(
                        f"`history[{i}][{key!r}]` must be a number, "
                        f"got {type(value).__name__}."
                    ) from error
                if value.ndim:
                    raise ValueError(
                        f"`history[{i}][{key!r}]` must be a scalar, "
                        f"got an array of shape {value.shape}."
                    )
                data.setdefault(str(key), np.full(len(history), np.nan))[i] = value
    else:
        raise TypeError(
            "`history` must be a sequence of {key: scalar} dicts or a "
            f"{{key: values}} mapping, got {type(history).__name__}."
        )
    if not data or not next(iter(data.values())).size:
        raise ValueError("`history` must hold at least one step, got none.")
    return data


def plot_history(
    history: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    keys: Sequence[str] | None = None,
    *,
    steps: Sequence[float] | np.ndarray | None = None,
) -> Figure:
    """Plots logged statistics against step, one panel per transform.

    A key's panel is its group, the key without its last part: the norm,
    threshold and running mean of ``"zclip/..."`` share the panel
    ``zclip``, and a key without ``/`` (``"loss"``) has one of its own, at
    the top.
    Per-layer keys (``".../layer_norms/<layer>"``, ``".../norm/<layer>"``
    and the like) share one panel per field, one line per layer. Panels are
    stacked in the order their keys first appear (a history returned from
    ``jax.jit`` has its keys sorted), on a shared step axis.

    Norms, thresholds, means and standard deviations are drawn on a log
    axis, where values it cannot draw are gaps; thresholds are dashed.
    Steps where a transform clipped (its ``clipped`` is positive) are marked
    on its norm with an ``x``; steps where any ``skipped`` is true are red
    vertical lines in every panel. The counts are in the legends.

    A history is logged during training, for example::

        history = []
        for batch in batches:
            params, state, loss = train_step(params, state, batch)
            history.append(jstab.statistics(state) | {"loss": loss})
        fig = jstab.plots.plot_history(history)

    Args:
      history: the statistics of each step, as a sequence of ``{key:
        scalar}`` dicts such as :func:`jstab.statistics` returns (a key
        missing at a step is NaN there), or as one ``{key: values}``
        mapping of 1-D sequences of equal length (a stacked history, from
        ``jax.lax.scan`` for example). Values are JAX or NumPy arrays or
        Python numbers. A key ``"step"`` gives the x values.
      keys: the keys to draw. By default, every key but per-layer ones (save
        the norms of a rule with nothing else to draw, such as
        :func:`jstab.clip_by_layer_norm`) and event flags and counters
        (``clipped``, ``skipped``, ``spike``, ``clip_count``, ``skip_count``,
        ``nonfinite``, ``vanishing``, ``exploding``), which are still used
        for the marks.
      steps: the x value of each step; by default the history's ``"step"``
        values if it has them, else ``0, 1, 2, ...``.

    Returns:
      The :class:`matplotlib.figure.Figure` drawn into.

    Example:
      >>> from jstab.plots import plot_history
      >>> history = [
      ...     {"zclip/norm": 2.0, "zclip/clipped": 0.0, "loss": 1.0},
      ...     {"zclip/norm": 9.0, "zclip/clipped": 1.0, "loss": 0.5},
      ... ]
      >>> fig = plot_history(history)
      >>> [ax.get_title() for ax in fig.axes]
      ['loss', 'zclip']
    """
    data = _history(history)
    n = next(iter(data.values())).size
    if steps is not None:
        x = _array("steps", steps)
        if x.size != n:
            raise ValueError(
                f"`steps` must hold one value per step of `history` ({n}), "
                f"got {x.size}."
            )
    else:
        x = data["step"] if "step" in data else np.arange(n, dtype=np.float64)
    split = {key: _split(key) for key in data}
    if keys is None:
        # Not per-layer keys, markers or `step`; but the per-layer norms of
        # a rule with nothing else to draw (clip_by_layer_norm).
        plain = {
            k
            for k, (_, field, _, per_layer) in split.items()
            if not per_layer and field not in _MARKERS and k != "step"
        }
        rules = {split[k][0] for k in plain}
        chosen = [
            k
            for k, (group, field, _, per_layer) in split.items()
            if k in plain
            or (per_layer and field == "norm" and group.rsplit("/", 1)[0] not in rules)
        ] or [k for k in data if k != "step"]
        if not chosen:
            raise ValueError("`history` must hold a key other than `step`.")
    else:
        chosen = [keys] if isinstance(keys, str) else list(keys)
        unknown = [k for k in chosen if k not in data]
        if unknown or not chosen:
            raise ValueError(
                f"`keys` must name keys of `history` ({', '.join(data)}), "
                f"got {unknown or 'none'}."
            )
    groups: dict[str, list[str]] = {}
    # The user's own keys ("loss") first, then the rules', in order met.
    for key in sorted(chosen, key=lambda k: "/" in k):
        groups.setdefault(split[key][0], []).append(key)
    skipped = np.zeros(n, dtype=bool)
    for key, (_, field, _, per_layer) in split.items():
        if field == "skipped" and not per_layer:
            skipped |= np.isfinite(data[key]) & (data[key] != 0)

    figure = Figure(figsize=(8.0, 0.6 + 2.0 * len(groups)), layout="constrained")
    axes = figure.subplots(len(groups), 1, sharex=True, squeeze=False)[:, 0]
    for i, (group, group_keys) in enumerate(groups.items()):
        ax = axes[i]
        fields = [split[key][1] for key in group_keys]
        log = any("norm" in f or f in _LOG for f in fields)
        for key, field in zip(group_keys, fields, strict=True):
            ax.plot(
                x,
                _masked(data[key], log=log),
                label=split[key][2],
                **_STYLES.get(field, {}),
            )
        clipped = data.get(f"{group}/clipped", np.zeros(n)) > 0
        norms = [
            k for k in group_keys if k in (f"{group}/norm", f"{group}/global_norm")
        ]
        if norms and clipped.any():
            ax.plot(
                x[clipped],
                _masked(data[norms[0]][clipped], log=log),
                linestyle="none",
                marker="x",
                color="black",
                label=f"clipped ({clipped.sum()})",
            )
        if skipped.any():
            ax.vlines(
                x[skipped],
                0,
                1,
                transform=ax.get_xaxis_transform(),
                color="red",
                linewidth=0.8,
                alpha=0.6,
                label=None if i else f"skipped ({skipped.sum()})",
            )
        if log:
            ax.set_yscale("log")
        ax.set_title(group)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    axes[-1].set_xlabel("step")
    return figure
