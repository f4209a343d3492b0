"""Numerics shared by the transforms: wide norms, thresholds, counters.

Norms are accumulated in :func:`compute_dtype` (float32 for bfloat16 and
float16 leaves: a sum of squares of float16 values overflows at 65504) and
are robust at both ends of the range. The fast path is one read of the
gradients, a plain sum of squares. Only when some sum has overflowed to
infinity, or is so small that squares may have been lost to underflow, does
one ``lax.cond`` take a second pass over the gradients, multiplied first by
2**-64 or 2**64 (float32; exact powers of two). So float32 gradients of 1e30
have a finite norm and gradients of 1e-30 an accurate one, at no cost to
ordinary steps, and compiling costs one more reduction per leaf, not two.

One limit remains, for per-layer and per-unit norms: a layer whose every
square underflows (all magnitudes below about 1e-19 in float32) reports 0.
Checking exact zeros too would cost the second pass at every step in which
any layer's gradient is exactly zero (a frozen or unused parameter), so only
the global norm does it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jstab import _checks

AxisName = str | tuple[str, ...] | None
ScalarOrSchedule = float | jax.Array | Callable[[chex.Numeric], chex.Numeric]

_INT32_MAX = np.iinfo(np.int32).max


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype arithmetic on a leaf of ``dtype`` is done in: at least float32.

    Initializers draw in it (a normal sampled directly in bfloat16 takes 128
    distinct values and its standard deviation is 0.3 % low; QR has no
    half-precision kernel on CPU) and round once at the end; norms are
    accumulated in it.
    """
    # Not jnp.promote_types: it fails under jax_numpy_dtype_promotion="strict".
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def accumulation_dtype(leaves: Sequence[chex.Array]) -> jnp.dtype:
    """The widest :func:`compute_dtype` over ``leaves`` (float32 if none)."""
    sizes = [compute_dtype(x.dtype) for x in leaves]
    return max(sizes, key=lambda d: d.itemsize, default=jnp.dtype(jnp.float32))


def safe_increment(count: chex.Array) -> chex.Array:
    """``count + 1`` for an int32 counter, saturating instead of wrapping."""
    return jnp.where(count < _INT32_MAX, count + 1, count)


def scale(x: chex.Array, factor: chex.Array) -> chex.Array:
    """``x * factor`` in ``x``'s compute dtype, returned in ``x``'s dtype.

    A factor of exactly 1 returns ``x`` bit for bit: the product is exact and
    so is the round trip through a wider dtype.
    """
    wide = compute_dtype(x.dtype)
    return (x.astype(wide) * factor.astype(wide)).astype(x.dtype)


def factor(norm: chex.Array, threshold: chex.Array) -> chex.Array:
    """``min(1, threshold / norm)``: exactly 1 unless ``norm > threshold``."""
    over = norm > threshold
    return jnp.where(over, threshold / jnp.where(over, norm, 1), 1)


def clip_to_norm(leaves, norm, threshold):
    """``leaves`` scaled by :func:`factor`, and whether ``norm > threshold``.

    The rule of every global-norm clip: one factor for the whole tree, each
    leaf kept in its dtype; ``threshold`` is cast to ``norm``'s dtype.
    """
    threshold = threshold.astype(norm.dtype)
    f = factor(norm, threshold)
    return [scale(x, f) for x in leaves], norm > threshold


# ---------------------------------------------------------------- thresholds


def is_traced(value: object) -> bool:
    """Whether ``value`` is traced (``inject_hyperparams`` under jit)."""
    return isinstance(value, jax.core.Tracer)


def check_threshold(name: str, value: object, *, strict: bool = True) -> None:
    """Raises unless ``value`` is a schedule, a traced value or a number > 0.

    Schedules and traced values (``optax.inject_hyperparams`` passes arrays,
    traced under jit) cannot be checked when the transform is built. With
    ``strict=False`` the number may be 0 or negative: only finiteness counts.
    """
    if callable(value) or is_traced(value):
        return
    if strict:
        _checks.positive(name, value)
    else:
        _checks.real_number(name, value)


