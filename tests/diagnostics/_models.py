"""Small Linen and NNX models the diagnostics tests are run on."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

Init = Callable | None


def activation(name: str) -> Callable:
    return {"relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh}[name]


class LinenMLP(nn.Module):
    """``depth`` Dense layers of ``width``, ``act`` between them (not after)."""

    depth: int = 4
    width: int = 32
    act: str = "relu"
    kernel: Init = None

    @nn.compact
    def __call__(self, x):
        kw = {} if self.kernel is None else {"kernel_init": self.kernel}
        for i in range(self.depth):
            x = nn.Dense(self.width, **kw)(x)
            if i < self.depth - 1:
                x = activation(self.act)(x)
        return x


class LinenCNN(nn.Module):
    """Three convolutions and a Dense head."""

    @nn.compact
    def __call__(self, x):
        for channels in (8, 16, 16):
            x = jax.nn.relu(nn.Conv(channels, (3, 3))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class NnxMLP(nnx.Module):
    """The NNX twin of :class:`LinenMLP`, its head defined before its body.

    Attribute (and state path) order is ``head``, ``layers``; call order is
    ``layers/0``, ..., ``head``.
    """

    def __init__(self, din, depth=4, width=32, act="relu", kernel=None, *, rngs):
        kw = {} if kernel is None else {"kernel_init": kernel}
        self.head = nnx.Linear(width, width, rngs=rngs, **kw)
        sizes = [din] + [width] * (depth - 1)
        self.layers = nnx.List(
            [nnx.Linear(a, width, rngs=rngs, **kw) for a in sizes[:-1]]
        )
        self.act = act

    def __call__(self, x):
        for layer in self.layers:
            x = activation(self.act)(layer(x))
        return self.head(x)


def batch(shape=(256, 32), seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


def nnx_training(tx, *, moments=False):
    """An :class:`NnxMLP`, an ``nnx.Optimizer`` of it with ``tx``, and a step.

    ``step()`` runs one ``nnx.jit`` update on a fixed batch and returns
    ``jstab.statistics`` of the optimizer's state, as a training loop would.
    """
    import jstab  # the models above do not need it

    model = NnxMLP(4, depth=2, width=8, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = batch((16, 4))

    @nnx.jit
    def train_step(model, optimizer):
        def loss(m):
            return jnp.mean(m(x) ** 2)

        optimizer.update(model, nnx.grad(loss)(model))
        return jstab.statistics(optimizer.opt_state, moments=moments)

    return model, optimizer, lambda: train_step(model, optimizer)
