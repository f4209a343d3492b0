"""The demo's networks: a deep MLP, a deep CNN and recurrent networks, in Flax Linen.

Every layer is a Flax ``Dense`` or ``Conv`` (or a Flax recurrent cell), so that
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
      spectral_norm: whether every Dense layer, the head included, is
        wrapped in Flax's ``nn.SpectralNorm``: its kernel is divided by an
        estimate of its largest singular value, from one step of power
        iteration per call, kept in ``batch_stats`` (Miyato et al., 2018,
        "Spectral normalization for generative adversarial networks").
    """

    depth: int = 20
    width: int = 64
    classes: int = 10
    activation: Activation = nn.relu
    kernel_init: jinit.Initializer = jinit.he_normal()
    residual: bool = False
    batch_norm: bool = False
    spectral_norm: bool = False

    @nn.compact
    def __call__(self, x: chex.Array, train: bool = False) -> chex.Array:
        def dense(n: int) -> Callable[[chex.Array], chex.Array]:
            layer = nn.Dense(n, kernel_init=self.kernel_init)
            if not self.spectral_norm:
                return layer
            return lambda h: nn.SpectralNorm(layer)(h, update_stats=train)

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


class CNN(nn.Module):
    """A deep convolutional classifier of square one-channel images.

    The input is a batch of flattened images, ``(batch, side²)``, as the
    digits come; the network reshapes them to ``(batch, side, side, 1)``.
    ``depth`` 3×3 convolutions of stride 1 keep the 8×8 size (``SAME``
    padding): one from the image to ``channels`` maps and ``depth - 1`` of
    ``channels`` maps; then the maps are averaged over space and a Dense head
    gives the ``classes`` logits. Plain, a convolution after the first is
    ``h ← Conv(relu(h))`` (followed by ``BatchNorm`` when ``batch_norm``);
    residual, it is the pre-activation block
    ``h ← h + Conv(relu(h)) / √(depth - 1)``, as in :class:`MLP`.

    Attributes:
      depth: the number of convolutions, ≥ 1.
      channels: the feature maps of every convolution.
      classes: the outputs of the head.
      kernel_init: the initializer of every convolution's kernel.
      head_init: the initializer of the head's kernel (a Dense kernel, which
        :func:`jstab.delta_orthogonal` does not take).
      residual: whether the convolutions after the first are residual
        blocks.
      batch_norm: whether they normalize their output over the batch and
        the positions.
    """

    depth: int = 16
    channels: int = 16
    classes: int = 10
    kernel_init: jinit.Initializer = jinit.he_normal()
    head_init: jinit.Initializer = jinit.lecun_normal()
    residual: bool = False
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x: chex.Array, train: bool = False) -> chex.Array:
        side = round(x.shape[-1] ** 0.5)
        h = x.reshape(x.shape[0], side, side, 1)
        conv = lambda: nn.Conv(self.channels, (3, 3), kernel_init=self.kernel_init)  # noqa: E731
        h = conv()(h)
        scale = (self.depth - 1) ** -0.5 if self.depth > 1 else 1.0
        for _ in range(self.depth - 1):
            if self.residual:
                h = h + scale * conv()(nn.relu(h))
                continue
            h = conv()(nn.relu(h))
            if self.batch_norm:
                h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
        h = jnp.mean(nn.relu(h), axis=(1, 2))
        return nn.Dense(self.classes, kernel_init=self.head_init)(h)


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
