"""ZClip: clip the global norm when its z-score against running statistics spikes."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax import lax

from jstab import _checks, _numerics
from jstab._numerics import AxisName, ScalarOrSchedule
from jstab.clipping import _running


class ZClipState(NamedTuple):
    """What :func:`zclip` did at its last step, and its running statistics.

    Attributes:
      norm: float32, the global L2 norm of the gradient before clipping.
      clipped: float32, 1.0 if the step was scaled, else 0.0.
      clip_count: int32, the number of steps that were scaled (warm-up steps
        clipped to ``max_norm`` included).
      count: int32, the number of steps seen; a ``max_norm`` schedule is
        evaluated at it.
      threshold: float32, the detection threshold μ + z_thresh·σ from the
        statistics after this step (the norm above which the next step is a
        spike, in either mode), capped by ``max_norm``; during warm-up,
        ``max_norm`` or ``inf``. The line a norm plot draws beside ``norm``.
      applied_threshold: float32, the norm the gradient was clipped to: the
        smaller of ``max_norm`` and the adaptive threshold when a spike was
        detected, else of ``max_norm`` and the norm itself (the authors'
        "effective clip"). The output norm never exceeds it.
      spike: bool, whether this step's norm was detected as a spike.
      mean: float32, the running mean μ of the norm.
      var: float32, the running (population) variance σ² of the norm.
      samples: int32, how many norms entered μ and σ²; the z-test starts
        once it reaches ``warmup_steps``.
    """

    norm: chex.Array
    clipped: chex.Array
    clip_count: chex.Array
    count: chex.Array
    threshold: chex.Array
    applied_threshold: chex.Array
    spike: chex.Array
    mean: chex.Array
    var: chex.Array
    samples: chex.Array


_MODES = ("zscore", "percentile")
_CLIP_OPTIONS = ("adaptive_scaling", "mean")


def _adaptive_threshold(norm, moments, z_thresh, eps, mode, clip_option, factor):
    """``(spike, v)``: whether ``norm`` is a spike, and the threshold ``v`` then."""
    z, std = _running.zscore(norm, moments, eps)
    z_thresh = jnp.asarray(z_thresh).astype(jnp.float32)
    mean = moments.mean
    if mode == "percentile":
        bound = mean + z_thresh * std
        return norm.astype(jnp.float32) > bound, bound
    spike = z > z_thresh
    if clip_option == "mean":
        return spike, mean
    # z > z_thresh > 0 wherever the value is used.
    eta = jnp.where(spike, z, z_thresh) / z_thresh
    scaled = (mean + (z_thresh * std) / eta) * jnp.asarray(factor).astype(jnp.float32)
    return spike, scaled


def _detection_threshold(moments, z_thresh, warmup_steps, cap):
    """μ + z_thresh·σ, capped by ``cap``; ``cap`` itself before warm-up ends.

    The z-test's own bound is μ + z_thresh·(σ + eps): ``eps`` (1e-6 by
    default) only keeps it defined when σ = 0, so the logged line leaves it out.
    """
    z_thresh = jnp.asarray(z_thresh).astype(jnp.float32)
    bound = moments.mean + z_thresh * jnp.sqrt(moments.var)
    bound = jnp.minimum(bound, cap)
    return jnp.where(_running.ready(moments, warmup_steps), bound, cap)


def zclip(
    alpha: float = 0.97,
    z_thresh: float = 2.5,
    max_norm: ScalarOrSchedule | None = None,
    eps: float = 1e-6,
    warmup_steps: int = 25,
    mode: str = "zscore",
    clip_option: str = "adaptive_scaling",
    clip_factor: float = 1.0,
    skip_update_on_spike: bool = False,
    *,
    axis_name: AxisName = None,
) -> optax.GradientTransformation:
    r"""Clips gradient-norm spikes detected by a z-score against running statistics.

    The first ``warmup_steps`` steps only collect the global L2 norms (and
    clip to ``max_norm`` if given); their mean and population variance start
    the running μ and σ². At each later step

    .. math::
      z = \frac{\lVert g \rVert - \mu}{\sigma + \epsilon}

    and, in mode ``"zscore"``, a step with ``z > z_thresh`` is a spike,
    clipped to

    .. math::
      v = \Big(\mu + \frac{z_{\text{thresh}}\,\sigma}{z / z_{\text{thresh}}}
      \Big) \cdot \text{clip\_factor}

    (``clip_option="adaptive_scaling"``: the larger the outlier, the harder
    the clip) or to ``v = μ`` (``clip_option="mean"``). In mode
    ``"percentile"`` a step whose norm exceeds ``v = μ + z_thresh·σ`` is
    clipped to it. The threshold in force is the smaller of ``v`` and
    ``max_norm``. Then, unless the step was a spike and
    ``skip_update_on_spike`` is set, the statistics take ``v`` (or the norm
    when no spike): μ ← αμ + (1−α)v, σ² ← ασ² + (1−α)(v − μ)² with the new μ.

    This is the authors' ``zclip.py`` step for step, with three choices of
    ours: ``max_norm`` defaults to ``None`` (their code caps at 1.0; pass
    ``max_norm=1.0`` to reproduce it); a non-finite norm never enters the
    statistics, so one overflowed step does not disable the clip for good
    (such a gradient still goes through the clip; chain
    :func:`skip_on_spike` or ``optax.apply_if_finite`` to drop it); and no
    1e-6 is added to the norm when the gradient is scaled, as their code
    does through ``torch.nn.utils.clip_grad_norm_``: the clipped norm equals
    the threshold to within rounding, where theirs is θ·‖g‖/(‖g‖ + 1e-6)
    (a relative difference of up to 1e-2 at norms near 1e-4). Below the
    threshold the gradient comes out bit for bit unchanged. A run-time
    hyperparameter (``inject_hyperparams``, a ``max_norm`` schedule) that
    makes the threshold 0, negative or NaN zeroes the step, and a threshold
    that is not finite never enters the statistics.

    Args:
      alpha: EMA weight of the past, in (0, 1).
      z_thresh: the z-score above which a step is a spike, > 0.
      max_norm: an optional fixed cap > 0: a float, a scalar array or an
        ``optax.Schedule`` of the step count; applied during warm-up too.
      eps: added to σ in the z-score's denominator, > 0.
      warmup_steps: the number of steps that only collect norms, an int >= 1.
      mode: ``"zscore"`` or ``"percentile"``.
      clip_option: in mode ``"zscore"``, ``"adaptive_scaling"`` or ``"mean"``.
      clip_factor: multiplies the adaptive-scaling threshold, > 0 (the
        authors suggest 0.5–0.9 for aggressive clipping).
      skip_update_on_spike: if True, a spike does not update μ and σ².
      axis_name: inside ``shard_map``, the mesh axis name (or names) the
        gradient is split over; the norm is combined with ``lax.psum``.

    Returns:
      A :class:`optax.GradientTransformation` with a :class:`ZClipState`.

    Example:
      >>> import jax.numpy as jnp, optax, jstab
      >>> tx = jstab.zclip(warmup_steps=3)
      >>> state = tx.init({"w": jnp.zeros(1)})
      >>> for g in [1.0, 2.0, 3.0, 100.0]:
      ...     out, state = tx.update({"w": jnp.array([g])}, state)
      >>> round(out["w"].tolist()[0], 3), bool(optax.tree.get(state, "spike"))
      (2.043, True)

    References:
      Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
      <https://arxiv.org/abs/2504.02507>`_, 2025
    """
    _running.check(alpha, warmup_steps)
    for name, value in (
        ("z_thresh", z_thresh),
        ("eps", eps),
        ("clip_factor", clip_factor),
    ):
        _numerics.check_threshold(name, value)
    if max_norm is not None:
        _numerics.check_threshold("max_norm", max_norm)
    _checks.one_of("mode", mode, _MODES)
    _checks.one_of("clip_option", clip_option, _CLIP_OPTIONS)
    if not isinstance(skip_update_on_spike, bool):
        raise TypeError(
            f"`skip_update_on_spike` must be a bool, got {skip_update_on_spike!r}."
        )

    def init_fn(params):
        return ZClipState(
            **_numerics.init_state()._asdict(),
            threshold=jnp.zeros((), jnp.float32),
            applied_threshold=jnp.zeros((), jnp.float32),
            spike=jnp.zeros((), jnp.bool_),
            **_running.init()._asdict(),
        )

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        norm = _numerics.global_norm(leaves, 2, axis_name)
        moments = _running.of(state)
        warm = _running.ready(moments, warmup_steps)
        spike, v = _adaptive_threshold(
            norm, moments, z_thresh, eps, mode, clip_option, clip_factor
        )
        spike = warm & spike
        v = jnp.where(spike, _numerics.effective(v), norm.astype(jnp.float32))
        cap = jnp.asarray(jnp.inf, jnp.float32)
        if max_norm is not None:
            cap = _numerics.threshold(max_norm, state.count, jnp.float32)
        applied = jnp.minimum(v, cap)
        out, clipped = _numerics.clip_to_norm(leaves, norm, applied)
        take = jnp.isfinite(norm) & jnp.isfinite(v)
        if skip_update_on_spike:
            take = take & ~spike
        # During warm-up the statistics collect the norm itself.
        moments = _running.observe(moments, v, take, alpha, warmup_steps)
        new = _numerics.advance(state, norm, clipped)._replace(
            threshold=lax.stop_gradient(
                _detection_threshold(moments, z_thresh, warmup_steps, cap)
            ),
            applied_threshold=lax.stop_gradient(applied),
            spike=spike,
            **moments._asdict(),
        )
        return jax.tree.unflatten(treedef, out), new

    return optax.GradientTransformation(init_fn, update_fn)
