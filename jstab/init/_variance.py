"""Variance scaling and the named initializers made of it."""

from __future__ import annotations

from typing import Literal, get_args

import jax
import jax.numpy as jnp

from jstab import _checks
from jstab.init import _core
from jstab.init._fans import Axes, compute_fans, hashable_axes
from jstab.init._gain import gain_squared

Mode = Literal["fan_in", "fan_out", "fan_avg", "fan_geo_avg"]
Distribution = Literal["normal", "truncated_normal", "uniform"]
_MODES = get_args(Mode)
_DISTRIBUTIONS = get_args(Distribution)
_NORMALS = ("normal", "truncated_normal")


@_core.builder
def variance_scaling(
    scale: float,
    mode: Mode,
    distribution: Distribution,
    in_axis: Axes = -2,
    out_axis: Axes = -1,
    batch_axis: Axes = (),
    dtype: jnp.dtype | None = None,
) -> _core.Initializer:
    r"""Builds an initializer whose variance is ``scale / n``.

    .. math::
      \operatorname{Var}[w] = \frac{\text{scale}}{n}, \qquad
      n = \begin{cases}
        \text{fan\_in} & \text{mode = "fan\_in"} \\
        \text{fan\_out} & \text{mode = "fan\_out"} \\
        (\text{fan\_in} + \text{fan\_out}) / 2 & \text{mode = "fan\_avg"} \\
        \sqrt{\text{fan\_in} \cdot \text{fan\_out}} & \text{mode = "fan\_geo\_avg"}
      \end{cases}

    with fans from :func:`compute_fans`. ``"normal"`` draws
    :math:`\mathcal{N}(0, \text{scale}/n)`; ``"truncated_normal"`` draws a
    normal truncated at two of its standard deviations, rescaled so that the
    variance after truncation is ``scale / n``; ``"uniform"`` draws
    :math:`\mathcal{U}(-\sqrt{3\,\text{scale}/n}, \sqrt{3\,\text{scale}/n})`.
    This is ``jax.nn.initializers.variance_scaling`` with its arguments
    checked when it is built and half-precision draws made in float32 (see
    below). All the fan-based initializers of jstab are made of it.

    Args:
      scale: the variance times ``n``; ≥ 0.
      mode: ``"fan_in"`` preserves the forward pass, ``"fan_out"`` the
        backward pass; ``"fan_avg"`` (Glorot) and ``"fan_geo_avg"`` compromise.
      distribution: ``"normal"``, ``"truncated_normal"`` or ``"uniform"``.
      in_axis: axis or axes of the inputs.
      out_axis: axis or axes of the outputs.
      batch_axis: axis or axes counted in neither fan.
      dtype: the default dtype of the result (float32, or float64 under x64).
        bfloat16 and float16 are drawn in float32 and rounded once.

    Returns:
      An initializer ``init(key, shape, dtype=dtype) -> Array``.

    Raises:
      ValueError: when built, for a negative ``scale`` or an unknown ``mode``
        or ``distribution``; when called, for a shape of rank < 2.
      TypeError: for a dtype that is not floating-point.
    """
    scale = _checks.nonnegative("scale", scale)
    _checks.one_of("mode", mode, _MODES)
    _checks.one_of("distribution", distribution, _DISTRIBUTIONS)
    axes = tuple(
        hashable_axes(name, value)
        for name, value in [
            ("in_axis", in_axis),
            ("out_axis", out_axis),
            ("batch_axis", batch_axis),
        ]
    )
    return _core.initializer(
        jax.nn.initializers.variance_scaling,
        (scale, mode, distribution, *axes),
        dtype,
        f"variance_scaling({scale}, {mode!r}, {distribution!r})",
        check=lambda shape: compute_fans(shape, *axes),
    )


