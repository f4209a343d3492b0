"""Flax Linen modules: :class:`ResidualGate`."""

from __future__ import annotations

import chex
import jax.numpy as jnp
from flax import linen

from jstab import _gate

__all__ = ["ResidualGate"]


class ResidualGate(linen.Module):
    r"""A residual connection whose branch enters through a learned scalar gate.

    .. math::
      y = x + \alpha \, f(x),

    with :math:`\alpha` a float32 scalar parameter named ``alpha``,
    initialised to ``init_value``. At 0 (the default) every block starts as
    the identity, so a network of any depth starts as its input and
    embedding layers alone: the signal neither vanishes nor explodes at
    initialization, and each branch enters as training opens its gate
    (ReZero; SkipInit). With ``init_value=1.0`` it is Fixup's scalar
    multiplier. Flax has no such module. Computed in at least float32;
    the output keeps ``x``'s dtype. The NNX module is
    :class:`jstab.nnx.ResidualGate`.

    Attributes:
      init_value: the initial :math:`\alpha`, a finite real number.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from flax import linen as nn
      >>> import jstab
      >>> class Block(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         branch = nn.Dense(x.shape[-1])(nn.relu(nn.Dense(x.shape[-1])(x)))
      ...         return jstab.nn.ResidualGate()(x, branch)
      >>> x = jnp.ones((2, 4))
      >>> variables = Block().init(jax.random.key(0), x)
      >>> variables["params"]["ResidualGate_0"]["alpha"]
      Array(0., dtype=float32)
      >>> bool(jnp.all(Block().apply(variables, x) == x))  # the identity at first
      True

    References:
      Bachlechner et al., 2020, "ReZero is all you need: fast convergence at
      large depth", arXiv 2003.04887; De & Smith, 2020, "Batch normalization
      biases residual blocks towards the identity function in deep networks"
      (SkipInit), arXiv 2002.10444.
    """

    init_value: float = 0.0

    def __post_init__(self) -> None:
        _gate.init_value(self.init_value)
        super().__post_init__()

    @linen.compact
    def __call__(self, x: chex.Array, branch_output: chex.Array) -> chex.Array:
        """``x + alpha * branch_output``, in ``x``'s dtype.

        Args:
          x: the residual stream.
          branch_output: the branch's output, of ``x``'s shape.
        """
        # init_value was checked when the module was built (__post_init__).
        alpha = self.param(
            "alpha", lambda _key: jnp.asarray(self.init_value, jnp.float32)
        )
        return _gate.gate(x, alpha, branch_output)
