"""Flax NNX modules: :class:`ResidualGate`."""

from __future__ import annotations

import chex
import jax.numpy as jnp
from flax import nnx

from jstab import _gate

__all__ = ["ResidualGate"]


class ResidualGate(nnx.Module):
    r"""A residual connection whose branch enters through a learned scalar gate.

    .. math::
      y = x + \alpha \, f(x),

    with :math:`\alpha` a float32 scalar ``nnx.Param`` named ``alpha``,
    initialised to ``init_value``: the NNX form of
    :class:`jstab.nn.ResidualGate` (ReZero; SkipInit), which says why a gate
    at 0 keeps a network of any depth trainable. It draws nothing, so it
    takes no ``rngs``; created under ``nnx.vmap`` for blocks run by
    ``nnx.scan``, ``alpha`` gets the blocks' leading axis. Computed in at
    least float32; the output keeps ``x``'s dtype.

    Args:
      init_value: the initial :math:`\alpha`, a finite real number.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jstab
      >>> class Block(nnx.Module):
      ...     def __init__(self, width, rngs):
      ...         self.up = nnx.Linear(width, width, rngs=rngs)
      ...         self.down = nnx.Linear(width, width, rngs=rngs)
      ...         self.gate = jstab.nnx.ResidualGate()
      ...     def __call__(self, x):
      ...         return self.gate(x, self.down(nnx.relu(self.up(x))))
      >>> block = Block(4, nnx.Rngs(0))
      >>> block.gate.alpha[...]
      Array(0., dtype=float32)
      >>> x = jnp.ones((2, 4))
      >>> bool(jnp.all(block(x) == x))  # the identity at first
      True

    References:
      Bachlechner et al., 2020, "ReZero is all you need: fast convergence at
      large depth", arXiv 2003.04887; De & Smith, 2020, "Batch normalization
      biases residual blocks towards the identity function in deep networks"
      (SkipInit), arXiv 2002.10444.
    """

    def __init__(self, init_value: float = 0.0):
        self.alpha = nnx.Param(jnp.asarray(_gate.init_value(init_value), jnp.float32))

    def __call__(self, x: chex.Array, branch_output: chex.Array) -> chex.Array:
        """``x + alpha * branch_output``, in ``x``'s dtype.

        Args:
          x: the residual stream.
          branch_output: the branch's output, of ``x``'s shape.
        """
        return _gate.gate(x, self.alpha[...], branch_output)
