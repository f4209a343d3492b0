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


class LinenBlock(nn.Module):
    """A residual block, ``x + Dense(relu(Dense(x)))``, shaped for ``nn.scan``."""

    width: int = 16

    @nn.compact
    def __call__(self, x, _=None):
        h = jax.nn.relu(nn.Dense(self.width)(x))
        return x + nn.Dense(self.width)(h), None


class LinenResidual(nn.Module):
    """An input projection, ``depth`` residual blocks and a head.

    The blocks run through ``nn.scan`` (one module ``blocks`` whose kernels
    are stacked over the blocks) unless ``unroll``: then a Python loop calls
    ``blocks_0``, ``blocks_1``, ...
    """

    depth: int = 6
    width: int = 16
    unroll: bool = False
    reverse: bool = False
    block: type = LinenBlock

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.width, name="proj")(x)
        if self.unroll:
            steps = range(self.depth)[:: -1 if self.reverse else 1]
            for i in steps:
                x, _ = self.block(self.width, name=f"blocks_{i}")(x)
        else:
            blocks = nn.scan(
                self.block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=self.depth,
                reverse=self.reverse,
            )
            x, _ = blocks(self.width, name="blocks")(x, None)
        return nn.Dense(1, name="head")(x)


def unstack_linen(params, depth):
    """The params of an unrolled :class:`LinenResidual` from a scanned one's."""
    out = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(depth):
        out[f"blocks_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["blocks"])
    return out


class NnxBlock(nnx.Module):
    """A residual block, ``x + linear2(relu(linear1(x)))``."""

    def __init__(self, width, *, rngs):
        self.linear1 = nnx.Linear(width, width, rngs=rngs)
        self.linear2 = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, x):
        return x + self.linear2(jax.nn.relu(self.linear1(x)))


@nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
def _run_blocks(x, block):
    return block(x)


class NnxResidual(nnx.Module):
    """The NNX twin of :class:`LinenResidual`, as Flax's "scan over layers".

    The blocks are created by ``nnx.vmap`` over split keys (one module
    ``blocks`` with stacked kernels) and run by ``nnx.scan``; with
    ``unroll``, ``blocks`` is a list called in a Python loop.
    """

    def __init__(self, din, depth=6, width=16, *, unroll=False, rngs):
        self.proj = nnx.Linear(din, width, rngs=rngs)
        if unroll:
            self.blocks = nnx.List([NnxBlock(width, rngs=rngs) for _ in range(depth)])
        else:

            @nnx.split_rngs(splits=depth)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def create(rngs):
                return NnxBlock(width, rngs=rngs)

            self.blocks = create(rngs)
        self.head = nnx.Linear(width, 1, rngs=rngs)
        self.unroll = unroll

    def __call__(self, x):
        x = self.proj(x)
        if self.unroll:
            for block in self.blocks:
                x = block(x)
        else:
            x = _run_blocks(x, self.blocks)
        return self.head(x)


def unstack_nnx(scanned, loop):
    """Gives the unrolled :class:`NnxResidual` ``loop`` the params of ``scanned``."""
    nnx.update(loop.proj, nnx.state(scanned.proj))
    nnx.update(loop.head, nnx.state(scanned.head))
    stacked = nnx.state(scanned.blocks)
    for i, block in enumerate(loop.blocks):
        nnx.update(block, jax.tree.map(lambda a, i=i: a[i], stacked))
