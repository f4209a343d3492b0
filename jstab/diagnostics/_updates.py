"""A pass-through transformation that watches the size of each update."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from jstab import _checks, _numerics
from jstab._numerics import AxisName


class MonitorUpdatesState(NamedTuple):
    """What :func:`monitor_updates` saw at the last step.

    Attributes:
      update_norms: a tree shaped like the parameters, of float32 scalars:
        each leaf's update L2 norm ‖u‖.
      param_norms: the same for the parameters the update applies to, ‖p‖.
      update_ratio: the same for ‖u‖ / ‖p‖, the relative size of the step;
        0 where the parameter is 0.
      global_update_norm: float32 scalar, the L2 norm of the whole update.
      global_param_norm: float32 scalar, the L2 norm of all the parameters.
    """

    update_norms: chex.ArrayTree
    param_norms: chex.ArrayTree
    update_ratio: chex.ArrayTree
    global_update_norm: chex.Array
    global_param_norm: chex.Array


def monitor_updates(*, axis_name: AxisName = None) -> optax.GradientTransformation:
    r"""Records the size of each layer's update relative to its parameters.

    .. math::
      r_k = \frac{\lVert u_k \rVert}{\lVert p_k \rVert}

    for each leaf :math:`k`, where :math:`u` is the update the optimizer
    produced and :math:`p` the parameters it will be added to (0 where
    :math:`\lVert p_k \rVert = 0`), with the norms of each and of the whole
    trees. Chain it after the optimizer, so that it sees the final update::

      optax.chain(optax.adam(1e-3), jstab.monitor_updates())

    and pass the parameters to ``update``. The updates pass through bit for
    bit unchanged and carry their gradient; what is recorded carries none.

    With an adaptive optimizer the update's size is set by the learning rate
    rather than by the gradient's, so the gradient norm can stay calm while
    the step grows: the relative update per layer is the number
    practitioners watch before a loss spike (levanter's ``watch``,
    big_vision's ``l2_updates``, paxml's per-variable norms). Around 1e-3
    per step is the usual healthy range for Adam (Karpathy's rule of thumb);
    a layer far above it is taking steps as large as its weights.
    :func:`statistics` gives the state as a flat dict, for a logger.

    Norms are accumulated in float32 for bfloat16 and float16 leaves. A leaf
    whose every square underflows (magnitudes below about 1e-19 in float32)
    has a norm of 0, as per-layer norms do everywhere in jstab.

    Args:
      axis_name: inside ``shard_map``, the mesh axis name (or names) the
        updates and parameters are split over; the norms cover all shards.

    Returns:
      A :class:`optax.GradientTransformation` with a
      :class:`MonitorUpdatesState`.

    Example:
      >>> import jax.numpy as jnp, optax, jstab
      >>> tx = optax.chain(optax.sgd(0.1), jstab.monitor_updates())
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> state = tx.init(params)
      >>> _, state = tx.update({"w": jnp.array([1.0, 0.0])}, state, params)
      >>> {k: round(v.item(), 4) for k, v in jstab.statistics(state).items()}
      ... # doctest: +NORMALIZE_WHITESPACE
      {'monitor_updates/update_norms/w': 0.1, 'monitor_updates/param_norms/w': 5.0,
       'monitor_updates/update_ratio/w': 0.02,
       'monitor_updates/global_update_norm': 0.1,
       'monitor_updates/global_param_norm': 5.0}

    References:
      Karpathy, `CS231n: neural networks part 3, "Ratio of weights:updates"
      <https://cs231n.github.io/neural-networks-3/#ratio>`_, 2015
    """

    def init_fn(params: optax.Params) -> MonitorUpdatesState:
        def zeros():
            return jax.tree.map(lambda _: jnp.zeros((), jnp.float32), params)

        return MonitorUpdatesState(
            update_norms=zeros(),
            param_norms=zeros(),
            update_ratio=zeros(),
            global_update_norm=jnp.zeros((), jnp.float32),
            global_param_norm=jnp.zeros((), jnp.float32),
        )

    def update_fn(updates, state, params=None):
        _checks.params_like("monitor_updates", updates, params)
        _checks.same_tree("monitor_updates", state.update_norms, updates)
        leaves, treedef = jax.tree.flatten(updates)
        weights = treedef.flatten_up_to(params)
        groups = [[i] for i in range(len(leaves))]

        def norms(xs):
            watched = _numerics.watch([jax.lax.stop_gradient(x) for x in xs])
            return _numerics.group_norms(watched, groups, 2, axis_name)

        u, p = norms(leaves), norms(weights)
        u32, p32 = u.astype(jnp.float32), p.astype(jnp.float32)
        ratio = jnp.where(p32 > 0, u32 / jnp.where(p32 > 0, p32, 1), 0)
        each_u, each_p, each_r = _numerics.unstack(u32, p32, ratio)
        new_state = MonitorUpdatesState(
            update_norms=jax.tree.unflatten(treedef, each_u),
            param_norms=jax.tree.unflatten(treedef, each_p),
            update_ratio=jax.tree.unflatten(treedef, each_r),
            global_update_norm=_numerics.combine_norms(u).astype(jnp.float32),
            global_param_norm=_numerics.combine_norms(p).astype(jnp.float32),
        )
        return updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)