@_core.builder
def glorot_normal(
    gain: float = 1.0,
    *,
    scale: float = 1.0,
    distribution: Literal["normal", "truncated_normal"] = "normal",
    in_axis: Axes = -2,
    out_axis: Axes = -1,
    batch_axis: Axes = (),
    dtype: jnp.dtype | None = None,
) -> _core.Initializer:
    r"""Glorot (Xavier) normal: :math:`\mathcal{N}(0, \sigma^2)`.

    .. math::
      \sigma = \text{gain} \cdot
        \sqrt{\frac{2\,\text{scale}}{\text{fan\_in} + \text{fan\_out}}}

    Draws from a plain normal by default, as PyTorch's ``xavier_normal_``;
    ``jax.nn.initializers.glorot_normal`` draws from a truncated normal
    (``distribution="truncated_normal"`` here). ``scale=0.5`` gives the
    variance :math:`1/(n_\text{in} + n_\text{out})` that some texts quote,
    half of Glorot and Bengio's.

    Args:
      gain: multiplies the standard deviation, e.g. ``calculate_gain("tanh")``.
      scale: multiplies the variance.
      distribution: ``"normal"`` or ``"truncated_normal"``.
      in_axis, out_axis, batch_axis, dtype: as in :func:`variance_scaling`.

    Returns:
      An initializer ``init(key, shape, dtype=dtype) -> Array``.

    References:
      Glorot & Bengio, `Understanding the difficulty of training deep
      feedforward neural networks
      <https://proceedings.mlr.press/v9/glorot10a.html>`_, 2010.
    """
    gain = _checks.nonnegative("gain", gain)
    scale = _checks.nonnegative("scale", scale)
    _checks.one_of("distribution", distribution, _NORMALS)
    return variance_scaling(
        scale * gain**2, "fan_avg", distribution, in_axis, out_axis, batch_axis, dtype
    )


@_core.builder
def glorot_uniform(
    gain: float = 1.0,
    *,
    scale: float = 1.0,
    in_axis: Axes = -2,
    out_axis: Axes = -1,
    batch_axis: Axes = (),
    dtype: jnp.dtype | None = None,
) -> _core.Initializer:
    r"""Glorot (Xavier) uniform: :math:`\mathcal{U}(-b, b)`.

    .. math::
      b = \text{gain} \cdot
        \sqrt{\frac{6\,\text{scale}}{\text{fan\_in} + \text{fan\_out}}}

    so that the variance is :math:`\text{gain}^2 \cdot 2\,\text{scale} /
    (\text{fan\_in} + \text{fan\_out})`, as :func:`glorot_normal`.

    Args:
      gain: multiplies the bound, e.g. ``calculate_gain("tanh")``.
      scale: multiplies the variance.
      in_axis, out_axis, batch_axis, dtype: as in :func:`variance_scaling`.

    Returns:
      An initializer ``init(key, shape, dtype=dtype) -> Array``.

    References:
      Glorot & Bengio, `Understanding the difficulty of training deep
      feedforward neural networks
      <https://proceedings.mlr.press/v9/glorot10a.html>`_, 2010.
    """
    gain = _checks.nonnegative("gain", gain)
    scale = _checks.nonnegative("scale", scale)
    return variance_scaling(
        scale * gain**2, "fan_avg", "uniform", in_axis, out_axis, batch_axis, dtype
    )


def _he_scale(nonlinearity: str, negative_slope: float, mode: str) -> float:
    """The exact gain² for the ``he_*`` builders, their arguments checked."""
    _checks.one_of("mode", mode, ("fan_in", "fan_out"))
    slope = _checks.real_number("negative_slope", negative_slope)
    if nonlinearity == "leaky_relu":
        return gain_squared(nonlinearity, slope)
    if slope != 0.0:
        raise ValueError(
            f"`negative_slope` (={negative_slope!r}) is only used with "
            f"nonlinearity='leaky_relu', got nonlinearity={nonlinearity!r}."
        )
    return gain_squared(nonlinearity)


@_core.builder
def he_normal(
    nonlinearity: str = "relu",
    negative_slope: float = 0.0,
    mode: Literal["fan_in", "fan_out"] = "fan_in",
    *,
    distribution: Literal["normal", "truncated_normal"] = "normal",
    in_axis: Axes = -2,
    out_axis: Axes = -1,
    batch_axis: Axes = (),
    dtype: jnp.dtype | None = None,
) -> _core.Initializer:
    r"""He (Kaiming) normal: :math:`\mathcal{N}(0, \text{gain}^2 / \text{fan})`.

    .. math::
      \sigma = \frac{\text{gain}}{\sqrt{\text{fan}}}, \qquad
      \text{gain} = \texttt{calculate\_gain}(\text{nonlinearity},
      \text{negative\_slope})

    For ReLU, :math:`\sigma = \sqrt{2/\text{fan\_in}}`. ``mode="fan_in"``
    keeps the variance of the activations constant through the forward pass,
    ``mode="fan_out"`` that of the gradients through the backward pass. As in
    PyTorch's ``kaiming_normal_``, ``negative_slope`` is the slope ``a`` of a
    ``"leaky_relu"`` (0 gives ReLU's gain) and the draw is a plain normal;
    ``jax.nn.initializers.he_normal`` draws from a truncated normal
    (``distribution="truncated_normal"`` here).

    Args:
      nonlinearity: the nonlinearity after the layer, a name accepted by
        :func:`calculate_gain`.
      negative_slope: the slope of ``"leaky_relu"`` on negative inputs; must
        be 0 for other nonlinearities.
      mode: ``"fan_in"`` or ``"fan_out"``.
      distribution: ``"normal"`` or ``"truncated_normal"``.
      in_axis, out_axis, batch_axis, dtype: as in :func:`variance_scaling`.

    Returns:
      An initializer ``init(key, shape, dtype=dtype) -> Array``.

    References:
      He et al., `Delving Deep into Rectifiers: Surpassing Human-Level
      Performance on ImageNet Classification
      <https://arxiv.org/abs/1502.01852>`_, 2015.
    """
    scale = _he_scale(nonlinearity, negative_slope, mode)
    _checks.one_of("distribution", distribution, _NORMALS)
    return variance_scaling(
        scale, mode, distribution, in_axis, out_axis, batch_axis, dtype
    )


