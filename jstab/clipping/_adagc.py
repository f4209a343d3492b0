"""AdaGC: clip each tensor relative to a moving average of its own clipped norms."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax import lax

from jstab import _checks, _numerics
from jstab._numerics import AxisName, ScalarOrSchedule


class AdaGCState(NamedTuple):
    """What :func:`adagc` did at its last step, and each tensor's reference norm.

    Attributes:
      norm: a tree shaped like the gradient of float32 scalars, each tensor's
        L2 norm before clipping.
      clipped: float32, the fraction of tensors clipped at the last step; a
        warm-up step whose global clip acted counts 1.
      clip_count: int32, the number of steps in which anything was clipped.
      count: int32, the number of steps seen; the warm-up is the steps with
        ``count < warmup_steps``, and schedules are evaluated at it.
      gamma: a tree shaped like the gradient of float32 scalars, each
        tensor's reference norm γ; +inf until it has one.
    """

    norm: chex.ArrayTree
    clipped: chex.Array
    clip_count: chex.Array
    count: chex.Array
    gamma: chex.ArrayTree


def _check(clipping, relative, beta, warmup_steps, eps) -> None:
    """Raises on a bad static argument (run-time values are made safe instead)."""
    _numerics.check_threshold("clipping", clipping)
    _numerics.check_threshold("relative", relative)
    if not _numerics.is_traced(beta):
        b = _checks.real_number("beta", beta)
        if not 0 <= b < 1:
            raise ValueError(f"`beta` must be in [0, 1), got {beta!r}.")
    if not _numerics.is_traced(eps):
        _checks.nonnegative("eps", eps)
    if not _numerics.is_traced(warmup_steps):
        # With no warm-up step no tensor would get a reference γ from it.
        _checks.integer_at_least("warmup_steps", warmup_steps, 1)


def adagc(
    clipping: ScalarOrSchedule = 1.0,
    *,
    relative: ScalarOrSchedule = 1.05,
    beta: float = 0.98,
    warmup_steps: int = 100,
    eps: float = 1e-12,
    axis_name: AxisName = None,
) -> optax.GradientTransformation:
    r"""Clips each tensor's gradient relative to an average of its past norms.

    A tensor is a leaf of the gradient tree. During the first
    ``warmup_steps`` steps the whole tree is clipped to the global norm
    λ_abs = ``clipping``, and each tensor's reference γ_i (+inf at first)
    keeps the smallest norm it had after that clip:

    .. math::
      \hat g = g \cdot \min\Big(1, \frac{\lambda_{\text{abs}}}{\lVert g
      \rVert}\Big), \qquad \gamma_i \leftarrow \min(\gamma_i, \lVert \hat g_i
      \rVert)

    Afterwards each tensor is clipped on its own, against the γ_i from
    before the step, and γ_i follows the clipped norms (λ_rel =
    ``relative``):

    .. math::
      \hat g_i = g_i \cdot \min\Big(1, \frac{\lambda_{\text{rel}}\,
      \gamma_i}{\lVert g_i \rVert}\Big), \qquad \gamma_i \leftarrow \beta
      \gamma_i + (1 - \beta) \lVert \hat g_i \rVert

    So a spike in one tensor is cut to λ_rel times its recent scale while
    the other tensors pass unchanged (bit for bit), where a global clip
    would shrink them all. This is the rule of the paper's Algorithm 1,
    with the paper's λ_rel = 1.05 and β = 0.98. Compared with the
    authors' released Megatron code (``megatron-gpt2.patch``, class
    ``AdaGC``), which does the same per parameter tensor, with its
    minimum taken over the norms after the global clip and its average
    over the clipped norms:

    - its defaults are λ_rel = 1.04 and β = 0.99 (pass ``relative=1.04,
      beta=0.99`` to reproduce them);
    - it divides by the norm plus 1e-6 when it clips (in the warm-up's
      global clip too), so a clipped tensor comes out with norm
      λ_rel·γ·‖g‖/(‖g‖ + 1e-6) while γ is updated with λ_rel·γ. Neither
      the paper's clip factor nor this one has an ε: the clipped norm is
      the threshold to within rounding and is what enters γ;
    - a clipped norm of exactly 0 in the warm-up (a tensor with no gradient
      at that step: an expert no token reached) makes its γ = 0 there and
      in the paper, and the tensor is then zeroed at every later step. Here
      a norm at or below ``eps`` is no measurement of a tensor's scale: it
      never enters the minimum nor becomes γ, and a γ at or below ``eps``
      (after a long run of zero gradients) counts as none. A tensor without
      a reference after the warm-up is not clipped, and its first norm
      above ``eps`` becomes its γ, as their code does for a parameter that
      had no gradient during the warm-up;
    - a NaN norm after the warm-up makes their γ NaN for good (that tensor
      is never clipped again). Here a
      tensor whose norm is not finite leaves its γ unchanged, and a warm-up
      step whose global norm is not finite leaves every γ unchanged; such a
      gradient still goes through the clip (chain ``optax.apply_if_finite``
      or :func:`skip_on_spike` to drop it).

    Inside ``shard_map``, ``axis_name`` makes each tensor's norm that of the
    whole tensor, as their ``AdaGC`` mode does across tensor-parallel
    shards; without it each device clips its own shard by its own norm, as
    their ``AdaGC-Shard`` mode does. A run-time ``clipping`` (in the
    warm-up) or ``relative`` (afterwards), from a schedule or
    ``optax.inject_hyperparams``, that is 0, negative or NaN zeroes the
    step; γ never turns NaN.

    Args:
      clipping: λ_abs, the global-norm threshold of the warm-up: a float
        > 0, a scalar array or a schedule of the step count.
      relative: λ_rel, how far above its γ a tensor's norm may go: a float
        > 0, a scalar array or a schedule.
      beta: the weight of the past in γ's moving average, in [0, 1).
      warmup_steps: the number of global-clip steps that set each γ, an int
        >= 1 (γ comes from the warm-up: without one, each tensor's first
        norm would pass unclipped and become its γ).
      eps: norms at or below it count as no gradient, for γ only; >= 0.
      axis_name: inside ``shard_map``, the mesh axis name (or names) every
        tensor is split over; norms are combined with ``lax.psum``. Not
        needed under ``jax.jit`` with sharded arrays.

    Returns:
      A :class:`optax.GradientTransformation` with an :class:`AdaGCState`.

    Example:
      >>> import jax.numpy as jnp, jstab
      >>> tx = jstab.adagc(clipping=10.0, warmup_steps=2)
      >>> state = tx.init({"a": jnp.zeros(2), "b": jnp.zeros(2)})
      >>> for a, b in [(1.0, 1.0), (1.0, 1.0), (1.0, 9.0)]:
      ...     g = {"a": jnp.full(2, a), "b": jnp.full(2, b)}
      ...     out, state = tx.update(g, state)
      >>> out["a"].tolist(), round(float(out["b"][0]), 4), float(state.clipped)
      ([1.0, 1.0], 1.05, 0.5)

    References:
      Wang et al., `AdaGC: Improving Training Stability for Large Language
      Model Pretraining <https://arxiv.org/abs/2502.11034>`_, 2025
    """
    _check(clipping, relative, beta, warmup_steps, eps)

    def init_fn(params: optax.Params) -> AdaGCState:
        zeros = jax.tree.map(lambda _: jnp.zeros((), jnp.float32), params)
        gamma = jax.tree.map(lambda _: jnp.full((), jnp.inf, jnp.float32), params)
        return AdaGCState(**_numerics.init_state(norm=zeros)._asdict(), gamma=gamma)

    def update_fn(updates, state, params=None):
        del params
        _checks.same_tree("adagc", state.gamma, updates)
        leaves, treedef = jax.tree.flatten(updates)
        if not leaves:
            return updates, _numerics.advance(state, state.norm, 0.0)
        f32 = jnp.float32
        groups = [[i] for i in range(len(leaves))]
        norms = _numerics.group_norms(leaves, groups, 2, axis_name)
        dtype = norms.dtype
        count = state.count
        warm = count < jnp.asarray(warmup_steps).astype(jnp.int32)
        gamma = jnp.stack(jax.tree.leaves(state.gamma)).astype(f32)
        b = jnp.asarray(beta).astype(f32)
        floor = jnp.asarray(eps).astype(f32)

        # Warm-up: one factor for the whole tree.
        total = _numerics.combine_norms(norms)
        lam = _numerics.threshold(clipping, count, dtype)
        warm_factor = _numerics.factor(total, lam)
        warm_clipped = (warm_factor * norms).astype(f32)
        take = jnp.isfinite(total) & (warm_clipped > floor)
        warm_gamma = jnp.where(take, jnp.minimum(gamma, warm_clipped), gamma)

        # Afterwards: each tensor against λ_rel·γ_i, or unclipped without a γ.
        rel = _numerics.threshold(relative, count, f32)
        known = jnp.isfinite(gamma) & (gamma > floor)
        limit = jnp.where(rel > 0, jnp.where(known, rel * gamma, jnp.inf), 0)
        limit = limit.astype(dtype)
        after_factor = _numerics.factor(norms, limit)
        over = norms > limit
        after_clipped = jnp.where(over, limit, norms).astype(f32)
        moved = jnp.where(known, b * gamma + (1 - b) * after_clipped, after_clipped)
        take = (
            jnp.isfinite(norms)
            & jnp.isfinite(moved)
            & (known | (after_clipped > floor))
        )
        after_gamma = jnp.where(take, moved, gamma)

        factors = jnp.where(warm, warm_factor, after_factor)
        new_gamma = lax.stop_gradient(jnp.where(warm, warm_gamma, after_gamma))
        fraction = jnp.sum(over, dtype=jnp.int32).astype(f32) / len(leaves)
        clipped = jnp.where(warm, (total > lam).astype(f32), fraction)
        each_norm, each_factor, each_gamma = _numerics.unstack(
            norms, factors, new_gamma
        )
        out = [_numerics.scale(x, f) for x, f in zip(leaves, each_factor, strict=True)]
        new_state = _numerics.advance(
            state, jax.tree.unflatten(treedef, each_norm), clipped
        )._replace(gamma=jax.tree.unflatten(treedef, each_gamma))
        return jax.tree.unflatten(treedef, out), new_state

    return optax.GradientTransformation(init_fn, update_fn)
