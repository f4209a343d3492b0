"""What every transform shares: dtypes, thresholds, norms and the clip state.

This is the plain path, the one every backend runs: a norm is a sum of
squares per leaf, accumulated in :func:`compute_dtype` (float32 for bfloat16
and float16 leaves: a sum of squares of float16 values overflows at 65504).
Only when a sum has overflowed to infinity, or is so small that squares may
have been lost to underflow, does one ``lax.cond`` take a second pass over
the gradients, multiplied first by 2**-64 or 2**64 (float32; exact powers of
two). So float32 gradients of 1e30 have a finite norm and gradients of 1e-30
an accurate one, at no cost to ordinary steps.

Six reductions go through :func:`_dispatch`, which on XLA's CPU backend
runs their counterparts in :mod:`jstab._xla_cpu` instead (the same results,
compiled faster or run with fewer passes there; ``lax.platform_dependent``
picks one when the program is lowered): :func:`group_reduce`,
:func:`unstack`, :func:`element_statistics`, :func:`count_positive`,
:func:`sumsq_and_count` and :func:`watch`.

One limit remains, for per-layer and per-unit norms: a layer whose every
square underflows (all magnitudes below about 1e-19 in float32) reports 0.
Checking exact zeros too would cost the second pass at every step in which
any layer's gradient is exactly zero (a frozen or unused parameter), so only
the global norm does it.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jstab import _checks, _xla_cpu

AxisName = str | tuple[str, ...] | None
ScalarOrSchedule = float | jax.Array | Callable[[chex.Numeric], chex.Numeric]

_INT32_MAX = np.iinfo(np.int32).max


# -------------------------------------------------------------------- dtypes


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


# ---------------------------------------------------------------- thresholds


def is_traced(value: object) -> bool:
    """Whether ``value`` is traced (``inject_hyperparams`` under jit)."""
    return isinstance(value, jax.core.Tracer)


def is_static(value: object) -> bool:
    """Whether ``value`` is known when a transform is built: a plain number.

    A JAX array is a run-time value, concrete or traced alike: what
    ``optax.inject_hyperparams`` passes, eagerly or under ``jax.jit``. Checking
    it when concrete only would make eager and jitted runs of the same code
    disagree, so it is never checked; :func:`threshold` makes it safe instead.
    """
    return not (callable(value) or isinstance(value, jax.Array))


def check_threshold(name: str, value: object, *, strict: bool = True) -> None:
    """Raises unless ``value`` is a run-time value or a static number > 0.

    Schedules and JAX arrays are run-time values (:func:`is_static`), made
    safe by :func:`threshold`. With ``strict=False`` a static number may be 0
    or negative: only finiteness counts.
    """
    if not is_static(value):
        return
    if strict:
        _checks.positive(name, value)
    else:
        _checks.real_number(name, value)


def resolve(value: ScalarOrSchedule, count: chex.Array, dtype: jnp.dtype):
    """A hyperparameter's value at step ``count``, as a scalar of ``dtype``."""
    if callable(value):
        value = value(count)
    return jnp.asarray(value).astype(dtype)


def effective(threshold: chex.Array) -> chex.Array:
    """``max(threshold, 0)``, with NaN as 0: a bound that never reverses.

    A run-time threshold (a schedule decaying through zero, an injected
    hyperparameter) that is 0, negative or NaN gives a zero update, never a
    reversed or NaN one.
    """
    return jnp.where(threshold > 0, threshold, jnp.zeros_like(threshold))


def threshold(value: ScalarOrSchedule, count: chex.Array, dtype: jnp.dtype):
    """A threshold's :func:`effective` value at step ``count``, of ``dtype``."""
    return effective(resolve(value, count, dtype))


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


# ------------------------------------------------------------------ clipping


def scale(x: chex.Array, factor: chex.Array) -> chex.Array:
    """``x * factor`` in ``x``'s compute dtype, returned in ``x``'s dtype.

    A factor of exactly 1 returns ``x`` bit for bit: the product is exact and
    so is the round trip through a wider dtype.
    """
    wide = compute_dtype(x.dtype)
    return (x.astype(wide) * factor.astype(wide)).astype(x.dtype)


def factor(norm: chex.Array, threshold: chex.Array) -> chex.Array:
    """``min(1, θ / norm)`` for θ ≥ 0 (:func:`effective`): 1 unless ``norm > θ``.

    Its gradient is finite everywhere: the unused division sees 1.
    """
    over = norm > threshold
    return jnp.where(over, threshold / jnp.where(over, norm, 1), 1)


def clip_to_norm(leaves, norm, threshold):
    """``leaves`` scaled by :func:`factor`, and whether they were clipped.

    The rule of every global-norm clip: one factor for the whole tree, each
    leaf kept in its dtype; ``threshold`` is cast to ``norm``'s dtype.
    """
    threshold = effective(threshold.astype(norm.dtype))
    f = factor(norm, threshold)
    return [scale(x, f) for x in leaves], norm > threshold


