"""Gains per nonlinearity, with PyTorch's semantics."""

from __future__ import annotations

import math

from jstab import _checks

_UNIT_GAIN = (
    "linear",
    "identity",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "sigmoid",
)
NONLINEARITIES = (*_UNIT_GAIN, "tanh", "relu", "leaky_relu", "selu")


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    r"""Returns the recommended gain for a nonlinearity (PyTorch's table).

    ================= ==========================================
    nonlinearity      gain
    ================= ==========================================
    linear, identity  :math:`1`
    conv{1,2,3}d      :math:`1`
    conv_transpose*   :math:`1`
    sigmoid           :math:`1`
    tanh              :math:`5/3`
    relu              :math:`\sqrt{2}`
    leaky_relu        :math:`\sqrt{2 / (1 + a^2)}`, ``a = param``
    selu              :math:`3/4`
    ================= ==========================================

    The gain multiplies the standard deviation: ``he_normal`` draws with
    variance :math:`\text{gain}^2 / \text{fan}`. For ``selu`` the value 3/4 is
    PyTorch's, chosen to make self-normalisation hold in practice; use
    ``lecun_normal`` (gain 1) for the original SELU recipe.

    Args:
      nonlinearity: the name of the nonlinearity, as in the table.
      param: the negative slope ``a`` of ``leaky_relu``; ``None`` means 0.01,
        PyTorch's default. Not accepted for other nonlinearities.

    Returns:
      The gain, a Python float.

    Raises:
      ValueError: unknown ``nonlinearity``, or a ``param`` that is not a
        finite number or is given for a nonlinearity without one.

    References:
      He et al., `Delving Deep into Rectifiers
      <https://arxiv.org/abs/1502.01852>`_, 2015.
    """
    squared = gain_squared(nonlinearity, param)
    # 5/3 and 3/4 exactly, not the square roots of their rounded squares.
    return {"tanh": 5.0 / 3.0, "selu": 3.0 / 4.0}.get(nonlinearity, math.sqrt(squared))


def gain_squared(nonlinearity: str, param: float | None = None) -> float:
    """``calculate_gain(nonlinearity, param) ** 2``, computed without rounding.

    The variance of a fan-based initializer is the squared gain: for ReLU it
    is exactly 2, where ``math.sqrt(2) ** 2`` is 2.0000000000000004.
    """
    _checks.one_of("nonlinearity", nonlinearity, NONLINEARITIES)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else _slope(param)
        return 2.0 / (1.0 + slope**2)
    if param is not None:
        _reject_param(nonlinearity, param)
    return {"tanh": 25.0 / 9.0, "relu": 2.0, "selu": 9.0 / 16.0}.get(nonlinearity, 1.0)


def _slope(param: object) -> float:
    """``param`` as leaky_relu's slope; a ValueError otherwise, as in PyTorch."""
    try:
        return _checks.real_number("param", param)
    except TypeError as error:  # a bool, a string, an array of several values
        raise ValueError(str(error)) from None


def _reject_param(nonlinearity: str, param: object) -> None:
    raise ValueError(
        f"`param` (={param!r}) is only used with nonlinearity='leaky_relu', "
        f"got nonlinearity={nonlinearity!r}."
    )
