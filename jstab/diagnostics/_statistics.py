"""One flat dict of everything jstab's transforms recorded, for logging."""

from __future__ import annotations

from collections.abc import Iterator

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jstab import _numerics
from jstab._numerics import AxisName, ClipState
from jstab.clipping import (
    AdaGCState,
    AdaptiveGradClipState,
    AutoClipState,
    ClipByBlockRmsState,
    ClipByGlobalNormState,
    ClipByLayerNormState,
    ClipByRangeState,
    ClipByValueState,
    SkipState,
    ZClipState,
)
from jstab.diagnostics._monitor import MonitorState
from jstab.diagnostics._updates import MonitorUpdatesState
from jstab.optim import ScaleBySpamState
from jstab.precision import DynamicLossScaleState

_CLIP = ("norm", "clipped", "clip_count")

# Each jstab state: the rule that records it (the name its keys start with),
# and the fields reported. Bookkeeping (step counts, warm-up counts,
# AutoClip's history) is left out; a field "<x>std" is the square root of the
# state's "<x>var". A field that is None (an option left off) gives no key.
_RULES = {
    ClipByValueState: ("clip_by_value", _CLIP),
    ClipByRangeState: ("clip_by_range", _CLIP),
    ClipByGlobalNormState: ("clip_by_global_norm", _CLIP),
    ClipByLayerNormState: ("clip_by_layer_norm", _CLIP),
    ClipByBlockRmsState: ("clip_by_block_rms", _CLIP),
    AdaptiveGradClipState: ("adaptive_grad_clip", _CLIP),
    ClipState: ("clip", _CLIP),
    AutoClipState: ("autoclip", (*_CLIP, "threshold")),
    AdaGCState: ("adagc", (*_CLIP, "gamma")),
    ZClipState: ("zclip", (*_CLIP, "threshold", "spike", "mean", "std")),
    SkipState: (
        "skip_on_spike",
        ("skipped", "skip_count", "norm", "mean", "std")
        + ("loss", "loss_mean", "loss_std", "forced_count"),
    ),
    ScaleBySpamState: ("spam", ("spikes", "reset_count")),
    DynamicLossScaleState: ("dynamic_loss_scale", ("scale", "skipped", "skip_count")),
    MonitorState: (
        "monitor_gradients",
        ("global_norm", "nonfinite", "vanishing", "exploding", "layer_norms"),
    ),
    MonitorUpdatesState: (
        "monitor_updates",
        ("update_norms", "param_norms", "update_ratio")
        + ("global_update_norm", "global_param_norm"),
    ),
}

# Optax's states that hold moment trees: the name of the rule (its
# ``scale_by_*`` function without the prefix) and the trees.
_MOMENTS = {
    optax.ScaleByAdamState: ("adam", ("mu", "nu")),
    optax.ScaleByAmsgradState: ("amsgrad", ("mu", "nu", "nu_max")),
    optax.ScaleByLionState: ("lion", ("mu",)),
    optax.ScaleByRmsState: ("rms", ("nu",)),
    optax.ScaleByRStdDevState: ("stddev", ("mu", "nu")),
    optax.ScaleByBeliefState: ("belief", ("mu", "nu")),
    optax.ScaleByNovogradState: ("novograd", ("mu", "nu")),
    optax.ScaleByAdanState: ("adan", ("m", "v", "n")),
    optax.ScaleByRssState: ("rss", ("sum_of_squares",)),
    optax.ScaleByAdaDeltaState: ("adadelta", ("e_g", "e_x")),
    optax.ScaleBySM3State: ("sm3", ("mu", "nu")),
    optax.FactoredState: ("factored_rms", ("v_row", "v_col", "v")),
    optax.TraceState: ("trace", ("trace",)),
    optax.EmaState: ("ema", ("ema",)),
}


def _entry(node: object, table: dict) -> tuple[str, tuple[str, ...]] | None:
    """``(rule, fields)`` of ``node``'s state class (or a base), else None."""
    if not isinstance(node, tuple):
        return None
    return next((table[c] for c in type(node).__mro__ if c in table), None)


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


def _walk(tree, prefix: tuple[str, ...], table: dict) -> Iterator:
    """``(prefix, (rule, fields), state)`` for each state of ``table``, in order.

    The keys of dicts on the way down (``optax.named_chain``,
    ``optax.multi_transform``'s labels) extend the prefix; a wrapper's
    ``inner_state`` follows the wrapper, under the same prefix.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: _entry(x, table) is not None
    )
    for path, node in flat:
        entry = _entry(node, table)
        if entry is None:
            continue
        where = prefix + tuple(
            str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)
        )
        yield where, entry, node
        if hasattr(node, "inner_state"):
            yield from _walk(node.inner_state, where, table)


def _norm(tree, axis_name: AxisName) -> chex.Array:
    """The L2 norm of all of ``tree``'s arrays, in float32 (or float64)."""
    leaves = [_value(x) for x in jax.tree.leaves(tree, is_leaf=_is_variable)]
    leaves = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
    return jax.lax.stop_gradient(_numerics.global_norm(leaves, 2, axis_name))


