"""Fan-in and fan-out of a weight tensor."""

from __future__ import annotations

import math
from collections.abc import Sequence

from jstab import _checks

Axes = int | Sequence[int]


def hashable_axes(name: str, axes: Axes) -> int | tuple[int, ...]:
    """``axes`` as an int or a tuple of ints, or a TypeError naming ``name``."""
    if isinstance(axes, int) and not isinstance(axes, bool):
        return axes
    try:
        items = tuple(axes)  # type: ignore[arg-type]
    except TypeError:
        items = (axes,)
    if any(isinstance(a, bool) or not isinstance(a, int) for a in items):
        raise TypeError(f"`{name}` must be an int or a sequence of ints, got {axes!r}.")
    return items


def _axes(name: str, axes: Axes, rank: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Normalises ``axes`` to a tuple of non-negative ints within ``rank``."""
    items = hashable_axes(name, axes)
    result = []
    for axis in (items,) if isinstance(items, int) else items:
        if not -rank <= axis < rank:
            raise ValueError(f"`{name}` (={axes!r}) is out of range for shape {shape}.")
        result.append(axis % rank)
    return tuple(result)


def compute_fans(
    shape: Sequence[int],
    in_axis: Axes = -2,
    out_axis: Axes = -1,
    batch_axis: Axes = (),
) -> tuple[int, int]:
    r"""Returns ``(fan_in, fan_out)`` of a weight tensor of shape ``shape``.

    Every axis that is none of ``in_axis``, ``out_axis`` and ``batch_axis`` is
    part of the receptive field (a convolution's spatial taps), so

    .. math::
      \text{fan\_in} = n_\text{in} \cdot r, \qquad
      \text{fan\_out} = n_\text{out} \cdot r, \qquad
      r = \prod_{a \notin \text{in} \cup \text{out} \cup \text{batch}} d_a.

    A dense kernel ``(in, out)`` gives ``(in, out)``; a Flax convolution
    kernel ``(k_h, k_w, c_in, c_out)`` gives ``(c_in·k_h·k_w, c_out·k_h·k_w)``;
    an attention kernel ``(d_model, heads, head_dim)`` is handled by choosing
    the axes, e.g. ``in_axis=0, out_axis=(1, 2)``. Axes in ``batch_axis``
    (e.g. a stack of layers) count in neither fan.

    Args:
      shape: the shape of the weight tensor, of rank ≥ 2.
      in_axis: axis or axes of the inputs.
      out_axis: axis or axes of the outputs.
      batch_axis: axis or axes that are ignored.

    Returns:
      ``(fan_in, fan_out)`` as Python ints.

    Raises:
      ValueError: ``shape`` has rank 0 or 1, or the axes are out of range or
        overlap.
    """
    shape = _checks.shape_tuple(shape)
    rank = len(shape)
    if rank < 2:
        raise ValueError(
            f"`shape` (={shape}) has rank {rank}; fan-based initializers need a "
            "weight of rank >= 2, e.g. a dense kernel (in, out). Initialize a "
            "bias or a scale with a constant or `small_normal` instead."
        )
    ins = _axes("in_axis", in_axis, rank, shape)
    outs = _axes("out_axis", out_axis, rank, shape)
    batch = _axes("batch_axis", batch_axis, rank, shape)
    named = ins + outs + batch
    if len(set(named)) != len(named):
        raise ValueError(
            f"`in_axis` (={in_axis!r}), `out_axis` (={out_axis!r}) and "
            f"`batch_axis` (={batch_axis!r}) must name distinct axes of shape {shape}."
        )
    receptive = math.prod(d for a, d in enumerate(shape) if a not in named)
    fan_in = math.prod(shape[a] for a in ins) * receptive
    fan_out = math.prod(shape[a] for a in outs) * receptive
    return fan_in, fan_out
