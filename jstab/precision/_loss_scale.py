"""Dynamic loss scaling: float16 gradients without underflow or overflow."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jstab import _checks, _numerics, _wrappers
from jstab._numerics import AxisName


class DynamicLossScaleState(NamedTuple):
    """The state of :func:`dynamic_loss_scale`.

    Attributes:
      inner_state: the wrapped transformation's state, untouched by skipped
        steps.
      scale: float32, the loss scale for the next step (what
        :func:`loss_scale` returns).
      good_steps: int32, consecutive finite steps since the scale last
        changed; the scale grows when it reaches ``growth_interval``.
      skipped: bool, whether this step was skipped (its gradient was not
        finite).
      skip_count: int32, the number of steps skipped.
    """

    inner_state: optax.OptState
    scale: chex.Array
    good_steps: chex.Array
    skipped: chex.Array
    skip_count: chex.Array


def _check(init_scale, growth_interval, growth_factor, backoff_factor, lo, hi):
    """Raises at build time for a static argument outside its range."""
    static = {
        name: value
        for name, value in [
            ("init_scale", init_scale),
            ("growth_factor", growth_factor),
            ("backoff_factor", backoff_factor),
            ("min_scale", lo),
            ("max_scale", hi),
        ]
        if _numerics.is_static(value)
    }
    for name, value in static.items():
        _checks.positive(name, value)
    if static.get("growth_factor", 2.0) <= 1:
        raise ValueError(
            f"`growth_factor` must be > 1 (the scale grows), got {growth_factor!r}."
        )
    if static.get("backoff_factor", 0.5) >= 1:
        raise ValueError(
            "`backoff_factor` must be in (0, 1) (the scale shrinks), got "
            f"{backoff_factor!r}."
        )
    lo, hi = static.get("min_scale", 0.0), static.get("max_scale", float("inf"))
    if lo > hi:
        raise ValueError(f"`min_scale` ({lo!r}) must be <= `max_scale` ({hi!r}).")
    if not lo <= static.get("init_scale", lo) <= hi:
        raise ValueError(
            f"`init_scale` must lie in [min_scale, max_scale] = [{lo!r}, {hi!r}], "
            f"got {init_scale!r}."
        )
    if _numerics.is_static(growth_interval):
        _checks.integer_at_least("growth_interval", growth_interval, 1)


def _unscale(x: chex.Array, inverse: chex.Array) -> chex.Array:
    """``x * inverse`` in at least float32, cast back to ``x``'s dtype."""
    dtype = _numerics.compute_dtype(x.dtype)
    return (x.astype(dtype) * inverse.astype(dtype)).astype(x.dtype)