def resolve(value: ScalarOrSchedule, count: chex.Array, dtype: jnp.dtype):
    """A threshold's value at step ``count``, as a scalar of ``dtype``."""
    if callable(value):
        value = value(count)
    return jnp.asarray(value).astype(dtype)


def static_ord(ord: object) -> float | None:
    """``ord`` as 2.0 or inf, or ``None`` when it is traced (decided at run time).

    ``optax.inject_hyperparams`` turns ``ord`` into an array, traced under jit;
    then both norms are computed and one is selected.
    """
    if isinstance(ord, jax.core.Tracer):
        return None
    value = None
    if getattr(ord, "shape", None) == () or isinstance(ord, numbers.Real):
        value = float(ord)  # type: ignore[arg-type]
    if isinstance(ord, bool) or value not in (2.0, float("inf")):
        raise ValueError(f"`ord` must be 2 or jnp.inf, got {ord!r}.")
    return value


def select_ord(ord: object, l2: chex.Array, linf: chex.Array) -> chex.Array:
    """The norm ``ord`` names; a traced ``ord`` other than inf means 2."""
    return jnp.where(jnp.isposinf(jnp.asarray(ord).astype(linf.dtype)), linf, l2)


# --------------------------------------------------------------------- norms


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


def _elements(x: chex.Array, dtype: jnp.dtype, kind: str, r=None) -> chex.Array:
    """What ``kind`` reduces, in ``dtype``.

    ``"maxabs"``: ``|x|``; ``"sumsq"``: ``(x * r)**2``; ``"nonfinite"``: 1
    where ``x`` is NaN or infinite, else 0 (``dtype`` may be an integer type).
    """
    if kind == "nonfinite":
        return (~jnp.isfinite(x)).astype(dtype)
    x = x.astype(dtype)
    if kind == "maxabs":
        return jnp.abs(x)
    return jnp.square(x if r is None else x * r)


def _reduce(x: chex.Array, kind: str, axis=None) -> chex.Array:
    if kind == "maxabs":
        return jnp.max(x, axis=axis, initial=0)
    return jnp.sum(x, axis=axis)


def _rows(leaves, index, size, dtype, kind, r=None) -> chex.Array:
    """The reductions of ``leaves[i]``, ``i`` in ``index``, as one vector.

    The leaves, at most :data:`STACK`, all of ``size`` elements, are stacked
    into one ``(k, size)`` array reduced along its rows. ``r`` is a scalar or
    a ``(k, 1)`` column: one multiplier per row.
    """
    wide = dtype
    if kind == "nonfinite":  # a lossless common dtype, not the count's
        wide = accumulation_dtype([leaves[i] for i in index])
    rows = lax.concatenate([leaves[i].reshape(1, size).astype(wide) for i in index], 0)
    return _reduce(_elements(rows, dtype, kind, r), kind, axis=1)


def _batchable(x: chex.Array) -> bool:
    """Whether ``x`` is small and not split by an explicit sharding.

    Under ``jax.sharding.AxisType.Explicit`` a split leaf cannot be reshaped
    without naming the result's sharding: it is reduced where it is.
    """
    if x.size > SMALL_LEAF:
        return False
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", ())
    return all(axis is None for axis in spec)


def _same_size(items, size_of) -> dict[int, list]:
    """``items`` by ``size_of(item)``, keeping the sizes that several share."""
    sizes: dict[int, list] = {}
    for item in items:
        sizes.setdefault(size_of(item), []).append(item)
    return {size: same for size, same in sizes.items() if len(same) > 1}


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
    small = [i for i in index if _batchable(leaf(i))]
    sizes = _same_size(small, lambda i: leaf(i).size)
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
    parts = [_reduce(_elements(leaves[i], dtype, kind, r), kind) for i in alone]
    for size, chunks in stacks.items():
        rows = [_rows(leaves, chunk, size, dtype, kind, r) for chunk in chunks]
        parts.append(_reduce(jnp.concatenate(rows), kind))
    if not parts:
        return jnp.zeros((), dtype)
    return parts[0] if len(parts) == 1 else _reduce(stack(parts), kind)


