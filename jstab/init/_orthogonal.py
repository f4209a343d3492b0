"""Orthogonal and delta-orthogonal initializers."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jstab import _checks
from jstab.init import _core


@_core.builder
def orthogonal(
    gain: float = 1.0, column_axis: int = -1, dtype: jnp.dtype | None = None
) -> _core.Initializer:
    r"""A (semi-)orthogonal matrix times ``gain``.

    The kernel is viewed as a matrix :math:`W` of shape
    :math:`(\prod_{a \ne c} d_a,\ d_c)`, ``c = column_axis`` (for a Flax
    convolution kernel ``(k_h, k_w, c_in, c_out)``: ``(k_h·k_w·c_in, c_out)``),
    drawn uniformly from the orthogonal matrices by the QR decomposition of a
    Gaussian matrix with the sign correction of Mezzadri (2007), so that

    .. math::
      W^\top W = \text{gain}^2 I \ \text{(tall)}, \qquad
      W W^\top = \text{gain}^2 I \ \text{(wide)}.

    Orthogonal weights preserve the norm of every vector in a linear network,
    so the gradient neither vanishes nor explodes with depth. The QR
    decomposition runs in float32 for bfloat16 and float16 requests (CPU has
    no half-precision QR) and the result is rounded once. Built on
    ``jax.nn.initializers.orthogonal``.

    Args:
      gain: multiplies the matrix, e.g. ``calculate_gain("relu")``; ≥ 0.
      column_axis: the axis whose entries index the orthonormal columns.
      dtype: the default dtype of the result.

    Returns:
      An initializer ``init(key, shape, dtype=dtype) -> Array``.

    References:
      Saxe et al., `Exact solutions to the nonlinear dynamics of learning in
      deep linear neural networks <https://arxiv.org/abs/1312.6120>`_, 2014.
    """
    gain = _checks.nonnegative("gain", gain)
    if isinstance(column_axis, bool) or not isinstance(column_axis, int):
        raise TypeError(f"`column_axis` must be an int, got {column_axis!r}.")

    def check(shape: tuple[int, ...]) -> None:
        if len(shape) < 2:
            raise ValueError(
                f"`shape` (={shape}) has rank {len(shape)}; `orthogonal` needs a "
                "weight of rank >= 2."
            )
        if not -len(shape) <= column_axis < len(shape):
            raise ValueError(
                f"`column_axis` (={column_axis}) is out of range for shape {shape}."
            )

    return _core.initializer(
        jax.nn.initializers.orthogonal,
        (gain, column_axis),
        dtype,
        f"orthogonal({gain})",
        check=check,
    )


@_core.builder
def delta_orthogonal(
    gain: float = 1.0, dtype: jnp.dtype | None = None
) -> _core.Initializer:
    r"""A convolution kernel that is orthogonal at its centre tap, zero elsewhere.

    For a Flax kernel ``(*spatial, c_in, c_out)`` with 1 to 3 spatial axes and
    ``c_in ≤ c_out``:

    .. math::
      W[\lfloor (k-1)/2 \rfloor, \ldots] = \text{gain} \cdot H, \quad
      H^\top H \text{ or } H H^\top = I, \qquad W = 0 \text{ at every other tap.}

    At initialization the convolution is then an orthogonal map on the
    channels at each position, which gives dynamical isometry: plain CNNs of
    10 000 layers train (Xiao et al.). Use odd kernel sizes so that the
    centre tap is centred. Built on ``jax.nn.initializers.delta_orthogonal``.

    Args:
      gain: multiplies the centre tap; ≥ 0.
      dtype: the default dtype of the result.

    Returns:
      An initializer ``init(key, shape, dtype=dtype) -> Array``.

    Raises:
      ValueError: when called with a shape of rank other than 3, 4 or 5, or
        with ``c_in > c_out`` (the centre tap could not be injective).

    References:
      Xiao et al., `Dynamical Isometry and a Mean Field Theory of CNNs: How to
      Train 10,000-Layer Vanilla Convolutional Neural Networks
      <https://arxiv.org/abs/1806.05393>`_, 2018.
    """
    gain = _checks.nonnegative("gain", gain)

    def check(shape: tuple[int, ...]) -> None:
        if len(shape) not in (3, 4, 5):
            raise ValueError(
                f"`shape` (={shape}) has rank {len(shape)}; `delta_orthogonal` needs "
                "a convolution kernel (*spatial, c_in, c_out) with 1 to 3 spatial axes."
            )
        if shape[-2] > shape[-1]:
            raise ValueError(
                f"`shape` (={shape}) has c_in={shape[-2]} > c_out={shape[-1]}; "
                "`delta_orthogonal` needs c_in <= c_out."
            )

    return _core.initializer(
        jax.nn.initializers.delta_orthogonal,
        (gain,),
        dtype,
        f"delta_orthogonal({gain})",
        check=check,
    )