def statistics(
    opt_state: optax.OptState, *, moments: bool = False, axis_name: AxisName = None
) -> dict[str, chex.Array]:
    """Every statistic jstab's transforms recorded, as one flat dict of scalars.

    Finds the state of every jstab transform anywhere in an Optax state:
    inside ``optax.chain``, ``optax.named_chain``, ``optax.inject_hyperparams``,
    ``optax.MultiSteps``, ``optax.masked``, ``optax.multi_transform``,
    :func:`skip_on_spike`, :func:`dynamic_loss_scale`, :func:`upcast`, and
    in the ``opt_state`` of a ``flax.nnx.Optimizer`` (whose arrays it takes
    out of their variables).

    Keys are ``"<rule>/<field>"``, where ``<rule>`` is the name of the
    transform that recorded the value:

    ========================  ===============================================
    ``clip_by_value``,        ``norm``, ``clipped``, ``clip_count``
    ``clip_by_range``,
    ``clip_by_global_norm``,
    ``clip_by_layer_norm``,
    ``clip_by_block_rms``,
    ``adaptive_grad_clip``
    ``autoclip``              ``norm``, ``clipped``, ``clip_count``,
                              ``threshold``
    ``adagc``                 ``norm``, ``clipped``, ``clip_count``,
                              ``gamma`` (per tensor)
    ``zclip``                 ``norm``, ``clipped``, ``clip_count``,
                              ``threshold``, ``spike``, ``mean``, ``std``
    ``skip_on_spike``         ``skipped``, ``skip_count``, ``norm``, ``mean``,
                              ``std``; with a loss test ``loss``,
                              ``loss_mean``, ``loss_std``; with
                              ``max_consecutive``, ``forced_count``
    ``spam``                  ``spikes``, ``reset_count``
    ``dynamic_loss_scale``    ``scale``, ``skipped``, ``skip_count``
    ``monitor_gradients``     ``global_norm``, ``nonfinite``, ``vanishing``,
                              ``exploding``, ``layer_norms``
    ``monitor_updates``       ``update_norms``, ``param_norms``,
                              ``update_ratio``, ``global_update_norm``,
                              ``global_param_norm``
    ========================  ===============================================

    ``std`` is the square root of the running variance ``var`` (and
    ``loss_std`` of ``loss_var``); step and
    warm-up counters and AutoClip's history are left out. A field holding a
    tree (per-layer norms) gives one key per leaf, its path joined by ``/``:
    gradients shaped like ``{"Dense_0": {"kernel": ...}}`` give
    ``"monitor_gradients/layer_norms/Dense_0/kernel"``.

    Keys are stable: they depend on a rule's name, not on its position, so
    adding, removing or reordering rules of other names never renames a
    key a dashboard tracks. The names of ``optax.named_chain`` (and the keys
    of any dict on the way down, such as ``optax.multi_transform``'s labels)
    prefix the keys: ``named_chain(("clip", clip_by_global_norm(1.0)), ...)``
    gives ``"clip/clip_by_global_norm/norm"``. Wrappers add no prefix: the
    rules inside :func:`skip_on_spike` or ``optax.MultiSteps`` are listed
    after it under their own names. When several rules under one prefix
    share a name, the first keeps it and later ones get ``_1``, ``_2``, ...
    in chain order.

    With ``moments=True``, the global L2 norm of every moment tree in
    Optax's own states is added, as ``"<rule>/<tree>_norm"``: ``adam/mu_norm``
    and ``adam/nu_norm`` (``ScaleByAdamState``, which ``optax.adam``,
    ``adamw``, ``lamb`` and others keep), ``trace/trace_norm`` (momentum),
    and likewise ``amsgrad``, ``lion``, ``rms``, ``stddev``, ``belief``,
    ``novograd``, ``adan``, ``rss`` (Adagrad), ``adadelta``, ``sm3``,
    ``factored_rms`` (Adafactor) and ``ema``. These are computed (a read of
    the moments); everything else is read from the state.

    Why not ``optax.tree.get(opt_state, "norm")``? It finds a field by its
    name alone, and raises as soon as two rules in the state record a
    ``norm`` (a clip inside a skip, a value clip before a norm clip); the
    keys here say which rule recorded what.

    Values are the arrays of the state, unchanged (``std`` and moment norms
    aside): float32 norms, int32 counts, bool flags. Nothing is moved to the
    host, so it can be called inside ``jax.jit`` and the dict returned from
    the step.

    Args:
      opt_state: an Optax state, or any pytree holding some.
      moments: also report the norms of Optax's moment trees.
      axis_name: inside ``shard_map``, the mesh axis name (or names) the
        moments are split over, so that their norms are global. The
        transforms' own statistics are global already.

    Returns:
      A dict from key to scalar array, in the order the states are met
      (a dict returned from ``jax.jit`` comes back with its keys sorted);
      empty when ``opt_state`` holds no state it knows.

    Example:
      >>> import jax.numpy as jnp, optax, jstab
      >>> tx = optax.chain(jstab.clip_by_global_norm(1.0), optax.sgd(0.1))
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
      >>> {k: v.item() for k, v in jstab.statistics(state).items()}
      ... # doctest: +NORMALIZE_WHITESPACE
      {'clip_by_global_norm/norm': 5.0, 'clip_by_global_norm/clipped': 1.0,
       'clip_by_global_norm/clip_count': 1}
    """
    table = _RULES | _MOMENTS if moments else _RULES
    seen: list[str] = []
    out: dict[str, chex.Array] = {}
    for where, (rule, fields), node in _walk(opt_state, (), table):
        plain = "/".join((*where, rule))
        name = rule if plain not in seen else f"{rule}_{seen.count(plain)}"
        seen.append(plain)
        if _entry(node, _RULES) is None:  # an Optax state's moments
            for field in fields:
                key = "/".join((*where, name, f"{field}_norm"))
                out[key] = _norm(getattr(node, field), axis_name)
            continue
        for field in fields:
            if field.endswith("std"):
                var = getattr(node, field.removesuffix("std") + "var")
                value = None if var is None else jnp.sqrt(_value(var))
            else:
                value = getattr(node, field)
            flat, _ = jax.tree_util.tree_flatten_with_path(value, is_leaf=_is_variable)
            for path, leaf in flat:
                key = "/".join((*where, name, field, *map(_key, path)))
                out[key] = _value(leaf)
    return out
