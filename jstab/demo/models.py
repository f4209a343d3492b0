"""The demo's networks: a deep MLP and recurrent networks, in Flax Linen.

Every layer is a Flax ``Dense`` (or a Flax recurrent cell), so that
:func:`jstab.signal_propagation` sees them and :func:`jstab.lsuv` can
rescale them. The recurrent network can unroll its time loop in Python
(``unroll=True``), for the diagnostics: a layer inside a ``scan`` cannot be
seen from outside it.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from jstab import init as jinit

Activation = Callable[[chex.Array], chex.Array]


class MLP(nn.Module):
    """A deep fully connected classifier.

    ``depth`` Dense layers in all: one from the input to ``width`` units,
    ``depth - 2`` hidden ones of ``width`` units, and the ``classes``-way
    head. Plain, a hidden layer is ``h ← act(Dense(h))`` (with
    ``BatchNorm`` between the two when ``batch_norm``); residual, it is the
    pre-activation block ``h ← h + Dense(act(h)) / √(depth - 2)`` (He et
    al., 2016, "Identity mappings in deep residual networks"). The branches'
    scale keeps the variance of ``h`` from doubling at every block: with
    He-initialized kernels it grows by ``(1 + 1/(depth - 2))`` per block, at
    most ``e`` over the whole depth (Hanin & Rolnick, 2018, "How to start
    training"; De & Smith, 2020, "SkipInit"). Without it, 18 blocks multiply
    the output's scale by about ``2^9``.

    Attributes:
      depth: the number of Dense layers, ≥ 2.
      width: the units of every hidden layer.
      classes: the outputs of the head.
      activation: the nonlinearity (``nn.relu``, ``nn.tanh``, ``nn.sigmoid``).
      kernel_init: the initializer of every kernel.
      residual: whether hidden layers are residual blocks.
      batch_norm: whether hidden layers normalize their Dense output over
        the batch (Ioffe & Szegedy, 2015).
    """

    depth: int = 20
    width: int = 64
    classes: int = 10
    activation: Activation = nn.relu
    kernel_init: jinit.Initializer = jinit.he_normal()
    residual: bool = False
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x: chex.Array, train: bool = False) -> chex.Array:
        dense = lambda n: nn.Dense(n, kernel_init=self.kernel_init)  # noqa: E731
        h = dense(self.width)(x)
        scale = (self.depth - 2) ** -0.5 if self.depth > 2 else 1.0
        for _ in range(self.depth - 2):
            if self.residual:
                h = h + scale * dense(self.width)(self.activation(h))
                continue
            h = self.activation(h)
            h = dense(self.width)(h)
            if self.batch_norm:
                h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
        return dense(self.classes)(self.activation(h))


class RecurrentRegressor(nn.Module):
    """A recurrent network reading a sequence, then one linear output.

    The cell runs over the ``length`` steps of ``x`` (shape
    ``(batch, length, features)``) from a zero state; the head reads its
    last output. With ``unroll`` the time loop is a Python loop, one call of
    the cell per step, which :func:`jstab.signal_propagation` can see into;
    without it the loop is an ``nn.scan``, which compiles and runs many times
    faster. Both have the same parameters and compute the same function.

    Attributes:
      cell: a Flax recurrent cell (``nn.SimpleCell``, ``nn.LSTMCell``,
        ``nn.GRUCell``, ...).
      unroll: whether to unroll the time loop.
    """

    cell: nn.RNNCellBase
    unroll: bool = False

    @nn.compact
    def __call__(self, x: chex.Array, train: bool = False) -> chex.Array:
        del train  # no batch statistics
        # Flax cells start from zeros (their default carry_init): the key
        # is not used.
        carry = self.cell.initialize_carry(jax.random.key(0), x[:, 0].shape)
        if self.unroll:
            for t in range(x.shape[1]):
                carry, y = self.cell(carry, x[:, t])
        else:
            scan = nn.scan(
                lambda cell, c, xt: cell(c, xt),
                variable_broadcast="params",
                split_rngs={"params": False},
                in_axes=1,
                out_axes=1,
            )
            carry, ys = scan(self.cell, carry, x)
            y = ys[:, -1]
        return jnp.squeeze(nn.Dense(1, name="head")(y), -1)
