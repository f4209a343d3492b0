"""One flat dict of everything jstab's transforms recorded, for logging."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jstab.clipping import AutoClipState, ClipState, SkipState, ZClipState
from jstab.diagnostics._monitor import MonitorState

# Each kind of state: the name its keys start with, and the fields reported.
# Bookkeeping (step counts, warm-up counts, AutoClip's history) is left out;
# "std" is the square root of the state's running variance ``var``.
_KINDS = {
    ClipState: ("clip", ("norm", "clipped", "clip_count")),
    AutoClipState: ("autoclip", ("norm", "clipped", "clip_count", "threshold")),
    ZClipState: (
        "zclip",
        ("norm", "clipped", "clip_count", "threshold", "spike", "mean", "std"),
    ),
    SkipState: ("skip_on_spike", ("skipped", "skip_count", "norm", "mean", "std")),
    MonitorState: (
        "monitor",
        ("global_norm", "nonfinite", "vanishing", "exploding", "layer_norms"),
    ),
}
_STATES = tuple(_KINDS)


def _is_state(x: object) -> bool:
    return isinstance(x, _STATES)


def _is_variable(x: object) -> bool:
    return isinstance(x, nnx.Variable)


def _value(x):
    """An array, taken out of the ``nnx.Variable`` NNX optimizers wrap it in."""
    return x[...] if _is_variable(x) else x


def _key(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _kind(node) -> tuple[str, tuple[str, ...]]:
    return next(v for t, v in _KINDS.items() if isinstance(node, t))


def _states(tree, found: list) -> list:
    """The jstab states in ``tree``, depth first; those a skip wraps follow it."""
    for node in jax.tree.leaves(tree, is_leaf=_is_state):
        if _is_state(node):
            found.append(node)
            if isinstance(node, SkipState):
                _states(node.inner_state, found)
    return found


def statistics(opt_state: optax.OptState) -> dict[str, chex.Array]:
    """Every statistic jstab's transforms recorded, as one flat dict of scalars.

    Finds the state of every jstab transform anywhere in an Optax state:
    inside ``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``,
    ``optax.masked``, ``optax.multi_transform``, :func:`skip_on_spike`, and in
    the ``opt_state`` of a ``flax.nnx.Optimizer`` (whose arrays it takes out
    of their variables). Keys are ``"<kind>/<field>"``, with these kinds and
    fields:

    =================  ==========================================================
    ``clip``           ``norm``, ``clipped``, ``clip_count`` (:class:`ClipState`:
                       clip_by_value, clip_by_range, clip_by_global_norm,
                       clip_by_layer_norm, adaptive_grad_clip)
    ``autoclip``       ``norm``, ``clipped``, ``clip_count``, ``threshold``
    ``zclip``          ``norm``, ``clipped``, ``clip_count``, ``threshold``,
                       ``spike``, ``mean``, ``std``
    ``skip_on_spike``  ``skipped``, ``skip_count``, ``norm``, ``mean``, ``std``
    ``monitor``        ``global_norm``, ``nonfinite``, ``vanishing``,
                       ``exploding``, ``layer_norms``
    =================  ==========================================================

    ``std`` is the square root of the running variance ``var``; step and
    warm-up counters and AutoClip's history are left out. A field holding a
    tree (the monitor's ``layer_norms``, a per-layer clip's ``norm``) gives
    one key per leaf, its path joined by ``/``: gradients shaped like
    ``{"Dense_0": {"kernel": ...}}`` give ``"monitor/layer_norms/Dense_0/
    kernel"``. When the state holds several transforms of one kind, their
    names get their position among them, in the order they are met (chain
    order): ``clip_0``, ``clip_1``. The states :func:`skip_on_spike` wraps
    are listed after it, under their own names.

    Values are the arrays of the state, unchanged (``std`` aside): float32
    norms, int32 counts, bool flags. Nothing is moved to the host, so it can
    be called inside ``jax.jit`` and the dict returned from the step.

    Args:
      opt_state: an Optax state, or any pytree holding some.

    Returns:
      A dict from key to scalar array, in the order the states are met;
      empty when ``opt_state`` holds no jstab state.

    Example:
      >>> import jax.numpy as jnp, optax, jstab
      >>> tx = optax.chain(jstab.clip_by_global_norm(1.0), optax.sgd(0.1))
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
      >>> {k: v.item() for k, v in jstab.statistics(state).items()}
      {'clip/norm': 5.0, 'clip/clipped': 1.0, 'clip/clip_count': 1}
    """
    states = _states(opt_state, [])
    kinds = [_kind(node)[0] for node in states]
    out: dict[str, chex.Array] = {}
    for i, (node, kind) in enumerate(zip(states, kinds, strict=True)):
        name = kind
        if kinds.count(kind) > 1:  # numbered by position among its kind
            name = f"{kind}_{kinds[:i].count(kind)}"
        for field in _kind(node)[1]:
            if field == "std":
                value = jnp.sqrt(_value(node.var))
            else:
                value = getattr(node, field)
            flat, _ = jax.tree_util.tree_flatten_with_path(value, is_leaf=_is_variable)
            for path, leaf in flat:
                key = "/".join([name, field, *map(_key, path)])
                out[key] = _value(leaf)
    return out