def dynamic_loss_scale(
    inner: optax.GradientTransformation | optax.MultiSteps,
    *,
    init_scale: float = 2.0**15,
    growth_interval: int = 2000,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    min_scale: float = 1.0,
    max_scale: float = 2.0**24,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Dynamic loss scaling: unscales the gradient, skips non-finite steps.

    In float16, gradients below about 6e-8 flush to zero and values above
    65504 overflow. Multiplying the loss by a scale :math:`S` before
    differentiating shifts every gradient into the representable range;
    this wrapper divides it out again and adapts :math:`S`. The loss is
    scaled by the caller, with the current scale from the state:
    :func:`scale_loss` (or :func:`loss_scale`). Each step then

    1. divides the incoming updates by :math:`S`: multiplies them by
       :math:`1/S` in float32 (float64 for float64 leaves), as
       ``GradScaler`` and jmp do, and casts them back to each leaf's dtype
       (exact when :math:`S` is a power of two, as the defaults keep it);
    2. checks that every element is finite, over all devices (global under
       ``jax.jit``; combined with ``lax.psum`` over ``axis_name`` inside
       ``shard_map``);
    3. if one is not, returns zero updates, leaves ``inner``'s state exactly
       as it was, and sets

       .. math:: S \leftarrow \max(S \cdot \text{backoff\_factor},
                 \text{min\_scale}),\quad \text{good\_steps} \leftarrow 0;

    4. otherwise runs ``inner`` on the unscaled updates and counts the step;
       after ``growth_interval`` consecutive finite steps

       .. math:: S \leftarrow \min(S \cdot \text{growth\_factor},
                 \text{max\_scale}),\quad \text{good\_steps} \leftarrow 0.

    These are the semantics of ``torch.amp.GradScaler`` and of
    ``jmp.DynamicLossScale`` (``period = growth_interval``, and ``factor``
    for both directions when ``backoff_factor = 1 / growth_factor``; jmp
    leaves skipping to the caller, here it is done). ``inner`` runs under
    ``jax.lax.cond``, on finite steps only, as in :func:`skip_on_spike`.

    A run-time hyperparameter (``optax.inject_hyperparams``) that would make
    the new scale NaN, infinite or not positive leaves the scale as it was.

    Put the wrapper around the whole optimizer, and around
    ``optax.MultiSteps`` rather than inside it: a non-finite micro-batch is
    then dropped before it reaches the accumulator.

    For float16 parameters, put it inside :func:`upcast`:
    ``upcast(dynamic_loss_scale(optax.adam(...)))``. The gradients are then
    unscaled in float32 and stay there, and Adam runs in float32. The other
    order would unscale into float16 leaves, where the gradients that the
    scale lifted above 6e-8 flush to zero again.

    Args:
      inner: the optimizer, e.g. ``optax.adam(1e-3)``: a
        ``GradientTransformation`` or an object with a
        ``gradient_transformation()`` method, such as ``optax.MultiSteps``.
      init_scale: the first scale, > 0.
      growth_interval: finite steps in a row before the scale grows, an
        int >= 1.
      growth_factor: what the scale is multiplied by when it grows, > 1.
      backoff_factor: what it is multiplied by after a non-finite step, in
        (0, 1).
      min_scale: the scale never goes below it, > 0.
      max_scale: nor above it, >= ``min_scale``.
      axis_name: inside ``shard_map``, the mesh axis name (or names) the
        gradient is split over, so that a non-finite element on one device
        skips the step on all.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with a
      :class:`DynamicLossScaleState`; extra keyword arguments of ``update``
      are passed on to ``inner``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jstab
      >>> params = {"w": jnp.ones(3, jnp.float16)}
      >>> tx = jstab.upcast(jstab.dynamic_loss_scale(optax.adam(1e-2)))
      >>> state = tx.init(params)
      >>> def loss(p, state):
      ...     value = jnp.sum(jnp.square(p["w"].astype(jnp.float32)))
      ...     return jstab.scale_loss(value, state)
      >>> for _ in range(2):  # 2 * 32768 = 65536 overflows float16, then not
      ...     grads = jax.grad(loss)(params, state)
      ...     updates, state = tx.update(grads, state, params)
      ...     print(float(jstab.loss_scale(state)), bool(state.inner_state.skipped))
      16384.0 True
      16384.0 False
      >>> updates["w"].dtype
      dtype('float16')

    References:
      Micikevicius et al., `Mixed Precision Training
      <https://arxiv.org/abs/1710.03740>`_, ICLR 2018
    """
    inner = _wrappers.as_transformation(inner)
    _check(
        init_scale, growth_interval, growth_factor, backoff_factor, min_scale, max_scale
    )

    def init_fn(params):
        return DynamicLossScaleState(
            inner_state=inner.init(params),
            scale=jnp.asarray(init_scale, jnp.float32),
            good_steps=jnp.zeros((), jnp.int32),
            skipped=jnp.zeros((), jnp.bool_),
            skip_count=jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        def inner_update(updates, inner_state, params, inverse):
            unscaled = jax.tree.map(lambda x: _unscale(x, inverse), updates)
            return inner.update(unscaled, inner_state, params, **extra_args)

        scale = state.scale
        inverse = 1 / scale
        # Unscaled here for the check and again inside the conditional for
        # ``inner``: each fuses into its consumer, so neither is written out.
        leaves = [_unscale(x, inverse) for x in jax.tree.leaves(updates)]
        # A count, not a max: a NaN does not survive XLA's cross-device max.
        bad = jnp.zeros((), jnp.float32)
        if leaves:
            groups = [range(len(leaves))]
            bad = _numerics.group_reduce(leaves, groups, jnp.float32, "nonfinite")[0]
        if axis_name is not None:
            bad = jax.lax.psum(bad, axis_name)
        skip = jax.lax.stop_gradient(bad > 0)

        out, inner_state = _wrappers.update_unless(
            skip, inner_update, updates, state.inner_state, params, inverse
        )
        grown = state.good_steps + 1 >= jnp.asarray(growth_interval)
        factor = jnp.where(
            skip, backoff_factor, jnp.where(grown, growth_factor, 1.0)
        ).astype(jnp.float32)
        candidate = scale * factor
        new_scale = jnp.clip(candidate, min_scale, max_scale).astype(jnp.float32)
        valid = lambda x: jnp.isfinite(x) & (x > 0)  # noqa: E731
        new_scale = jnp.where(valid(candidate) & valid(new_scale), new_scale, scale)
        good_steps = jnp.where(skip | grown, 0, state.good_steps + 1)
        return out, DynamicLossScaleState(
            inner_state=inner_state,
            scale=jax.lax.stop_gradient(new_scale),
            good_steps=good_steps.astype(jnp.int32),
            skipped=skip,
            skip_count=jnp.where(
                skip, _numerics.safe_increment(state.skip_count), state.skip_count
            ),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find(opt_state: object) -> DynamicLossScaleState:
    """The one :class:`DynamicLossScaleState` in ``opt_state``, or raises."""
    if isinstance(opt_state, nnx.Optimizer):
        opt_state = opt_state.opt_state
    found = [
        node
        for node in jax.tree.leaves(
            opt_state, is_leaf=lambda x: isinstance(x, DynamicLossScaleState)
        )
        if isinstance(node, DynamicLossScaleState)
    ]
    if len(found) != 1:
        raise ValueError(
            "`opt_state` must hold exactly one jstab.dynamic_loss_scale state, "
            f"found {len(found)}: build the optimizer as "
            "jstab.dynamic_loss_scale(optimizer) and pass its state (or the "
            "flax.nnx.Optimizer)."
        )
    return found[0]


def loss_scale(opt_state: optax.OptState | nnx.Optimizer) -> chex.Array:
    """The current loss scale, a float32 scalar, from anywhere in a state.

    Finds the :class:`DynamicLossScaleState` of :func:`dynamic_loss_scale`
    in ``opt_state``: an Optax state, however nested (``optax.chain``,
    ``optax.named_chain``, ``optax.MultiSteps``, ...), or a
    ``flax.nnx.Optimizer`` (or its ``opt_state``).

    Args:
      opt_state: the state holding exactly one loss-scale state.

    Returns:
      The scale to multiply the next step's loss by, as a float32 scalar.

    Raises:
      ValueError: ``opt_state`` holds no loss-scale state, or several.

    Example:
      >>> import jax.numpy as jnp, optax, jstab
      >>> tx = optax.named_chain(
      ...     ("opt", jstab.dynamic_loss_scale(optax.sgd(0.1), init_scale=1024.0)))
      >>> float(jstab.loss_scale(tx.init({"w": jnp.zeros(2)})))
      1024.0
    """
    scale = _find(opt_state).scale
    if isinstance(scale, nnx.Variable):
        scale = scale[...]
    return jnp.asarray(scale, jnp.float32)


def scale_loss(loss: chex.Array, opt_state: optax.OptState | nnx.Optimizer):
    """``loss`` multiplied by the current loss scale, in ``loss``'s dtype.

    Call it on the loss inside the function that is differentiated; the
    gradients then arrive scaled, and :func:`dynamic_loss_scale` divides
    the scale out. A float16 loss times a large scale can overflow to
    infinity: the step is then skipped and the scale backed off, as for
    any overflow; computing the loss in float32 avoids it. The scale
    carries no gradient.

    Args:
      loss: the loss (any floating dtype, any shape).
      opt_state: as for :func:`loss_scale`.

    Returns:
      ``loss * scale``, of ``loss``'s dtype.
    """
    loss = jnp.asarray(loss)
    scale = jax.lax.stop_gradient(loss_scale(opt_state))
    dtype = _numerics.compute_dtype(loss.dtype)
    return (loss.astype(dtype) * scale.astype(dtype)).astype(loss.dtype)
