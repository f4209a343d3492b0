"""The state every clipping transform keeps: what it did, for logging."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from jstab import _numerics


class ClipState(NamedTuple):
    """What a clipping transform did at its last step.

    Read any field with ``optax.tree.get(opt_state, "norm")`` (or
    ``"clipped"``, ``"clip_count"``) wherever the transform sits in a chain.

    Attributes:
      norm: float32, the norm measured before clipping: a scalar for global
        rules, a tree of per-layer scalars for per-layer rules, the largest
        ``|g|`` for value rules.
      clipped: float32 scalar in [0, 1], the fraction of what the transform
        governs (the step, the layers, the units or the elements) that it
        clipped at the last step. Something is clipped only when its norm
        strictly exceeds the threshold.
      clip_count: int32 scalar, the number of steps in which it clipped
        anything.
      count: int32 scalar, the number of steps seen; schedules of the
        threshold are evaluated at it.
    """

    norm: chex.ArrayTree
    clipped: chex.Array
    clip_count: chex.Array
    count: chex.Array


def init(norm: chex.ArrayTree = None) -> ClipState:
    """The state before the first step: zeros, with ``norm`` shaped like it."""
    if norm is None:
        norm = jnp.zeros((), jnp.float32)
    return ClipState(
        norm=norm,
        clipped=jnp.zeros((), jnp.float32),
        clip_count=jnp.zeros((), jnp.int32),
        count=jnp.zeros((), jnp.int32),
    )


def init_scalar(params: optax.Params) -> ClipState:
    """The ``init`` of a rule whose ``norm`` is a scalar: params do not matter."""
    del params
    return init()


def advance(state: ClipState, norm: chex.ArrayTree, clipped: chex.Array) -> ClipState:
    """The state after a step that measured ``norm`` and clipped ``clipped``."""
    clipped = jnp.asarray(clipped).astype(jnp.float32)
    acted = clipped > 0
    return ClipState(
        norm=jax.tree.map(lambda n: n.astype(jnp.float32), norm),
        clipped=clipped,
        clip_count=jnp.where(
            acted, _numerics.safe_increment(state.clip_count), state.clip_count
        ),
        count=_numerics.safe_increment(state.count),
    )