@_core.builder
def he_uniform(
    nonlinearity: str = "relu",
    negative_slope: float = 0.0,
    mode: Literal["fan_in", "fan_out"] = "fan_in",
    *,
    in_axis: Axes = -2,
    out_axis: Axes = -1,
    batch_axis: Axes = (),
    dtype: jnp.dtype | None = None,
) -> _core.Initializer:
    r"""He (Kaiming) uniform: :math:`\mathcal{U}(-b, b)`.

    .. math::
      b = \text{gain} \cdot \sqrt{\frac{3}{\text{fan}}}

    so that the variance is :math:`\text{gain}^2/\text{fan}` as in
    :func:`he_normal`; for ReLU, :math:`b = \sqrt{6/\text{fan\_in}}`.

    Args:
      nonlinearity, negative_slope, mode: as in :func:`he_normal`.
      in_axis, out_axis, batch_axis, dtype: as in :func:`variance_scaling`.

    Returns:
      An initializer ``init(key, shape, dtype=dtype) -> Array``.

    References:
      He et al., `Delving Deep into Rectifiers: Surpassing Human-Level
      Performance on ImageNet Classification
      <https://arxiv.org/abs/1502.01852>`_, 2015.
    """
    scale = _he_scale(nonlinearity, negative_slope, mode)
    return variance_scaling(
        scale, mode, "uniform", in_axis, out_axis, batch_axis, dtype
    )


@_core.builder
def lecun_normal(
    *,
    distribution: Literal["normal", "truncated_normal"] = "normal",
    in_axis: Axes = -2,
    out_axis: Axes = -1,
    batch_axis: Axes = (),
    dtype: jnp.dtype | None = None,
) -> _core.Initializer:
    r"""LeCun normal: :math:`\mathcal{N}(0, 1/\text{fan\_in})`.

    The initialization self-normalizing (SELU) networks assume. A plain normal
    by default; ``jax.nn.initializers.lecun_normal`` (Flax's default kernel
    initializer) draws from a truncated normal
    (``distribution="truncated_normal"`` here).

    Args:
      distribution: ``"normal"`` or ``"truncated_normal"``.
      in_axis, out_axis, batch_axis, dtype: as in :func:`variance_scaling`.

    Returns:
      An initializer ``init(key, shape, dtype=dtype) -> Array``.

    References:
      LeCun et al., `Efficient BackProp
      <https://doi.org/10.1007/3-540-49430-8_2>`_, 1998; Klambauer et al.,
      `Self-Normalizing Neural Networks <https://arxiv.org/abs/1706.02515>`_,
      2017.
    """
    _checks.one_of("distribution", distribution, _NORMALS)
    return variance_scaling(
        1.0, "fan_in", distribution, in_axis, out_axis, batch_axis, dtype
    )


@_core.builder
def lecun_uniform(
    *,
    in_axis: Axes = -2,
    out_axis: Axes = -1,
    batch_axis: Axes = (),
    dtype: jnp.dtype | None = None,
) -> _core.Initializer:
    r"""LeCun uniform: :math:`\mathcal{U}(-b, b)`, :math:`b = \sqrt{3/\text{fan\_in}}`.

    Variance :math:`1/\text{fan\_in}`, as :func:`lecun_normal`.

    Args:
      in_axis, out_axis, batch_axis, dtype: as in :func:`variance_scaling`.

    Returns:
      An initializer ``init(key, shape, dtype=dtype) -> Array``.

    References:
      LeCun et al., `Efficient BackProp
      <https://doi.org/10.1007/3-540-49430-8_2>`_, 1998.
    """
    return variance_scaling(
        1.0, "fan_in", "uniform", in_axis, out_axis, batch_axis, dtype
    )


xavier_normal = glorot_normal
xavier_uniform = glorot_uniform
kaiming_normal = he_normal
kaiming_uniform = he_uniform
