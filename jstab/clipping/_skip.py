"""A wrapper that drops a step whose gradient is non-finite or spikes."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from jstab import _checks, _numerics, _wrappers
from jstab._numerics import AxisName, ScalarOrSchedule
from jstab.clipping import _running

_Z_EPS = 1e-6


class SkipState(NamedTuple):
    """The state of :func:`skip_on_spike`: the inner state and what was skipped.

    The fields of an option left at ``None`` are ``None`` (no leaves), so a
    wrapper without the loss test, the window or forced steps keeps the
    state it always had.

    Attributes:
      inner_state: the wrapped transformation's state, untouched by skipped
        steps.
      skipped: bool, whether this step was skipped.
      skip_count: int32, the number of steps skipped.
      count: int32, the number of steps seen, skipped ones included; a
        ``max_norm`` schedule is evaluated at it.
      norm: float32, this step's global L2 norm of the incoming gradient.
      mean: float32, the mean μ of accepted steps' norms (running, or over
        the window).
      var: float32, their (population) variance σ².
      samples: int32, how many accepted steps entered the statistics; the
        z-tests start once it reaches ``warmup_steps``.
      loss: float32, this step's loss (with ``loss_z_thresh``).
      loss_mean: float32, the mean of accepted steps' losses.
      loss_var: float32, their (population) variance.
      history: float32 ``(window,)``, the last ``window`` accepted norms, a
        ring buffer (with ``window``).
      loss_history: float32 ``(window,)``, their losses (with ``window`` and
        ``loss_z_thresh``).
      consecutive: int32, the number of steps skipped in a row up to this
        one (with ``max_consecutive``).
      forced_count: int32, the number of steps accepted because
        ``max_consecutive`` steps before them were skipped.
    """

    inner_state: optax.OptState
    skipped: chex.Array
    skip_count: chex.Array
    count: chex.Array
    norm: chex.Array
    mean: chex.Array
    var: chex.Array
    samples: chex.Array
    loss: chex.Array | None = None
    loss_mean: chex.Array | None = None
    loss_var: chex.Array | None = None
    history: chex.Array | None = None
    loss_history: chex.Array | None = None
    consecutive: chex.Array | None = None
    forced_count: chex.Array | None = None


def skip_on_spike(
    inner: optax.GradientTransformation | optax.MultiSteps,
    *,
    max_norm: ScalarOrSchedule | None = None,
    z_thresh: float | None = None,
    alpha: float = 0.97,
    warmup_steps: int = 25,
    loss_z_thresh: float | None = None,
    window: int | None = None,
    max_consecutive: int | None = None,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Skips a step whose gradient is non-finite or whose norm or loss spikes.

    A step is skipped when the global L2 norm of the incoming gradient is
    not finite (a NaN or an infinity anywhere), exceeds ``max_norm``, or,
    after the warm-up, has a one-sided z-score

    .. math::
      z = \frac{\lVert g \rVert - \mu}{\sigma + 10^{-6}} > z_{\text{thresh}}

    against the mean μ and variance σ² of accepted steps' norms. With
    ``loss_z_thresh``, ``update`` takes the step's loss
    (``tx.update(g, state, params, loss=loss)``), and a step whose loss is
    not finite, or whose loss has a z-score above ``loss_z_thresh`` against
    accepted steps' losses (same rules), is skipped too.

    A skipped step returns zero updates (so ``optax.apply_updates`` leaves
    the parameters as they are) and leaves ``inner``'s state exactly as it
    was, so a spike never reaches Adam's moments; ``skipped`` and
    ``skip_count`` record it. Only accepted steps enter μ and σ²: the first
    ``warmup_steps`` only collect values, then the z-tests start. Without
    ``window``, the first ``warmup_steps`` give their exact mean and
    population variance and later ones update them by an exponential moving
    average with weight ``alpha``, as in :func:`zclip`. With ``window``, μ
    and σ² are the mean and population variance of the last ``window``
    accepted values (of those accepted so far, until there are ``window``),
    as levanter's and MaxText's skip-step wrappers keep them.

    A level shift (a new data mixture, a learning-rate change) can make
    every later norm a spike against statistics that only accepted steps
    update, and stall the run. With ``max_consecutive``, the step after that
    many consecutive skips is accepted whatever its norm and loss (unless
    one is non-finite): it enters the statistics, resets the run of skips,
    and ``forced_count`` counts it.

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
      z_thresh: skip a step whose norm's z-score exceeds it (> 0).
        ``None``: no z-test of the norm. A run-time value below 0 or NaN
        counts as 0.
      alpha: EMA weight of the past, in (0, 1); unused with ``window``.
      warmup_steps: the number of accepted steps that only collect values
        before the z-tests start, an int >= 1.
      loss_z_thresh: skip a step whose loss's z-score exceeds it (> 0); the
        loss is then a required keyword argument of ``update``, a scalar
        (inside ``shard_map``, the same on every device: the global loss).
        ``None``: no loss test. A run-time value below 0 or NaN counts as 0.
      window: an int >= 2: keep the statistics over the last ``window``
        accepted values instead of by EMA. ``None``: EMA.
      max_consecutive: an int >= 1: after that many consecutive skipped
        steps, accept the next finite one. ``None``: no forced steps.
      axis_name: inside ``shard_map``, the mesh axis name (or names) the
        gradient is split over; the norm is combined with ``lax.psum``.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with a
      :class:`SkipState`; extra keyword arguments of ``update`` (the
      ``loss``, ``value`` for a line search) are passed on to ``inner``.

    Example:
      >>> import jax.numpy as jnp, optax, jstab
      >>> tx = jstab.skip_on_spike(optax.adam(0.1), max_norm=10.0)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> out, state = tx.update({"w": jnp.array([30.0, 40.0])}, state)
      >>> out["w"].tolist(), bool(state.skipped), int(state.skip_count)
      ([0.0, 0.0], True, 1)

      Levanter's rule, on the loss and the norm over a window of 128
      accepted steps at 6σ, never skipping more than 10 steps in a row:

      >>> tx = jstab.skip_on_spike(
      ...     optax.adam(0.1), z_thresh=6.0, loss_z_thresh=6.0, window=128,
      ...     warmup_steps=64, max_consecutive=10)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> out, state = tx.update({"w": jnp.ones(2)}, state, loss=jnp.array(2.3))
      >>> float(state.loss), state.history.shape
      (2.299999952316284, (128,))

    References:
      Chowdhery et al., `PaLM: Scaling Language Modeling with Pathways
      <https://arxiv.org/abs/2204.02311>`_, 2022 (skipping batches around
      loss spikes)
    """
    inner = _wrappers.as_transformation(inner)
    for name, value in (
        ("max_norm", max_norm),
        ("z_thresh", z_thresh),
        ("loss_z_thresh", loss_z_thresh),
    ):
        if value is not None:
            _numerics.check_threshold(name, value)
    _running.check(alpha, warmup_steps)
    if window is not None:
        _checks.integer_at_least("window", window, 2)
    if max_consecutive is not None:
        _checks.integer_at_least("max_consecutive", max_consecutive, 1)
    with_loss = loss_z_thresh is not None

    def zeros(dtype, shape=()):
        return jnp.zeros(shape, dtype)

    def init_fn(params):
        f32, i32 = jnp.float32, jnp.int32
        ring = (window,) if window is not None else None
        return SkipState(
            inner_state=inner.init(params),
            skipped=zeros(jnp.bool_),
            skip_count=zeros(i32),
            count=zeros(i32),
            norm=zeros(f32),
            **_running.init()._asdict(),
            loss=zeros(f32) if with_loss else None,
            loss_mean=zeros(f32) if with_loss else None,
            loss_var=zeros(f32) if with_loss else None,
            history=zeros(f32, ring) if ring else None,
            loss_history=zeros(f32, ring) if ring and with_loss else None,
            consecutive=zeros(i32) if max_consecutive is not None else None,
            forced_count=zeros(i32) if max_consecutive is not None else None,
        )

    def spike(value, mean, var, samples, thresh):
        """Whether ``value``'s z-score exceeds ``thresh``, after the warm-up."""
        moments = _running.Moments(mean, var, samples)
        z, _ = _running.zscore(value, moments, _Z_EPS)
        over = z > _numerics.effective(jnp.asarray(thresh, jnp.float32))
        return _running.ready(moments, warmup_steps) & over

    def enter(value, mean, var, history, samples, take):
        """``(mean, var, history)`` after ``value`` enters them, if ``take``."""
        if history is None:
            moments = _running.Moments(mean, var, samples)
            new = _running.observe(moments, value, take, alpha, warmup_steps)
            return new.mean, new.var, None
        history = _running.push(history, samples, value, take)
        held = jnp.where(take, _numerics.safe_increment(samples), samples)
        return (*_running.over_window(history, held), history)

    def update_fn(updates, state, params=None, **extra_args):
        def inner_update(updates, inner_state, params):
            return inner.update(updates, inner_state, params, **extra_args)

        leaves = jax.tree.leaves(updates)
        norm = _numerics.global_norm(leaves, 2, axis_name)
        finite = jnp.isfinite(norm)
        skip = ~finite
        if max_norm is not None:
            skip = skip | (
                norm > _numerics.threshold(max_norm, state.count, norm.dtype)
            )
        if z_thresh is not None:
            skip = skip | spike(norm, state.mean, state.var, state.samples, z_thresh)
        new = {}
        if with_loss:
            loss = _step_loss(extra_args)
            finite = finite & jnp.isfinite(loss)
            skip = skip | ~jnp.isfinite(loss)
            skip = skip | spike(
                loss, state.loss_mean, state.loss_var, state.samples, loss_z_thresh
            )
            new["loss"] = loss
        if max_consecutive is not None:
            forced = skip & finite & (state.consecutive >= max_consecutive)
            skip = skip & ~forced
            new["consecutive"] = jnp.where(
                skip, _numerics.safe_increment(state.consecutive), 0
            )
            new["forced_count"] = jnp.where(
                forced, _numerics.safe_increment(state.forced_count), state.forced_count
            )

        out, inner_state = _wrappers.update_unless(
            skip, inner_update, updates, state.inner_state, params
        )
        take = ~skip
        new["mean"], new["var"], new["history"] = enter(
            norm, state.mean, state.var, state.history, state.samples, take
        )
        if with_loss:
            new["loss_mean"], new["loss_var"], new["loss_history"] = enter(
                loss,
                state.loss_mean,
                state.loss_var,
                state.loss_history,
                state.samples,
                take,
            )
        samples = jnp.where(
            take, _numerics.safe_increment(state.samples), state.samples
        )
        return out, state._replace(
            inner_state=inner_state,
            skipped=skip,
            skip_count=jnp.where(
                skip, _numerics.safe_increment(state.skip_count), state.skip_count
            ),
            count=_numerics.safe_increment(state.count),
            norm=norm.astype(jnp.float32),
            samples=samples,
            **new,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _step_loss(extra_args: dict) -> chex.Array:
    """The ``loss`` keyword argument of ``update``, a float32 scalar."""
    loss = extra_args.get("loss")
    if loss is None:
        raise ValueError(
            "skip_on_spike was built with `loss_z_thresh` and needs the step's "
            "loss: call tx.update(updates, state, params, loss=loss)."
        )
    if jnp.shape(loss) != ():
        raise ValueError(
            f"`loss` passed to skip_on_spike must be a scalar, got shape "
            f"{jnp.shape(loss)}."
        )
    return jax.lax.stop_gradient(jnp.asarray(loss).astype(jnp.float32))
