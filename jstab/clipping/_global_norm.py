"""Clipping by the norm of the whole gradient tree."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax

from jstab import _numerics
from jstab._numerics import AxisName, ClipState, ScalarOrSchedule


class ClipByGlobalNormState(ClipState):
    """The state of :func:`clip_by_global_norm`: the fields of :class:`ClipState`."""

    __slots__ = ()


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
    update keeps its direction (Pascanu et al., 2013). The rule of
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

    The same rule, as a function for hand-written loops, is
    :func:`clip_grad_norm`; the norm alone is :func:`global_norm`.

    Args:
      max_norm: the threshold θ: a float > 0, a scalar array, or an
        ``optax.Schedule`` of the step count. A run-time value (an array, a
        schedule's value) that is 0, negative or NaN counts as 0: the step
        is zeroed and counted as clipped, never reversed.
      ord: 2 or ``jnp.inf``. Under ``optax.inject_hyperparams`` it may be a
        traced array (both norms are then computed; pass
        ``static_args=("ord",)`` to avoid that).
      axis_name: inside ``shard_map``, the mesh axis name (or tuple of names)
        the gradient is split over; the norm is then combined with
        ``lax.psum`` / ``lax.pmax`` over it. Not needed under ``jax.jit``
        with sharded arrays, where the norm is global already.

    Returns:
      A :class:`optax.GradientTransformation` with a :class:`ClipByGlobalNormState`.

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
        out, norm, clipped = _clip(updates, max_norm, state.count, ord, axis_name)
        return out, _numerics.advance(state, norm, clipped)

    return optax.GradientTransformation(
        _numerics.scalar_init(ClipByGlobalNormState), update_fn
    )


def _clip(tree, max_norm, count, ord, axis_name):
    """The rule itself, shared by the transform and :func:`clip_grad_norm`.

    ``count`` is the step a schedule is evaluated at (``None`` for a number).
    """
    leaves, treedef = jax.tree.flatten(tree)
    norm = _numerics.global_norm(leaves, ord, axis_name)
    threshold = _numerics.resolve(max_norm, count, norm.dtype)
    out, clipped = _numerics.clip_to_norm(leaves, norm, threshold)
    return jax.tree.unflatten(treedef, out), norm, clipped


def _float_leaves(name: str, tree: chex.ArrayTree) -> chex.ArrayTree:
    """``tree`` with array-like leaves made arrays; raises on a non-float leaf."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = []
    for path, leaf in flat:
        x = leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            where = jax.tree_util.keystr(path) or "the root"
            raise TypeError(
                f"`{name}` must hold floating-point arrays; the leaf at {where} "
                f"has dtype {x.dtype}."
            )
        leaves.append(x)
    return jax.tree.unflatten(treedef, leaves)


def global_norm(
    tree: chex.ArrayTree, ord: float = 2, *, axis_name: AxisName = None
) -> chex.Array:
    r"""The norm of all the leaves of ``tree`` taken together.

    .. math::
      \lVert g \rVert = \Big(\sum_{\text{leaves}} \sum_i |g_i|^p\Big)^{1/p}

    with ``p = ord``. The norm :func:`clip_by_global_norm` measures and
    records, as a function for any training loop, with or without Optax.
    Unlike ``optax.tree.norm``, which squares in each leaf's dtype (a float16
    tree with an element above 256 has an infinite norm), bfloat16 and
    float16 leaves are accumulated in float32, and float32 trees as large as
    1e30 or as small as 1e-30 have a finite, accurate norm.

    Args:
      tree: a pytree of floating-point arrays (``None`` leaves are skipped).
      ord: 2 or ``jnp.inf`` (the largest ``|g_i|``).
      axis_name: inside ``shard_map``, the mesh axis name (or names) ``tree``
        is split over; the partial norms are then combined with ``lax.psum``
        / ``lax.pmax``. Not needed under ``jax.jit`` with sharded arrays.

    Returns:
      A scalar: float32 for trees of float32 and narrower leaves, float64
      if any leaf is float64; 0 for a tree without leaves.

    Example:
      >>> import jax.numpy as jnp, jstab
      >>> float(jstab.global_norm({"w": jnp.full(4, 300.0, jnp.float16)}))
      600.0
    """
    _numerics.static_ord(ord)
    leaves = jax.tree.leaves(_float_leaves("tree", tree))
    return _numerics.global_norm(leaves, ord, axis_name)


def clip_grad_norm(
    grads: chex.ArrayTree,
    max_norm: float | chex.Array,
    ord: float = 2,
    *,
    axis_name: AxisName = None,
) -> tuple[chex.ArrayTree, chex.Array]:
    r"""``grads`` scaled so that their global norm is at most ``max_norm``.

    .. math::
      g \leftarrow g \cdot \min\left(1, \frac{\theta}{\lVert g \rVert}\right)

    PyTorch's ``torch.nn.utils.clip_grad_norm_``, made pure: it returns the
    clipped gradient and the norm measured before clipping, for logging. The
    same code as :func:`clip_by_global_norm` (whose state records the same
    norm), so the two give the same bits: each leaf keeps its dtype, norms of
    half-precision leaves are accumulated in float32, and a gradient whose
    norm is at most ``max_norm`` comes back bit for bit unchanged. PyTorch
    adds 1e-6 to the norm; this does not, so the output norm is ``max_norm``
    to within rounding.

    Args:
      grads: a pytree of floating-point arrays.
      max_norm: the threshold θ, a float > 0 or a scalar array (traced under
        ``jax.jit`` if you like). An array is a run-time value, never
        checked: one that is 0, negative or NaN gives zero gradients, eager
        or jitted alike. For a schedule, use :func:`clip_by_global_norm`,
        which counts the steps.
      ord: 2 or ``jnp.inf``.
      axis_name: inside ``shard_map``, the mesh axis name (or names) the
        gradient is split over, as in :func:`global_norm`.

    Returns:
      ``(clipped_grads, norm)``, with ``norm`` as :func:`global_norm` gives
      it.

    Example:
      >>> import jax.numpy as jnp, jstab
      >>> g, norm = jstab.clip_grad_norm({"w": jnp.array([3.0, 4.0])}, 1.0)
      >>> g["w"].tolist(), float(norm)
      ([0.6000000238418579, 0.800000011920929], 5.0)
    """
    if callable(max_norm):
        raise TypeError(
            f"`max_norm` must be a float or a scalar array, got {max_norm!r}; "
            "for a schedule use jstab.clip_by_global_norm."
        )
    if isinstance(max_norm, jax.Array) and max_norm.shape != ():
        raise TypeError(
            f"`max_norm` must be a scalar, got an array of shape {max_norm.shape}."
        )
    _numerics.check_threshold("max_norm", max_norm)
    _numerics.static_ord(ord)
    grads = _float_leaves("grads", grads)
    out, norm, _ = _clip(grads, max_norm, None, ord, axis_name)
    return out, norm
