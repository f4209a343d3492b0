"""Half-precision parameters, an optimizer that runs in float32."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jstab import _checks, _wrappers


class UpcastState(NamedTuple):
    """The state of :func:`upcast`.

    Attributes:
      inner_state: the wrapped transformation's state, initialized from
        ``dtype`` copies of the half-precision parameters (so its moments
        are kept in ``dtype``).
    """

    inner_state: optax.OptState


def upcast(
    inner: optax.GradientTransformation | optax.MultiSteps,
    dtype: jnp.dtype = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
    r"""Runs ``inner`` in ``dtype`` on half-precision updates and parameters.

    Every floating leaf narrower than ``dtype`` (float16 and bfloat16, for
    the default float32) is cast to ``dtype`` before ``inner`` sees it, in
    the updates and in the parameters; ``inner``'s state is initialized
    from the cast parameters, so its moments live in ``dtype``; and each
    returned update is cast to its parameter's own dtype (to its incoming
    update's dtype when ``params`` is not given). Wider and non-floating
    leaves pass as they are.

    Adam-family optimizers on float16 parameters need it: in float16,
    ``eps = 1e-8`` rounds to 0 and a squared gradient below 6e-8 to 0, so
    a step whose gradient element is zero (a dead unit, a flushed gradient)
    computes :math:`0 / (\sqrt{0} + 0)` and writes NaN into the parameter
    (optax issue 1754). In float32, ``eps`` is kept and the update is 0.
    The moments cost ``dtype``'s memory, as in mixed-precision training
    with float32 optimizer state.

    Args:
      inner: the optimizer, e.g. ``optax.adam(1e-3)``: a
        ``GradientTransformation`` or an object with a
        ``gradient_transformation()`` method, such as ``optax.MultiSteps``.
      dtype: the floating dtype ``inner`` runs in.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with an
      :class:`UpcastState`; extra keyword arguments of ``update`` are passed
      on to ``inner``.

    Example:
      >>> import jax.numpy as jnp, optax, jstab
      >>> params = {"w": jnp.ones(2, jnp.float16)}
      >>> grads = {"w": jnp.zeros(2, jnp.float16)}
      >>> tx = optax.adam(1e-3)
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> updates["w"].tolist()  # 0 / (0 + eps), with eps rounded to 0
      [nan, nan]
      >>> tx = jstab.upcast(optax.adam(1e-3))
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> updates["w"].tolist(), updates["w"].dtype  # -lr * 0 / (0 + eps)
      ([-0.0, -0.0], dtype('float16'))

    References:
      Micikevicius et al., `Mixed Precision Training
      <https://arxiv.org/abs/1710.03740>`_, ICLR 2018 (float32 master
      weights and optimizer state)
    """
    inner = _wrappers.as_transformation(inner)
    wide = _checks.float_dtype("dtype", dtype)
    if wide is None:
        raise TypeError("`dtype` must be a floating-point dtype, got None.")

    def up(x):
        narrow = jnp.issubdtype(x.dtype, jnp.floating)
        return x.astype(wide) if narrow and x.dtype.itemsize < wide.itemsize else x

    def init_fn(params):
        return UpcastState(inner_state=inner.init(jax.tree.map(up, params)))

    def update_fn(updates, state, params=None, **extra_args):
        out, inner_state = inner.update(
            jax.tree.map(up, updates),
            state.inner_state,
            None if params is None else jax.tree.map(up, params),
            **extra_args,
        )
        like = updates if params is None else params
        out = jax.tree.map(lambda u, p: u.astype(p.dtype), out, like)
        return out, UpcastState(inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
