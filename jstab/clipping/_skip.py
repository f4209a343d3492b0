"""A wrapper that drops a step whose gradient is non-finite or spikes."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from jstab import _numerics, _wrappers
from jstab._numerics import AxisName, ScalarOrSchedule
from jstab.clipping import _running

_Z_EPS = 1e-6


class SkipState(NamedTuple):
    """The state of :func:`skip_on_spike`: the inner state and what was skipped.

    Attributes:
      inner_state: the wrapped transformation's state, untouched by skipped
        steps.
      skipped: bool, whether this step was skipped.
      skip_count: int32, the number of steps skipped.
      count: int32, the number of steps seen, skipped ones included; a
        ``max_norm`` schedule is evaluated at it.
      norm: float32, this step's global L2 norm of the incoming gradient.
      mean: float32, the running mean μ of accepted steps' norms.
      var: float32, their running (population) variance σ².
      samples: int32, how many accepted norms entered μ and σ²; the z-test
        starts once it reaches ``warmup_steps``.
    """

    inner_state: optax.OptState
    skipped: chex.Array
    skip_count: chex.Array
    count: chex.Array
    norm: chex.Array
    mean: chex.Array
    var: chex.Array
    samples: chex.Array


def skip_on_spike(
    inner: optax.GradientTransformation | optax.MultiSteps,
    *,
    max_norm: ScalarOrSchedule | None = None,
    z_thresh: float | None = None,
    alpha: float = 0.97,
    warmup_steps: int = 25,
    axis_name: AxisName = None,
) -> optax.GradientTransformation:
    r"""Skips a step whose gradient is non-finite or whose norm spikes.

    A step is skipped when the global L2 norm of the incoming gradient is
    not finite (a NaN or an infinity anywhere), exceeds ``max_norm``, or,
    after the warm-up, has a one-sided z-score

    .. math::
      z = \frac{\lVert g \rVert - \mu}{\sigma + 10^{-6}} > z_{\text{thresh}}

    against the running mean μ and variance σ² of accepted steps' norms. A
    skipped step returns zero updates (so ``optax.apply_updates`` leaves the
    parameters as they are) and leaves ``inner``'s state exactly as it was,
    so a spike never reaches Adam's moments; ``skipped`` and ``skip_count``
    record it. Only accepted steps enter μ and σ²: the first
    ``warmup_steps`` give their exact mean and population variance, later
    ones update them by an exponential moving average with weight ``alpha``,
    as in :func:`zclip`.

    Like ``optax.apply_if_finite``, with thresholds on the norm, and with
    updates of zero rather than of the inner transformation on a bad step.
    ``inner`` runs under ``jax.lax.cond``, on accepted steps only (no host
    synchronisation, no recompilation, no copy of the moments). Put the
    wrapper around the whole optimizer so that nothing inside sees a
    skipped gradient.

    With gradient accumulation, put it outside ``optax.MultiSteps``:
    ``skip_on_spike(optax.MultiSteps(opt, k))`` tests each micro-batch's
    gradient, and a bad one is dropped while accumulation goes on (the
    update is applied after ``k`` accepted micro-batches). The other order,
    ``optax.MultiSteps(skip_on_spike(opt), k)``, adds a NaN micro-batch
    into Optax's accumulator, which it resets by multiplying by 0, and
    NaN · 0 is NaN: every later step is skipped for good.

    Args:
      inner: the transformation to protect, e.g. ``optax.adam(1e-3)``: a
        ``GradientTransformation``, a ``GradientTransformationExtraArgs``,
        or an object with a ``gradient_transformation()`` method, such as
        ``optax.MultiSteps``.
      max_norm: skip a step whose norm exceeds it: a float > 0, a scalar
        array or an ``optax.Schedule`` of the wrapper's step count.
        ``None``: no fixed bound. A run-time value that is 0, negative or
        NaN counts as 0: every step with a nonzero gradient is skipped.
      z_thresh: skip a step whose z-score exceeds it (> 0). ``None``: no
        z-test. A run-time value below 0 or NaN counts as 0.
      alpha: EMA weight of the past, in (0, 1).
      warmup_steps: the number of accepted steps that only collect norms
        before the z-test starts, an int >= 1.
      axis_name: inside ``shard_map``, the mesh axis name (or names) the
        gradient is split over; the norm is combined with ``lax.psum``.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with a
      :class:`SkipState`; extra keyword arguments of ``update`` (e.g.
      ``value`` for a line search) are passed on to ``inner``.

    Example:
      >>> import jax.numpy as jnp, optax, jstab
      >>> tx = jstab.skip_on_spike(optax.adam(0.1), max_norm=10.0)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> out, state = tx.update({"w": jnp.array([30.0, 40.0])}, state)
      >>> out["w"].tolist(), bool(state.skipped), int(state.skip_count)
      ([0.0, 0.0], True, 1)

    References:
      Chowdhery et al., `PaLM: Scaling Language Modeling with Pathways
      <https://arxiv.org/abs/2204.02311>`_, 2022 (skipping batches around
      loss spikes)
    """
    inner = _wrappers.as_transformation(inner)
    if max_norm is not None:
        _numerics.check_threshold("max_norm", max_norm)
    if z_thresh is not None:
        _numerics.check_threshold("z_thresh", z_thresh)
    _running.check(alpha, warmup_steps)

    def init_fn(params):
        return SkipState(
            inner_state=inner.init(params),
            skipped=jnp.zeros((), jnp.bool_),
            skip_count=jnp.zeros((), jnp.int32),
            count=jnp.zeros((), jnp.int32),
            norm=jnp.zeros((), jnp.float32),
            **_running.init()._asdict(),
        )

    def update_fn(updates, state, params=None, **extra_args):
        def inner_update(updates, inner_state, params):
            return inner.update(updates, inner_state, params, **extra_args)

        leaves = jax.tree.leaves(updates)
        norm = _numerics.global_norm(leaves, 2, axis_name)
        moments = _running.of(state)
        skip = ~jnp.isfinite(norm)
        if max_norm is not None:
            skip = skip | (
                norm > _numerics.threshold(max_norm, state.count, norm.dtype)
            )
        if z_thresh is not None:
            z, _ = _running.zscore(norm, moments, _Z_EPS)
            spike = z > _numerics.effective(jnp.asarray(z_thresh, jnp.float32))
            skip = skip | (_running.ready(moments, warmup_steps) & spike)

        out, inner_state = _wrappers.update_unless(
            skip, inner_update, updates, state.inner_state, params
        )
        moments = _running.observe(moments, norm, ~skip, alpha, warmup_steps)
        new = SkipState(
            inner_state=inner_state,
            skipped=skip,
            skip_count=jnp.where(
                skip, _numerics.safe_increment(state.skip_count), state.skip_count
            ),
            count=_numerics.safe_increment(state.count),
            norm=norm.astype(jnp.float32),
            **moments._asdict(),
        )
        return out, new

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
