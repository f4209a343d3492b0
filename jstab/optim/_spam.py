"""SPAM: Adam with momentum resets and spike-aware clipping of gradient elements."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax import lax

from jstab import _checks, _numerics
from jstab._numerics import AxisName, ScalarOrSchedule

#: Steps after each reset (and at the start) before spikes are clipped: the
#: authors' ``grad_accu_steps``. The second moment is rebuilt first; right
#: after a reset v = 0 and every nonzero element would be a spike.
GATE = 20

_INT32_MAX = 2**31 - 1


class ScaleBySpamState(NamedTuple):
    """The state of :func:`scale_by_spam`.

    Attributes:
      count: int32, the number of steps seen: Adam's bias-correction count,
        never reset.
      mu: the first moment, a tree like the params (``mu_dtype``, else the
        params' dtypes).
      nu: the second moment, a tree like the params (their dtypes).
      spikes: int32, the number of gradient elements clipped at the last step,
        over all leaves (and over ``axis_name`` when given).
      reset_count: int32, the number of moment resets so far.
    """

    count: chex.Array
    mu: optax.Updates
    nu: optax.Updates
    spikes: chex.Array
    reset_count: chex.Array


def _check(b1, b2, eps, spike_threshold, reset_interval, warmup_steps) -> None:
    """Static checks of :func:`scale_by_spam`'s arguments; arrays pass."""
    for name, value in (("b1", b1), ("b2", b2)):
        if _numerics.is_static(value):
            beta = _checks.real_number(name, value)
            if not 0 <= beta < 1:
                raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")
    if _numerics.is_static(eps):
        _checks.nonnegative("eps", eps)
    if not _is_inf(spike_threshold):  # +inf turns the clipping off
        _numerics.check_threshold("spike_threshold", spike_threshold)
    for name, value, low in (
        ("reset_interval", reset_interval, 1),
        ("warmup_steps", warmup_steps, 0),
    ):
        if not isinstance(value, jax.Array):
            _checks.integer_at_least(name, value, low)


def _is_inf(value: Any) -> bool:
    """Whether ``value`` is a static +inf."""
    if not _numerics.is_static(value) or isinstance(value, str | bytes | bool):
        return False
    try:
        return float(value) == math.inf  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _int(value: Any, low: int) -> chex.Array:
    """An int32 scalar >= ``low`` (a run-time value below it is taken as ``low``)."""
    if isinstance(value, jax.Array):
        return jnp.maximum(value.astype(jnp.int32), low)
    return jnp.asarray(min(int(value), _INT32_MAX), jnp.int32)


def _hyper(value: Any, dtype: jnp.dtype) -> Any:
    """A Python number as it is (weakly typed, as Optax uses it), else ``dtype``."""
    if isinstance(value, int | float):
        return value
    return jnp.asarray(value).astype(dtype)


def _ratio(theta: chex.Array, beta2: Any) -> chex.Array:
    r""":math:`r = \theta / (\beta_2 + (1 - \beta_2)\theta)`, so that
    :math:`\theta v = r v'` for a clipped element, :math:`v'` the new v.

    It is :math:`1 / (1 - \beta_2)` at :math:`\theta = \infty` and 0 at
    :math:`\theta = 0`.
    """
    c = beta2 + (1 - beta2) * theta
    finite = theta / jnp.where(c > 0, c, 1)
    return jnp.where(jnp.isinf(theta), 1 / (1 - beta2), finite)


def warmup_factor(t, reset_interval, warmup_steps, dtype=jnp.float32):
    """The update's scale :math:`s_t` of :func:`scale_by_spam` at step ``t``.

    None before the first reset, nor at step 1 (``reset_interval = 1``).
    """
    t, interval = jnp.asarray(t, jnp.int32), _int(reset_interval, 1)
    steps = _int(warmup_steps, 0)
    j = t % interval
    warming = (t >= interval) & (t > 1) & (j < steps)
    half = jnp.pi * j.astype(dtype) / (2 * steps.astype(dtype) + 2)
    # The same value as 1 - 0.99 (1 + cos 2x) / 2, without its cancellation.
    return jnp.where(warming, 0.01 + 0.99 * jnp.sin(half) ** 2, 1).astype(dtype)


def scale_by_spam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    spike_threshold: ScalarOrSchedule = 5000.0,
    reset_interval: int = 500,
    warmup_steps: int = 150,
    mu_dtype: Any = None,
    axis_name: AxisName = None,
) -> optax.GradientTransformation:
    r"""Rescales updates by SPAM: Adam with momentum resets and spike clipping.

    At step :math:`t` (counted from 1), with :math:`R` = ``reset_interval``,
    :math:`\theta` = ``spike_threshold`` and :math:`W` = ``warmup_steps``:
    if :math:`t \bmod R = 0`, :math:`m` and :math:`v` are first set to zero.
    Then, if :math:`t \bmod R \ge 20`, each gradient element that is a spike
    against the second moment before this step's update (raw, not
    bias-corrected) is clipped:

    .. math::
      g_i \leftarrow \operatorname{sign}(g_i)\sqrt{\theta v_i}
      \quad\text{where}\quad g_i^2 > \theta v_i,

    and Adam follows with the clipped gradient, its count never reset:

    .. math::
      m \leftarrow \beta_1 m + (1-\beta_1) g, \quad
      v \leftarrow \beta_2 v + (1-\beta_2) g^2, \quad
      u = s_t\,\frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon},

    where, at the :math:`j`-th step after a reset (:math:`j = t \bmod R`, 0 at
    the reset itself), :math:`s_t = 1 - 0.99\,(1 + \cos(\pi j / (W+1)))/2`
    for :math:`j < W`, else 1; :math:`s_t = 1` before the first reset (and at
    step 1).

    This is the authors' ``SPAM`` optimizer (``galore_torch/SPAM.py``) step
    for step: the same gate of 20 steps (their ``grad_accu_steps``; with
    ``reset_interval <= 20`` nothing is ever clipped, as in their code), the
    same spike test and cosine warm-up. It differs in these choices:

    - ``eps`` is added as in ``optax.scale_by_adam``, to
      :math:`\sqrt{\hat v}`. Theirs (default 1e-6) is added to the raw
      :math:`\sqrt{v}`: jstab's form with :math:`\epsilon/\sqrt{1-\beta_2^t}`,
      3.2e-5 at step 1, tending to 1e-6 (``eps=1e-6`` matches it late).
    - ``warmup_steps >= reset_interval`` is accepted, as by theirs: each reset
      cuts the warm-up short and the scale never reaches 1. Their training
      script passes its learning-rate warm-up (1000) here with resets every
      500, so their runs scale updates by 0.01 to about 0.5 after the first
      reset (their README's example uses 150).
    - Their ``threshold=0`` turns clipping off; here a static threshold must
      be > 0 (``inf`` turns it off), and a run-time one (a schedule,
      ``optax.inject_hyperparams``) <= 0 or NaN is taken as 0: past the gate
      every nonzero element is clipped to 0, so the moments see a zero
      gradient (never NaN, never the reversed gradient).
    - Their moments have the gradient's dtype and are computed in it
      (bfloat16 in their runs). Here ``mu`` has ``mu_dtype`` (else the
      params' dtype) and ``nu`` the params' dtype, as in Optax; everything is
      computed in float32 at least; the update has the gradient's dtype.
    - The first moment's spike test and clipped value are computed from the
      updated second moment :math:`v'`, as :math:`g_i^2 > r v'_i` and
      :math:`\sqrt{r v'_i}` with :math:`r = \theta / (\beta_2 + (1 -
      \beta_2)\theta)`: the same test and value as theirs, but for rounding
      when :math:`g_i^2` is within an ulp or two of :math:`\theta v_i`.
      Reading the old :math:`v` there, a jit-compiled step that donates the
      state makes XLA copy it before overwriting it in place.
    - Their groups with ``density < 1`` (moments for a random subset of
      elements, redrawn at each reset) are not provided; density 1 (their
      scripts) computes the same. Per-group settings: ``optax.multi_transform``.
      Weight decay: see :func:`spam`.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to :math:`\sqrt{\hat v}`, >= 0.
      spike_threshold: :math:`\theta` > 0 (their ``threshold``): a float,
        ``inf`` (no clipping), a scalar array or an ``optax.Schedule`` of the
        step count.
      reset_interval: reset the moments at every step that is a multiple of
        it (their ``DeltaT``); an int >= 1.
      warmup_steps: length of the update's cosine warm-up after each reset;
        an int >= 0 (0: none).
      mu_dtype: optional dtype of the first moment, as in Optax's Adam.
      axis_name: inside ``shard_map``, the mesh axis name (or names) the
        gradient is split over: ``spikes`` is summed over it. Everything else
        is elementwise, so sharded ``jax.jit`` needs none.

    Returns:
      A :class:`optax.GradientTransformation` with a :class:`ScaleBySpamState`.

    Example:
      >>> import jax.numpy as jnp, jstab
      >>> tx = jstab.scale_by_spam()
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> for t in range(1, 23):  # a spike of 100 at step 22, clipped to 10.2
      ...     g = {"w": jnp.array([1.0, 100.0 if t == 22 else 1.0])}
      ...     out, state = tx.update(g, state)
      >>> int(state.spikes), round(float(state.nu["w"][1]), 4)
      (1, 0.1247)

    References:
      Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable
      LLM Training <https://arxiv.org/abs/2501.06842>`_, ICLR 2025
    """
    _check(b1, b2, eps, spike_threshold, reset_interval, warmup_steps)
    mu_dtype = _checks.float_dtype("mu_dtype", mu_dtype)
    if mu_dtype is not None:
        mu_dtype = jax.dtypes.canonicalize_dtype(mu_dtype)

    def init_fn(params):
        return ScaleBySpamState(
            count=jnp.zeros((), jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=optax.tree.zeros_like(params),
            spikes=jnp.zeros((), jnp.int32),
            reset_count=jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None):
        del params
        _checks.same_tree("scale_by_spam", state.mu, updates)
        leaves, treedef = jax.tree.flatten(updates)
        wide = _numerics.accumulation_dtype(leaves)
        theta = _numerics.threshold(spike_threshold, state.count, wide)
        t = _numerics.safe_increment(state.count)
        interval = _int(reset_interval, 1)
        reset = t % interval == 0
        gate = t % interval >= GATE
        scale = warmup_factor(t, reset_interval, warmup_steps, wide)
        # Optax's bias correction: 1 - b**t in the default float type.
        real = jax.dtypes.canonicalize_dtype(jnp.float64)
        corrections = [1 - lax.pow(jnp.asarray(b, real), t) for b in (b1, b2)]

        def step(x, m0, v0):
            dtype = _numerics.compute_dtype(x.dtype)
            beta1, beta2 = _hyper(b1, dtype), _hyper(b2, dtype)
            g, m, v = (y.astype(dtype) for y in (x, m0, v0))
            m, v = (jnp.where(reset, jnp.zeros_like(x), x) for x in (m, v))
            th = theta.astype(dtype)
            bound = th * v
            g2 = jnp.where(gate & (g * g > bound), bound, g * g)
            v = (1 - beta2) * g2 + beta2 * v
            # m reads the new v, not the old one, which the step overwrites in
            # place (XLA would copy it first): g² > θ·v_old exactly when
            # g² > r·v_new, and then θ·v_old = r·v_new.
            rv = _ratio(th, beta2) * v
            spike = gate & (g * g > rv)
            clip = jnp.sign(g) * _numerics.safe_sqrt(jnp.where(spike, rv, 0))
            m = (1 - beta1) * jnp.where(spike, clip, g) + beta1 * m
            m_hat = m / corrections[0].astype(dtype)
            v_hat = v / corrections[1].astype(dtype)
            u = m_hat / (jnp.sqrt(v_hat) + _hyper(eps, dtype)) * scale.astype(dtype)
            m, v, spike = m.astype(m0.dtype), v.astype(v0.dtype), spike.astype(dtype)
            return u.astype(x.dtype), m, v, spike

        mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        steps = [step(*x) for x in zip(leaves, mus, nus, strict=True)]
        out, new_mu, new_nu, spiked = ([s[i] for s in steps] for i in range(4))
        spikes = _numerics.count_positive(spiked)
        if axis_name is not None:
            spikes = lax.psum(spikes, axis_name)
        new = ScaleBySpamState(
            count=t,
            mu=jax.tree.unflatten(treedef, new_mu),
            nu=jax.tree.unflatten(treedef, new_nu),
            spikes=lax.stop_gradient(spikes),
            reset_count=jnp.where(
                reset, _numerics.safe_increment(state.reset_count), state.reset_count
            ),
        )
        return jax.tree.unflatten(treedef, out), new

    return optax.GradientTransformation(init_fn, update_fn)


def spam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    spike_threshold: ScalarOrSchedule = 5000.0,
    reset_interval: int = 500,
    warmup_steps: int = 150,
    weight_decay: float = 0.0,
    mask: Any = None,
    mu_dtype: Any = None,
    axis_name: AxisName = None,
) -> optax.GradientTransformation:
    r"""The SPAM optimizer: :func:`scale_by_spam`, weight decay, learning rate.

    Chains ``add_decayed_weights(weight_decay, mask)`` (unless 0) and
    ``scale_by_learning_rate`` as ``optax.adamw`` does:
    :math:`p \leftarrow p - \eta\,(s_t \hat u + \lambda p)`, the warm-up
    :math:`s_t` on the Adam part only. The authors decay after the update,
    :math:`p \leftarrow (p - \eta s_t \hat u)(1 - \eta\lambda)` (a difference
    of :math:`\eta^2 \lambda s_t \hat u`), and not at all in their groups with
    a ``density`` (it decays a copy made by indexing; their scripts put the
    attention and MLP weights there, with a weight decay of 0).

    Args:
      learning_rate: a float >= 0, a scalar array or an ``optax.Schedule``.
      b1: decay of the first moment, as in :func:`scale_by_spam`.
      b2: decay of the second moment.
      eps: added to :math:`\sqrt{\hat v}`.
      spike_threshold: as in :func:`scale_by_spam`.
      reset_interval: as in :func:`scale_by_spam`.
      warmup_steps: as in :func:`scale_by_spam`.
      weight_decay: decoupled weight decay :math:`\lambda` >= 0.
      mask: as in ``optax.adamw``: a tree of bools like the params (or a
        function of them) choosing the parameters to decay.
      mu_dtype: optional dtype of the first moment.
      axis_name: as in :func:`scale_by_spam`.

    Returns:
      A :class:`optax.GradientTransformation`.

    Example:
      >>> import jax.numpy as jnp, optax, jstab
      >>> tx = jstab.spam(1e-3, weight_decay=0.1)
      >>> params = {"w": jnp.ones(2)}
      >>> updates, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
      >>> [round(x, 6) for x in optax.apply_updates(params, updates)["w"].tolist()]
      [0.9989, 0.9989]

    References:
      Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable
      LLM Training <https://arxiv.org/abs/2501.06842>`_, ICLR 2025
    """
    if _numerics.is_static(learning_rate):
        _checks.nonnegative("learning_rate", learning_rate)
    parts = [
        scale_by_spam(
            b1,
            b2,
            eps,
            spike_threshold=spike_threshold,
            reset_interval=reset_interval,
            warmup_steps=warmup_steps,
            mu_dtype=mu_dtype,
            axis_name=axis_name,
        )
    ]
    static = _numerics.is_static(weight_decay)
    if not static or _checks.nonnegative("weight_decay", weight_decay) > 0:
        parts.append(optax.add_decayed_weights(weight_decay, mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