class ClipState(NamedTuple):
    """What a clipping transform did at its last step.

    Read any field with ``optax.tree.get(opt_state, "norm")`` (or
    ``"clipped"``, ``"clip_count"``) wherever the transform sits in a chain.

    Attributes:
      norm: float32, the norm measured before clipping: a scalar for global
        rules, a tree of per-layer scalars for per-layer rules, the largest
        ``|g|`` for value rules.
      clipped: float32 scalar in [0, 1], the fraction of what the transform
        governs (the step, the layers, the units or the elements) that it
        clipped at the last step. Something is clipped only when its norm
        strictly exceeds the threshold.
      clip_count: int32 scalar, the number of steps in which it clipped
        anything.
      count: int32 scalar, the number of steps seen; schedules of the
        threshold are evaluated at it.
    """

    norm: chex.ArrayTree
    clipped: chex.Array
    clip_count: chex.Array
    count: chex.Array


def init_state(kind: type[ClipState] = ClipState, norm: chex.ArrayTree = None):
    """A ``kind`` state before the first step: zeros, ``norm`` shaped like it.

    ``kind`` is :class:`ClipState` or the subclass a rule names its state
    with (``ClipByGlobalNormState``), so :func:`jstab.statistics` can tell
    the rules apart.
    """
    if norm is None:
        norm = jnp.zeros((), jnp.float32)
    return kind(
        norm=norm,
        clipped=jnp.zeros((), jnp.float32),
        clip_count=jnp.zeros((), jnp.int32),
        count=jnp.zeros((), jnp.int32),
    )


def scalar_init(kind: type[ClipState]):
    """The ``init`` of a rule whose ``norm`` is a scalar: params do not matter."""

    def init_fn(params: optax.Params) -> ClipState:
        del params
        return init_state(kind)

    return init_fn


def advance(state, norm: chex.ArrayTree, clipped: chex.Array):
    """``state`` after a step that measured ``norm`` and clipped ``clipped``.

    ``state`` is a :class:`ClipState` or any state with its four fields (the
    adaptive rules' states extend it): those are replaced by name, the others
    kept. What is recorded is a statistic: it carries no gradient.
    """
    clipped = lax.stop_gradient(jnp.asarray(clipped).astype(jnp.float32))
    return state._replace(
        norm=jax.tree.map(lambda n: lax.stop_gradient(n.astype(jnp.float32)), norm),
        clipped=clipped,
        clip_count=jnp.where(
            clipped > 0, safe_increment(state.clip_count), state.clip_count
        ),
        count=safe_increment(state.count),
    )


# ---------------------------------------------------------------- reductions


def _dispatch(name: str, plain: Callable, *operands, **static):
    """``plain(*operands, **static)``, or on XLA's CPU ``_xla_cpu.<name>``.

    ``lax.platform_dependent`` traces both and keeps the one for the platform
    the program is lowered for. ``JSTAB_XLA_CPU`` turns the CPU forms off
    (:func:`jstab._xla_cpu.enabled`): then only the plain one is traced.
    """
    plain = functools.partial(plain, **static)
    if not _xla_cpu.enabled(name):
        return plain(*operands)
    fast = functools.partial(getattr(_xla_cpu, name), **static)
    return lax.platform_dependent(*operands, cpu=fast, default=plain)


def elements(x: chex.Array, dtype: jnp.dtype, kind: str, r=None) -> chex.Array:
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


def reduce(x: chex.Array, kind: str, axis=None) -> chex.Array:
    """The maximum (``"maxabs"``) or the sum of ``x``, in ``x``'s dtype."""
    if kind == "maxabs":
        return jnp.max(x, axis=axis, initial=0)
    return jnp.sum(x, axis=axis, dtype=x.dtype)


def group_reduce(
    leaves: Sequence[chex.Array],
    groups: Sequence[Sequence[int]],
    dtype: jnp.dtype,
    kind: str = "sumsq",
    r: chex.Array | None = None,
) -> chex.Array:
    """Per group of leaves, a sum of squares, a max ``|x|`` or a count.

    ``groups[k]`` lists the indices of the leaves of group ``k``; ``kind`` is
    one of :func:`elements`' kinds, and ``r[k]``, if given, multiplies group
    ``k``'s elements before squaring. The result is a vector of ``dtype``, one
    entry per group (0 for a group without elements). A count of non-finite
    elements is exact in an integer ``dtype``, and in float32 for groups of
    at most 2**24 elements.
    """
    if not groups:
        return jnp.zeros((0,), dtype)
    groups = tuple(tuple(g) for g in groups)
    return _dispatch(
        "group_reduce", _group_reduce, list(leaves), r,
        groups=groups, dtype=dtype, kind=kind,
    )  # fmt: skip