def _take(vector: chex.Array, index: Sequence[int]) -> chex.Array:
    """``vector[index]``: a slice where ``index`` is contiguous, else a gather."""
    if list(index) == list(range(index[0], index[0] + len(index))):
        return lax.slice_in_dim(vector, index[0], index[0] + len(index))
    return vector[np.asarray(index)]


def group_reduce(
    leaves: Sequence[chex.Array],
    groups: Sequence[Sequence[int]],
    dtype: jnp.dtype,
    kind: str = "sumsq",
    r: chex.Array | None = None,
) -> chex.Array:
    """Per group of leaves, a sum of squares, a max ``|x|`` or a count.

    ``groups[k]`` lists the indices of the leaves of group ``k``. ``kind`` is
    one of :func:`_elements`' kinds: ``"sumsq"`` (``r[k]``, if given,
    multiplies group ``k``'s elements before squaring), ``"maxabs"`` or
    ``"nonfinite"`` (the number of NaN and infinite elements, exact with
    an integer ``dtype``, or with float32 for groups of at most 2**24
    elements, as ``monitor_gradients`` counts). The result
    is a vector of ``dtype``, one entry per group (0 for a group without
    elements).

    Compile time, not run time, decides how leaves are reduced. XLA's CPU
    backend compiles each distinct kernel (~8 ms), and its passes take time
    growing with the number of instructions. So the reductions are stacked:
    the small leaves of a group, by size (:func:`_group`), and the groups of
    one small leaf (a per-layer rule), by size across groups: 64 layers cost
    one reduction and give 64 entries of the result (see :data:`SMALL_LEAF`).
    """
    if not groups:
        return jnp.zeros((0,), dtype)
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
        rs = [None] * len(rest) if r is None else unstack(_take(r, rest))[0]
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


def stack(scalars: Sequence[chex.Array]) -> chex.Array:
    """``jnp.stack(scalars)``, built :data:`STACK` at a time.

    XLA would fuse the stacking of 2000 scalars, and what computes them, into
    one kernel of 2000 operands, which its CPU backend compiles in seconds.
    Behind an optimization barrier, pieces of 64 are kernels alike, compiled
    once.
    """
    parts = [jnp.stack(scalars[j : j + STACK]) for j in range(0, len(scalars), STACK)]
    if not parts:
        return jnp.zeros((0,), jnp.float32)
    if len(parts) == 1:
        return parts[0]
    return jnp.concatenate(lax.optimization_barrier(parts))


