"""The initializer type and the wrapper every jstab initializer goes through."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Protocol

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jstab import _checks
from jstab._numerics import compute_dtype


class Initializer(Protocol):
    """``init(key, shape, dtype) -> Array``, as in ``jax.nn.initializers``."""

    def __call__(
        self, key: chex.PRNGKey, shape: chex.Shape, dtype: chex.ArrayDType | None = ...
    ) -> chex.Array: ...


Sampler = Callable[[chex.PRNGKey, tuple[int, ...], jnp.dtype], chex.Array]


def _is_key(value: object) -> bool:
    """Whether ``value`` looks like a PRNG key: typed, or legacy ``uint32[2]``."""
    if not isinstance(value, jax.Array | np.ndarray):
        return False
    dtype = value.dtype
    typed = jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    return typed or (dtype == np.uint32 and value.ndim >= 1)


def builder(build: Callable[..., Initializer]) -> Callable[..., Initializer]:
    """Marks ``build`` as a builder of initializers, which names its misuse.

    Flax calls ``kernel_init(key, shape, dtype)``. Passed the builder itself
    (``kernel_init=jstab.he_normal``, without the parentheses), the key would
    land in the builder's first argument and fail with a message about that
    argument; this says what happened instead.
    """

    @functools.wraps(build)
    def checked(*args, **kwargs):
        if args and _is_key(args[0]):
            name = build.__name__
            raise TypeError(
                f"`{name}` builds an initializer; it was called as one, with a "
                f"PRNG key. Call it first: `kernel_init=jstab.{name}()`, not "
                f"`kernel_init=jstab.{name}`."
            )
        return build(*args, **kwargs)

    return checked


def default_float_dtype() -> jnp.dtype:
    """float32, or float64 when ``jax_enable_x64`` is on (JAX's default)."""
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _draw(
    key: chex.PRNGKey,
    shape: tuple[int, ...],
    compute: jnp.dtype,
    out: jnp.dtype,
    build: Callable[..., Sampler],
    args: tuple,
) -> chex.Array:
    """``build(*args)(key, shape, compute)`` in ``out``, as one compiled program.

    Called eagerly (as NNX modules call their initializers), a draw would
    otherwise dispatch and compile each of its primitives separately; as one
    program, eight new bf16 shapes initialize 1.2-1.6x faster on a 2-core CPU
    (compiling the PRNG dominates both). ``build`` and ``args`` are static and
    compare by value, so every initializer built with the same arguments
    shares the compiled program of a shape and dtype.
    """
    return build(*args)(key, shape, compute).astype(out)


def initializer(
    build: Callable[..., Sampler],
    args: tuple,
    dtype: object,
    name: str,
    check: Callable[[tuple[int, ...]], object] | None = None,
) -> Initializer:
    """Wraps the sampler ``build(*args)`` into a checked initializer.

    ``build(*args)`` returns ``sample(key, shape, dtype)``, e.g.
    ``jax.nn.initializers.orthogonal(1.0)``; ``build`` is a module-level
    function and ``args`` hashable. The returned ``init(key, shape,
    dtype=dtype)`` checks ``dtype`` and ``shape`` (with ``check``, which raises
    on a shape the initializer cannot take), returns zeros for a shape with a
    zero-sized axis, draws in :func:`compute_dtype` and returns the requested
    dtype.
    """
    default = _checks.float_dtype("dtype", dtype)
    hash(args)  # fail here, not at the first call, if an argument is unhashable

    def init(
        key: chex.PRNGKey, shape: chex.Shape, dtype: chex.ArrayDType | None = default
    ) -> chex.Array:
        shape = _checks.shape_tuple(shape)
        out = _checks.float_dtype("dtype", dtype) or default_float_dtype()
        if check is not None:
            check(shape)
        if math.prod(shape) == 0:
            return jnp.zeros(shape, out)
        return _draw(key, shape, compute_dtype(out), out, build, args)

    init.__name__ = init.__qualname__ = name
    return init