def _group_reduce(leaves, r, *, groups, dtype, kind):
    """:func:`group_reduce`: a reduction per leaf, combined per group."""
    out = []
    for k, group in enumerate(groups):
        rk = None if r is None else r[k]
        parts = [reduce(elements(leaves[i], dtype, kind, rk), kind) for i in group]
        out.append(reduce(jnp.stack(parts), kind) if parts else jnp.zeros((), dtype))
    return jnp.stack(out)


def unstack(*vectors: chex.Array) -> list[list[chex.Array]]:
    """Each of ``vectors`` as the list of its entries, scalars."""
    return _dispatch("unstack", _unstack, vectors)


def _unstack(vectors):
    return [[v[k] for k in range(v.shape[0])] for v in vectors]


def element_statistics(leaves, lo, hi, dtype: jnp.dtype):
    """The largest ``|x|`` over ``leaves``, and how many ``x`` are outside.

    Outside means ``x < lo`` or ``x > hi``, or ``|x| > hi`` when ``lo`` is
    ``None``. The count is a float32 (it feeds a fraction); each leaf's count
    is an exact int32. Both carry no gradient.
    """
    leaves = [lax.stop_gradient(x) for x in leaves]
    return _dispatch(
        "element_statistics", _element_statistics, leaves, lo, hi, dtype=dtype
    )


def _element_statistics(leaves, lo, hi, *, dtype):
    top, count = jnp.zeros((), dtype), jnp.zeros((), jnp.float32)
    for x in leaves:
        x = x.astype(dtype)
        mag = jnp.abs(x)
        out = mag > hi if lo is None else (x < lo) | (x > hi)
        top = jnp.maximum(top, jnp.max(mag, initial=0))
        count = count + jnp.sum(out, dtype=jnp.int32).astype(jnp.float32)
    return top, count


def count_positive(leaves: Sequence[chex.Array]) -> chex.Array:
    """The int32 number of elements ``> 0`` (NaN is not) over ``leaves``.

    It carries no gradient; each leaf's count is exact.
    """
    leaves = [lax.stop_gradient(x) for x in leaves]
    return _dispatch("count_positive", _count_positive, leaves)


def _count_positive(leaves):
    counts = [jnp.sum(x > 0, dtype=jnp.int32) for x in leaves]
    return sum(counts, jnp.zeros((), jnp.int32))


def sumsq_and_count(units: chex.Array, limit: chex.Array):
    """``sum(units**2)`` and the int32 number of ``units > limit``, no gradient."""
    units, limit = lax.stop_gradient((units, limit))
    return _dispatch("sumsq_and_count", _sumsq_and_count, units, limit)


def _sumsq_and_count(units, limit):
    return jnp.sum(jnp.square(units)), jnp.sum(units > limit, dtype=jnp.int32)


def watch(leaves: list[chex.Array]) -> list[chex.Array]:
    """``leaves``, as a pass-through monitor reads them (on CPU, apart)."""
    return _dispatch("watch", lambda leaves: leaves, leaves)


# --------------------------------------------------------------------- norms


def safe_sqrt(s: chex.Array) -> chex.Array:
    """``sqrt(s)`` for ``s >= 0``, with a gradient of 0 rather than NaN at 0."""
    zero = s == 0
    return jnp.where(zero, 0, jnp.sqrt(jnp.where(zero, 1, s)))


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
    The second, rescaled pass runs under one ``lax.cond``, only when some
    group's sum needs it; with ``zero``, a sum of exactly 0 needs it too.
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

    def rescue(s):
        r = _rescale(s, dtype, zero)
        return safe_sqrt(sums(r)) / r

    which = static_ord(ord)
    if which == np.inf:
        return linf()
    s = sums(None)
    l2 = lax.cond(jnp.any(_rescale(s, dtype, zero) != 1), rescue, safe_sqrt, s)
    if which == 2.0:
        return l2
    return jnp.where(jnp.isposinf(jnp.asarray(ord).astype(dtype)), linf(), l2)


def combine_norms(norms: chex.Array) -> chex.Array:
    """``sqrt(sum(n**2))`` of a vector of nonnegative ``norms``, scaled by their max.

    Squaring norms above ~1e19 would overflow float32; dividing by the
    largest first cannot. A non-finite largest norm is the result itself.
    """
    if not norms.size:
        return jnp.zeros((), jnp.float32)
    top = jnp.max(norms)
    ok = jnp.isfinite(top) & (top > 0)
    unit = norms / jnp.where(ok, top, jnp.ones_like(top))
    return jnp.where(ok, top * jnp.sqrt(jnp.sum(unit * unit)), top)


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
        safe_sqrt(jnp.sum(elements(x, dtype, "sumsq"), axis=a, keepdims=True))
        for x, a in zip(leaves, axes, strict=True)
    ]
