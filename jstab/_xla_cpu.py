"""The CPU forms of the reductions in :mod:`jstab._numerics`.

XLA's CPU backend compiles each distinct kernel apart (about 8 ms each), its
passes take time that grows faster than the number of instructions, and it
fuses what a GPU would keep apart. The functions here give the same results
as their plain forms in ``_numerics`` (tests check it, bit for bit or to an
ulp), in programs that XLA's CPU backend compiles or runs faster. Each is
used only where a program is lowered for the CPU (``lax.platform_dependent``
in ``_numerics._dispatch``); each says what it saves, and the performance
page of the documentation gives the figures.

``JSTAB_XLA_CPU`` chooses which are used: unset or ``all``, every one;
``none``, none; or a comma-separated list of their names. It is read when a
step is traced: a function that ``jax.jit`` has traced already keeps what
it was traced with.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jstab import _numerics

#: The functions of this module that stand for a plain form in ``_numerics``.
NAMES = (
    "group_reduce",
    "unstack",
    "element_statistics",
    "count_positive",
    "sumsq_and_count",
    "watch",
)


def enabled(name: str) -> bool:
    """Whether the CPU form ``name`` is in use (``JSTAB_XLA_CPU``)."""
    value = os.environ.get("JSTAB_XLA_CPU", "all").strip()
    if value == "all":
        return True
    chosen = {v.strip() for v in value.split(",")} - {"", "none"}
    unknown = chosen - set(NAMES)
    if unknown:
        raise ValueError(
            f"JSTAB_XLA_CPU names {sorted(unknown)}; it must be 'all', 'none' or "
            f"a comma-separated list of {', '.join(NAMES)}."
        )
    return name in chosen


# -------------------------------------------------------------- group_reduce

#: Leaves of at most this many elements that one group owns are reduced in
#: batches: those of equal size are stacked into one ``(k, size)`` array and
#: reduced along its rows. A global norm over 2000 leaves of 256 took 58 s to
#: compile on CPU, with its rescue pass, when each leaf had its own reduction
#: and the sums were added in one chain; stacked 64 to a reduction
#: (:data:`STACK`), 2.3 s. Stacking copies the leaves, which is cheap only
#: while they are small: bigger leaves are reduced where they are.
SMALL_LEAF = 1 << 14

#: Leaves stacked per reduction: XLA's CPU compiler takes time quadratic in the
#: number of operands of a concatenation fused into a reduction (2000 leaves
#: in one: 3.2 s; in 32 reductions of 64: 0.6 s).
STACK = 64


def group_reduce(leaves, r, *, groups, dtype, kind):
    """:func:`jstab._numerics.group_reduce`, in few distinct kernels.

    The small leaves of a group are stacked by size (:func:`_group`), and
    the groups of one small leaf (a per-layer rule) by size across groups:
    64 layers cost one reduction and give 64 entries of the result.
    """
    single = [k for k, g in enumerate(groups) if len(g) == 1]
    _, stacks = batches(single, lambda k: leaves[groups[k][0]])
    order, parts = [], []
    for size, chunks in stacks.items():
        for chunk in chunks:
            index = [groups[k][0] for k in chunk]
            rk = None if r is None else _take(r, chunk)[:, None]
            parts.append(_rows(leaves, index, size, dtype, kind, rk))
            order += chunk
    rest = sorted(set(range(len(groups))) - set(order))
    if rest:
        # Their multipliers as scalars, by kernels alike: a slice ``r[k]``
        # each would be a kernel each, compiled apart (74 of 190 kernels in
        # clip_by_layer_norm's step on the Transformer tree).
        rs = [None] * len(rest) if r is None else unstack((_take(r, rest),))[0]
        each = [
            _group(leaves, groups[k], dtype, kind, rk)
            for k, rk in zip(rest, rs, strict=True)
        ]
        parts.append(stack(each))
        order += rest
    out = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
    if order != sorted(order):
        out = out[np.argsort(order)]
    return out


def _rows(leaves, index, size, dtype, kind, r=None) -> chex.Array:
    """The reductions of ``leaves[i]``, ``i`` in ``index``, as one vector.

    The leaves, at most :data:`STACK`, all of ``size`` elements, are stacked
    into one ``(k, size)`` array reduced along its rows. ``r`` is a scalar or
    a ``(k, 1)`` column: one multiplier per row.
    """
    wide = dtype
    if kind == "nonfinite":  # a lossless common dtype, not the count's
        wide = _numerics.accumulation_dtype([leaves[i] for i in index])
    rows = lax.concatenate([leaves[i].reshape(1, size).astype(wide) for i in index], 0)
    return _numerics.reduce(_numerics.elements(rows, dtype, kind, r), kind, axis=1)


def _batchable(x: chex.Array) -> bool:
    """Whether ``x`` is small and not split by an explicit sharding.

    Under ``jax.sharding.AxisType.Explicit`` a split leaf cannot be reshaped
    without naming the result's sharding: it is reduced where it is.
    """
    if x.size > SMALL_LEAF:
        return False
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", ())
    return all(axis is None for axis in spec)


def batches(
    index: Sequence[int], leaf: Callable[[int], chex.Array]
) -> tuple[list[int], dict[int, list[list[int]]]]:
    """How to reduce the arrays ``leaf(i)``, ``i`` in ``index``, in few kernels.

    Returns the ``i`` to reduce alone (big arrays, by a kernel shared with
    the arrays of their shape, and those whose size no other shares), and
    by size the others, in stacks of at most :data:`STACK` (one ``(k,
    size)`` array each, reduced along its rows), so that many leaves cost a
    few reductions.
    """
    sizes: dict[int, list[int]] = {}
    for i in index:
        if _batchable(leaf(i)):
            sizes.setdefault(leaf(i).size, []).append(i)
    sizes = {size: same for size, same in sizes.items() if len(same) > 1}
    stacked = {i for same in sizes.values() for i in same}
    stacks = {
        size: [same[j : j + STACK] for j in range(0, len(same), STACK)]
        for size, same in sizes.items()
    }
    return [i for i in index if i not in stacked], stacks


def _group(leaves, group, dtype, kind, r) -> chex.Array:
    """The reduction of all of ``leaves[i]``, ``i`` in ``group``: a scalar,
    by the kernels :func:`batches` plans."""
    alone, stacks = batches(group, leaves.__getitem__)
    parts = [
        _numerics.reduce(_numerics.elements(leaves[i], dtype, kind, r), kind)
        for i in alone
    ]
    for size, chunks in stacks.items():
        rows = [_rows(leaves, chunk, size, dtype, kind, r) for chunk in chunks]
        parts.append(_numerics.reduce(jnp.concatenate(rows), kind))
    if not parts:
        return jnp.zeros((), dtype)
    return parts[0] if len(parts) == 1 else _numerics.reduce(stack(parts), kind)


def _take(vector: chex.Array, index: Sequence[int]) -> chex.Array:
    """``vector[index]``: a slice where ``index`` is contiguous, else a gather."""
    if list(index) == list(range(index[0], index[0] + len(index))):
        return lax.slice_in_dim(vector, index[0], index[0] + len(index))
    return vector[np.asarray(index)]


def stack(scalars: Sequence[chex.Array]) -> chex.Array:
    """``jnp.stack(scalars)``, built :data:`STACK` at a time.

    XLA would fuse the stacking of 2000 scalars, and what computes them, into
    one kernel of 2000 operands, which its CPU backend compiles in seconds.
    Behind an optimization barrier, pieces of 64 are kernels alike, compiled
    once.
    """
    parts = [jnp.stack(scalars[j : j + STACK]) for j in range(0, len(scalars), STACK)]
    if len(parts) == 1:
        return parts[0]
    return jnp.concatenate(lax.optimization_barrier(parts))


# ------------------------------------------------------------------- unstack


def unstack(vectors) -> list[list[chex.Array]]:
    """Each of ``vectors`` as a list of scalars, its entries.

    ``v[k]`` for each ``k`` is a slice kernel per entry, each one distinct
    (its offset differs) and compiled alone: XLA took 20 s instead of 4.5 s
    to compile a per-layer clip on 500 layers. Here the entries come out of
    variadic reductions, whose kernels XLA compiles once each: ``v``, padded,
    is laid out as a ``(c, w)`` grid about ``sqrt(n)`` square (``w`` at most
    :data:`STACK`), one reduction gives its ``w`` columns, and ``w`` alike
    give each column's ``c`` entries. Each reduces ``select(iota == k, v,
    fill)`` by keeping what is not ``fill``, the lowest value of the dtype:
    a select copies bits, so the entries are exact (arithmetic on CPU would
    flush denormals to 0).
    """
    if len({v.dtype for v in vectors}) > 1:
        return [_unstack(v) for v in vectors]
    every = _unstack(jnp.concatenate(vectors)) if vectors else []
    ends = np.cumsum([0] + [v.shape[0] for v in vectors])
    return [every[a:b] for a, b in zip(ends[:-1], ends[1:], strict=True)]


def _unstack(v: chex.Array) -> list[chex.Array]:
    n = v.shape[0]
    if n == 0:
        return []
    fill = _lowest(v.dtype)
    w = min(math.ceil(math.sqrt(n)), STACK)
    c = -(-n // w)
    grid = jnp.pad(v, (0, c * w - n), constant_values=fill).reshape(c, w)
    columns = _pick(grid, _masks(grid.shape, 1), 1, fill)
    masks = _masks((c,), 0)
    rows = [_pick(column, masks, 0, fill) for column in columns]
    return [rows[i % w][i // w] for i in range(n)]


def _masks(shape: tuple[int, ...], axis: int) -> list[chex.Array]:
    """For each ``k``, where along ``axis`` the index is ``k``."""
    iota = lax.broadcasted_iota(jnp.int32, shape, axis)
    return [lax.eq(iota, lax.full(shape, k, jnp.int32)) for k in range(shape[axis])]


def _pick(x: chex.Array, masks: list, axis: int, fill: np.ndarray) -> list:
    """``x``'s slices along ``axis`` (``masks`` from :func:`_masks`), by one
    variadic reduction."""
    fills = lax.full(x.shape, fill, x.dtype)
    ops = [lax.select(mask, x, fills) for mask in masks]
    return lax.reduce(ops, [fill] * len(ops), _keep(fill), (axis,))


def _lowest(dtype: jnp.dtype) -> np.ndarray:
    """The lowest value of ``dtype``: -inf, the most negative integer, False."""
    if jnp.issubdtype(dtype, jnp.floating):
        return np.array(-np.inf, dtype)
    if dtype == jnp.bool_:
        return np.array(False)
    return np.array(jnp.iinfo(dtype).min, dtype)


def _keep(fill):
    """The reducer of :func:`unstack`: whichever of ``a``, ``b`` is not ``fill``."""

    def keep(a, b):
        return [lax.select(lax.eq(y, fill), x, y) for x, y in zip(a, b, strict=True)]

    return keep


# ------------------------------------------------------- variadic reductions


def _max_add(a, b):
    return jnp.maximum(a[0], b[0]), a[1] + b[1]


def _statistics(x, lo, hi, dtype, axis=None):
    """The largest ``|x|`` and the number of elements outside ``[lo, hi]``.

    One variadic reduction, one read of ``x``: on XLA's CPU it runs at the
    speed of the count alone, which a pass for the maximum then doubled
    (25.6M float32 elements: 6.0 ms against 3.6 + 6.4 ms), and the count is
    an exact int32. ``lo is None`` counts ``|x| > hi``, the symmetric case.
    ``axis`` (default: all) is the axis reduced.
    """
    zero = jnp.zeros((), dtype)
    # XLA would share one broadcast of each bound among all the arrays of a
    # shape, and its CPU backend then writes that broadcast out and reads it
    # in every reduction. The barrier makes the bounds this array's own.
    x, lo, hi = lax.optimization_barrier((x.astype(dtype), lo, hi))
    mag = jnp.abs(x)
    out = mag > hi if lo is None else (x < lo) | (x > hi)
    axes = tuple(range(x.ndim)) if axis is None else (axis,)
    return lax.reduce(
        (mag, out.astype(jnp.int32)), (zero, jnp.int32(0)), _max_add, axes
    )


def _each_statistics(leaves, lo, hi, dtype):
    """:func:`_statistics` of each leaf, small leaves of one size stacked.

    Returns the maxima and the int32 counts, vectors of one entry per
    reduction; stacking (:func:`batches`) lets a tree of many small leaves
    compile few kernels.
    """
    alone, stacks = batches(range(len(leaves)), leaves.__getitem__)
    parts = [_statistics(leaves[i], lo, hi, dtype) for i in alone]
    for size, chunks in stacks.items():
        for chunk in chunks:
            rows = jnp.concatenate([leaves[i].reshape(1, size) for i in chunk])
            parts.append(_statistics(rows, lo, hi, dtype, axis=1))
    tops = jnp.concatenate([jnp.ravel(top) for top, _ in parts])
    counts = jnp.concatenate([jnp.ravel(n) for _, n in parts])
    return tops, counts


def element_statistics(leaves, lo, hi, *, dtype):
    """:func:`jstab._numerics.element_statistics` by variadic reductions."""
    tops, counts = _each_statistics(leaves, lo, hi, dtype)
    return jnp.max(tops, initial=0), jnp.sum(counts.astype(jnp.float32))


def count_positive(leaves):
    """:func:`jstab._numerics.count_positive` by variadic reductions.

    A count alone is one reduction, which XLA's CPU backend splits in two,
    writing the comparison out first: a temporary the size of the leaves.
    Beside a maximum it stays one kernel with the comparison inside, and the
    maximum must then be used, or XLA drops it and splits the count again:
    the count is returned unless the maximum of ``|x|`` is -1, which it never
    is. ``scale_by_spam``'s step on the ResNet-50 tree, with its spike count
    alone: 2.46 times Adam's step and 24 959 page faults a step; this way
    1.30 to 1.37 and none (the count's own read of g and v is what remains).
    """
    if not leaves:
        return jnp.zeros((), jnp.int32)
    dtype = jnp.result_type(*leaves)
    tops, counts = _each_statistics(leaves, jnp.asarray(-jnp.inf, dtype), 0, dtype)
    n = jnp.sum(counts, dtype=jnp.int32)
    return jnp.where(jnp.max(tops) == -1, 0, n)


def _add_pairs(a, b):
    return a[0] + b[0], a[1] + b[1]


def sumsq_and_count(units: chex.Array, limit: chex.Array):
    """:func:`jstab._numerics.sumsq_and_count` in one variadic reduction.

    It compiles to one kernel with its comparison inside; two sums cost XLA's
    CPU backend about four more fusions per kernel (910 against 1134 fusions
    in a step with Adam on the ResNet-50 tree).
    """
    over = (units > limit).astype(jnp.int32)
    zero = jnp.zeros((), units.dtype)
    axes = tuple(range(units.ndim))
    return lax.reduce((jnp.square(units), over), (zero, jnp.int32(0)), _add_pairs, axes)


def watch(leaves: list[chex.Array]) -> list[chex.Array]:
    """``leaves`` behind an optimization barrier, for a pass-through monitor.

    Reading the gradient directly, XLA's CPU backend fused the monitor's
    reductions into the optimizer's elementwise pass over the same arrays: a
    step with Adam took 1.8 times as long as Adam alone instead of 1.1, and
    Adam's arithmetic could change in the last bit.
    """
    return lax.optimization_barrier(leaves)
