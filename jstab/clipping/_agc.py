"""Adaptive gradient clipping (AGC): unit-wise, relative to the weights."""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import optax

from jstab import _checks, _numerics
from jstab._numerics import ClipState, ScalarOrSchedule


class AdaptiveGradClipState(ClipState):
    """The state of :func:`adaptive_grad_clip`: the fields of :class:`ClipState`."""

    __slots__ = ()


Axis = int | tuple[int, ...] | None


def _static_axis(axis: object) -> Axis:
    """``axis`` as None, an int or a tuple of ints, checked when built."""
    if axis is None:
        return None
    if isinstance(axis, jax.core.Tracer):
        raise TypeError(
            "`axis` must be static, got a traced value; with "
            "optax.inject_hyperparams pass static_args=('axis',)."
        )
    items = axis if isinstance(axis, tuple | list) else (axis,)
    try:
        out = tuple(operator.index(a) for a in items)
    except TypeError as error:
        raise TypeError(
            f"`axis` must be None, an int or a tuple of ints, got {axis!r}."
        ) from error
    return out[0] if not isinstance(axis, tuple | list) else out


def _unit_axes(x: jax.Array, axis: Axis) -> tuple[int, ...]:
    """The axes reduced to get the norm of each of ``x``'s units."""
    if axis is None:  # one unit per output channel: Flax's last axis
        return tuple(range(x.ndim - 1)) if x.ndim >= 2 else tuple(range(x.ndim))
    axes = (axis,) if isinstance(axis, int) else axis
    if any(not -x.ndim <= a < x.ndim for a in axes):
        raise ValueError(
            f"`axis` {axis!r} is out of range for a leaf of shape {x.shape}."
        )
    return tuple(sorted({a % x.ndim for a in axes}))


def adaptive_grad_clip(
    clipping: ScalarOrSchedule = 0.01, eps: float = 1e-3, axis: Axis = None
) -> optax.GradientTransformation:
    r"""Clips each unit's gradient relative to the norm of its weights.

    .. math::
      G_i \leftarrow G_i \cdot \frac{\lambda \max(\lVert W_i \rVert,
      \epsilon)}{\lVert G_i \rVert} \quad \text{if} \quad
      \frac{\lVert G_i \rVert}{\max(\lVert W_i \rVert, \epsilon)} > \lambda

    for each unit ``i``, a unit being one output channel: the last axis of a
    Flax kernel, whatever its rank (Dense ``(in, out)``, Conv1D
    ``(w, in, out)``, Conv2D ``(h, w, in, out)``, Conv3D), the norm taken over
    all other axes. A leaf of rank ≤ 1 (a bias, a scale) is a single unit.
    ``optax.adaptive_grad_clip`` reduces only axis 0 of a rank-3 kernel,
    which is right for multi-head attention but not for Conv1D; pass ``axis``
    to reproduce it.

    State: ``norm`` is a tree of float32 scalars, the gradient L2 norm of
    each leaf; ``clipped`` the fraction of all units clipped. Norms are
    accumulated in float32 (or wider), as plain sums of squares: a unit whose
    gradient has elements above ~1e19 has an infinite norm and is zeroed,
    and a leaf whose every element is below ~1e-19 reports a norm of 0.

    Args:
      clipping: λ, the largest allowed ratio of a unit's gradient norm to
        its weight norm: a float > 0, a scalar array or a schedule. A
        run-time value that is 0, negative or NaN counts as 0 (every unit is
        zeroed and counted as clipped).
      eps: ε ≥ 0, the weight norm below which a unit counts as having norm
        ε, so that zero-initialised units can still move. A run-time value
        below 0 or NaN counts as 0.
      axis: ``None`` for output channels, or the axis (an int or a tuple) to
        reduce for every leaf, with the meaning it has in
        ``optax.adaptive_grad_clip``.

    Returns:
      A :class:`optax.GradientTransformation` with an
      :class:`AdaptiveGradClipState`. Its ``update`` needs ``params``.

    References:
      Brock et al., `High-Performance Large-Scale Image Recognition Without
      Normalization <https://arxiv.org/abs/2102.06171>`_, 2021
    """
    _numerics.check_threshold("clipping", clipping)
    if _numerics.is_static(eps):
        _checks.nonnegative("eps", eps)
    axis = _static_axis(axis)

    def init_fn(params: optax.Params) -> AdaptiveGradClipState:
        return _numerics.init_state(
            AdaptiveGradClipState,
            jax.tree.map(lambda _: jnp.zeros((), jnp.float32), params),
        )

    def update_fn(updates, state, params=None):
        _checks.params_like("adaptive_grad_clip", updates, params)
        _checks.same_tree("adaptive_grad_clip", state.norm, updates)
        leaves, treedef = jax.tree.flatten(updates)
        weights = treedef.flatten_up_to(params)
        axes = [_unit_axes(g, axis) for g in leaves]
        dtype = _numerics.accumulation_dtype(leaves)
        lam = _numerics.threshold(clipping, state.count, dtype)
        floor = _numerics.threshold(eps, state.count, dtype)
        out, norms = list(leaves), [None] * len(leaves)
        # Leaves of one unit (biases, scales): their norms as one vector.
        single = [i for i, g in enumerate(leaves) if len(axes[i]) == g.ndim]
        groups = [[i] for i in single]
        w_dtype = _numerics.accumulation_dtype(weights)
        gn = _numerics.safe_sqrt(_numerics.group_reduce(leaves, groups, dtype))
        wn = _numerics.safe_sqrt(_numerics.group_reduce(weights, groups, w_dtype))
        limit = lam * jnp.maximum(wn.astype(dtype), floor)
        factors = _numerics.factor(gn, limit)  # an inf norm zeroes its unit
        n_clipped = [jnp.sum(gn > limit, dtype=jnp.int32)]
        for i, n, f in zip(single, *_numerics.unstack(gn, factors), strict=True):
            out[i], norms[i] = _numerics.scale(leaves[i], f), n
        # Kernels: a norm per output channel, reduced where the leaf is.
        multi = sorted(set(range(len(leaves))) - set(single))
        m_axes = [axes[i] for i in multi]
        g_units = _numerics.unit_norms([leaves[i] for i in multi], m_axes, dtype)
        w_units = _numerics.unit_norms([weights[i] for i in multi], m_axes, w_dtype)
        for i, gu, wu in zip(multi, g_units, w_units, strict=True):
            limit = lam * jnp.maximum(wu.astype(dtype), floor)
            out[i] = _numerics.scale(leaves[i], _numerics.factor(gu, limit))
            sumsq, over = _numerics.sumsq_and_count(gu, limit)
            n_clipped.append(over)
            # A leaf of one unit (a (k, 1) kernel) has its unit's norm.
            norms[i] = gu.reshape(()) if gu.size == 1 else jnp.sqrt(sumsq)
        units = len(single) + sum(g.size for g in g_units)
        total = jnp.sum(jnp.stack(n_clipped))
        clipped = total.astype(jnp.float32) / units if units else 0.0
        norm = jax.tree.unflatten(treedef, norms)
        new_state = _numerics.advance(state, norm, clipped)
        return jax.tree.unflatten(treedef, out), new_state

    return optax.GradientTransformation(init_fn, update_fn)
