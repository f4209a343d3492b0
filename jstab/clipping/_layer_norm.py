"""Clipping each layer's gradient by its own norm."""

from __future__ import annotations

import typing
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from jax.tree_util import GetAttrKey, keystr

from jstab import _checks, _numerics
from jstab._numerics import AxisName, ClipState, ScalarOrSchedule


class ClipByLayerNormState(ClipState):
    """The state of :func:`clip_by_layer_norm`: the fields of :class:`ClipState`."""

    __slots__ = ()


Per = Literal["leaf", "module"]


def _module_of(path: tuple) -> str:
    """The path of the module owning a leaf: its path without the leaf's name.

    A trailing ``.value`` is Flax NNX's ``Variable`` wrapper, not a name.
    """
    if path and isinstance(path[-1], GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return keystr(tuple(path[:-1]), simple=True, separator="/")


def _layers(tree, per: Per):
    """``(leaves, groups, pack)``: ``pack(values)`` builds the norm tree."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [x for _, x in with_paths]
    if per == "leaf":
        groups = [[i] for i in range(len(leaves))]
        return leaves, groups, lambda values: jax.tree.unflatten(treedef, values)
    modules: dict[str, list[int]] = {}
    for i, (path, _) in enumerate(with_paths):
        modules.setdefault(_module_of(path), []).append(i)
    groups = list(modules.values())
    return leaves, groups, lambda values: dict(zip(modules, values, strict=True))


def clip_by_layer_norm(
    max_norm: ScalarOrSchedule,
    ord: float = 2,
    *,
    per: Per = "leaf",
    axis_name: AxisName = None,
) -> optax.GradientTransformation:
    r"""Scales each layer's gradient so that its norm is at most ``max_norm``.

    .. math::
      g_\ell \leftarrow g_\ell \cdot
      \min\left(1, \frac{\theta}{\lVert g_\ell \rVert}\right)
      \quad \text{for each layer } \ell

    Each layer is clipped by its own norm, as Keras's ``clipnorm`` clips
    each variable. Unlike :func:`clip_by_global_norm` it changes the
    relative sizes of the layers' updates: prefer the global rule unless one
    layer's spikes should not shrink the others' updates. A layer is a leaf
    of the gradient tree by default (``per="leaf"``, like
    ``optax.clip_by_block_rms`` with a norm instead of an RMS), or with
    ``per="module"`` all the leaves a Flax module owns directly (a Dense
    layer's ``kernel`` and ``bias`` together; in Linen and in NNX state
    alike).

    State: ``norm`` is a tree of float32 scalars, each layer's norm before
    clipping: shaped like the gradient for ``per="leaf"``, a dict from module
    path (``"params/Dense_0"``) to norm for ``per="module"``; ``clipped`` is
    the fraction of layers scaled. Norms are accumulated as in
    :func:`clip_by_global_norm`; below the threshold a layer comes out bit
    for bit unchanged.

    Args:
      max_norm: the threshold θ: a float > 0, a scalar array or a schedule.
        A run-time value that is 0, negative or NaN counts as 0 (every
        layer is zeroed and counted as clipped).
      ord: 2 or ``jnp.inf``.
      per: ``"leaf"`` or ``"module"``: what a layer is.
      axis_name: inside ``shard_map``, the mesh axis name (or names) every
        leaf is split over; each layer's norm is then combined with
        ``lax.psum`` / ``lax.pmax`` over it. Not needed under ``jax.jit``
        with sharded arrays.

    Returns:
      A :class:`optax.GradientTransformation` with a :class:`ClipByLayerNormState`.
    """
    _numerics.check_threshold("max_norm", max_norm)
    _numerics.static_ord(ord)
    _checks.one_of("per", per, typing.get_args(Per))

    def init_fn(params: optax.Params) -> ClipByLayerNormState:
        leaves, groups, pack = _layers(params, per)
        zeros = pack([jnp.zeros((), jnp.float32) for _ in groups])
        return _numerics.init_state(ClipByLayerNormState, zeros)

    def update_fn(updates, state, params=None):
        del params
        leaves, groups, pack = _layers(updates, per)
        _checks.same_tree("clip_by_layer_norm", state.norm, pack([0] * len(groups)))
        norms = _numerics.group_norms(leaves, groups, ord, axis_name)
        threshold = _numerics.threshold(max_norm, state.count, norms.dtype)
        factors = _numerics.factor(norms, threshold)
        each_norm, each_factor = _numerics.unstack(norms, factors)
        out = list(leaves)
        for factor, group in zip(each_factor, groups, strict=True):
            for i in group:
                out[i] = _numerics.scale(leaves[i], factor)
        over = jnp.sum(norms > threshold, dtype=jnp.int32)
        clipped = over.astype(jnp.float32) / len(groups) if groups else 0.0
        treedef = jax.tree.structure(updates)
        new_state = _numerics.advance(state, pack(each_norm), clipped)
        return jax.tree.unflatten(treedef, out), new_state

    return optax.GradientTransformation(init_fn, update_fn)