def unstack(*vectors: chex.Array) -> list[list[chex.Array]]:
    """Each of ``vectors`` as a list of scalars, its entries.

    ``v[k]`` for each ``k`` would be a slice kernel per entry, each one
    distinct (its offset differs) and compiled alone: XLA took 20 s instead
    of 4.5 s to compile a per-layer clip on 500 layers. Here the entries come
    out of variadic reductions, whose kernels XLA compiles once each: ``v``,
    padded, is laid out as a ``(c, w)`` grid about ``sqrt(n)`` square (``w``
    at most :data:`STACK`), one reduction gives its ``w`` columns, and ``w``
    alike give each column's ``c`` entries. Each reduces
    ``select(iota == k, v, fill)`` by keeping what is not ``fill``, the
    lowest value of the dtype: a select copies bits, so the entries are
    exact (arithmetic on CPU would flush denormals to 0).
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


def _rescale(sumsq: chex.Array, dtype: jnp.dtype, zero: bool) -> chex.Array:
    """The power of two to multiply by before squaring again: 1 if none.

    2**-64 (float32) where the sum overflowed; 2**64 where it is positive but
    below sqrt(tiny), where squares lost to underflow could matter (above it,
    they change the sum by a relative n * sqrt(tiny), 1e-10 for 1e9 float32
    elements), and where it is 0 if ``zero``. Powers of two scale exactly.
    """
    info = np.finfo(dtype)
    big = np.asarray(2.0 ** (info.maxexp // 2), dtype)
    small = np.sqrt(info.tiny).astype(dtype)
    tiny = ((sumsq >= 0) if zero else (sumsq > 0)) & (sumsq < small)
    return jnp.where(jnp.isinf(sumsq), 1 / big, jnp.where(tiny, big, 1))


def _rescued(sums, dtype, zero=False):
    """Norms from the fast sums ``sums(None)``, redone rescaled where needed.

    ``sums(r)`` returns the vector of each group's sum of squares, its
    elements multiplied by ``r[k]`` first (``r=None``: as they are). The
    second pass runs, under one ``lax.cond``, only when some group needs it.
    """

    def rescue(s):
        r = _rescale(s, dtype, zero)
        return jnp.sqrt(sums(r)) / r

    s = sums(None)
    need = jnp.any(_rescale(s, dtype, zero) != 1)
    return lax.cond(need, rescue, jnp.sqrt, s)


def group_norms(
    leaves: Sequence[chex.Array],
    groups: Sequence[Sequence[int]],
    ord: object = 2,
    axis_name: AxisName = None,
    zero: bool = False,
) -> chex.Array:
    """The ``ord``-norm of each group of whole leaves: a vector, one per group.

    ``groups[k]`` lists the indices of the leaves forming group ``k``. The
    norms have the accumulation dtype of the leaves. With ``axis_name``, sums
    are combined with ``lax.psum`` and maxima with ``lax.pmax`` over it.
    With ``zero``, a group whose fast sum is exactly 0 is rescaled too.
    :func:`unstack` turns the vector into scalars.
    """
    dtype = accumulation_dtype(leaves)
    if not groups:
        return jnp.zeros((0,), dtype)

    def linf():
        m = group_reduce(leaves, groups, dtype, "maxabs")
        return m if axis_name is None else lax.pmax(m, axis_name)

    def sums(r):
        out = group_reduce(leaves, groups, dtype, "sumsq", r)
        return out if axis_name is None else lax.psum(out, axis_name)

    which = static_ord(ord)
    if which == np.inf:
        return linf()
    l2 = _rescued(sums, dtype, zero)
    return l2 if which == 2.0 else select_ord(ord, l2, linf())


def global_norm(
    leaves: Sequence[chex.Array], ord: object = 2, axis_name: AxisName = None
) -> chex.Array:
    """The ``ord``-norm of all ``leaves`` together, a scalar (0 if none).

    A sum of squares of exactly 0 is checked by the rescaled pass too: a whole
    gradient that is zero is rare, and one whose squares all underflow is
    what a vanishing-gradient problem looks like.
    """
    if not leaves:
        return jnp.zeros((), jnp.float32)
    norms = group_norms(leaves, [range(len(leaves))], ord, axis_name, zero=True)
    return norms.reshape(())


def unit_norms(
    leaves: Sequence[chex.Array],
    axes: Sequence[tuple[int, ...]],
    dtype: jnp.dtype | None = None,
) -> list[chex.Array]:
    """L2 norms of ``leaves[i]`` over ``axes[i]``, keeping dimensions.

    Each result has the rank of its leaf and ``dtype`` (by default the
    accumulation dtype of all ``leaves``). Plain sums of squares, without
    :func:`group_norms`' rescue: checking every unit of every leaf costs a
    quarter of an optimizer step on CPU, so callers accept that a unit with
    elements above ~1e19 (float32) has an infinite norm and one with all
    elements below ~1e-19 a norm of 0.
    """
    dtype = accumulation_dtype(leaves) if dtype is None else dtype
    return [
        jnp.sqrt(jnp.sum(_elements(x, dtype, "sumsq"), axis=a, keepdims=True))
        for x, a in zip(leaves, axes, strict=True)
    ]
