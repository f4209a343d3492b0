"""Clipping by the norm of the whole gradient tree."""

from __future__ import annotations

import jax
import optax

from jstab import _numerics
from jstab._numerics import AxisName, ScalarOrSchedule
from jstab.clipping import _state


def clip_by_global_norm(
    max_norm: ScalarOrSchedule, ord: float = 2, *, axis_name: AxisName = None
) -> optax.GradientTransformation:
    r"""Scales the whole gradient so that its norm is at most ``max_norm``.

    .. math::
      g \leftarrow g \cdot \min\left(1, \frac{\theta}{\lVert g \rVert}\right),
      \qquad \lVert g \rVert = \Big(\sum_{\text{leaves}} \sum_i |g_i|^p
      \Big)^{1/p}

    with ``p = ord`` (2, or ``jnp.inf`` for the largest ``|g_i|``). One
    factor for the whole model, so layers keep their relative sizes and the
    update keeps its direction (seed 000). The rule of
    ``torch.nn.utils.clip_grad_norm_`` and ``optax.clip_by_global_norm``,
    with these differences:

    * the state records ``norm`` (before clipping), ``clipped`` (1.0 if this
      step was scaled) and ``clip_count``;
    * norms of bfloat16/float16 leaves are accumulated in float32 (Optax
      squares in the leaf's dtype: float16 gradients above 256 give an
      infinite norm and are zeroed), and stay finite and accurate for
      float32 gradients as large as 1e30 or as small as 1e-30;
    * the gradient is multiplied by the factor, which is exactly 1 when
      ``norm <= max_norm`` (the gradient then comes out bit for bit
      unchanged), so XLA fuses the scaling into the optimizer's update
      instead of selecting between two copies.

    Args:
      max_norm: the threshold θ > 0: a float, a scalar array, or an
        ``optax.Schedule`` of the step count.
      ord: 2 or ``jnp.inf``. Under ``optax.inject_hyperparams`` it may be a
        traced array (both norms are then computed; pass
        ``static_args=("ord",)`` to avoid that).
      axis_name: inside ``shard_map``, the mesh axis name (or tuple of names)
        the gradient is split over; the norm is then combined with
        ``lax.psum`` / ``lax.pmax`` over it. Not needed under ``jax.jit``
        with sharded arrays, where the norm is global already.

    Returns:
      A :class:`optax.GradientTransformation` with a :class:`ClipState`.

    Example:
      >>> import jax.numpy as jnp, optax, jstab
      >>> tx = optax.chain(jstab.clip_by_global_norm(1.0), optax.sgd(1.0))
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> g, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
      >>> g["w"].tolist(), float(optax.tree.get(state, "norm"))
      ([-0.6000000238418579, -0.800000011920929], 5.0)

    References:
      Pascanu et al., `On the difficulty of training recurrent neural networks
      <https://arxiv.org/abs/1211.5063>`_, 2013
    """
    _numerics.check_threshold("max_norm", max_norm)
    _numerics.static_ord(ord)

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        norm = _numerics.global_norm(leaves, ord, axis_name)
        threshold = _numerics.resolve(max_norm, state.count, norm.dtype)
        out, clipped = _numerics.clip_to_norm(leaves, norm, threshold)
        return jax.tree.unflatten(treedef, out), _state.advance(state, norm, clipped)

    return optax.GradientTransformation(_state.init_scalar, update_fn)
