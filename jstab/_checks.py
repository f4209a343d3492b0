"""Argument checks shared by the public builders.

Every check runs on static (Python) values when a builder is called, so that
a bad argument fails at construction with a message naming the argument, the
value received and what was expected.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def real_number(name: str, value: object) -> float:
    """Returns ``value`` as a finite float, or raises naming ``name``.

    Accepts Python and NumPy reals and concrete 0-d arrays (NumPy or JAX, e.g.
    ``jnp.sqrt(2.0)``); a traced value cannot be a static argument.
    """
    if isinstance(value, bool | np.bool_) or isinstance(value, str | bytes):
        raise TypeError(f"`{name}` must be a real number, got {value!r}.")
    shape = getattr(value, "shape", None)
    if shape is not None and shape != ():
        raise TypeError(f"`{name}` must be a scalar, got an array of shape {shape}.")
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"`{name}` must be a concrete number, got a traced value {value!r}; "
            "build the initializer outside of jax.jit."
        )
    if not isinstance(value, numbers.Real) and shape is None:
        raise TypeError(f"`{name}` must be a real number, got {value!r}.")
    try:
        result = float(value)  # type: ignore[arg-type]
    except TypeError as error:  # e.g. a complex 0-d array
        raise TypeError(f"`{name}` must be a real number, got {value!r}.") from error
    if not math.isfinite(result):
        raise ValueError(f"`{name}` must be finite, got {value!r}.")
    return result


def nonnegative(name: str, value: object) -> float:
    """Returns ``value`` as a float ≥ 0, or raises naming ``name``."""
    result = real_number(name, value)
    if result < 0:
        raise ValueError(f"`{name}` must be >= 0, got {value!r}.")
    return result


def positive(name: str, value: object) -> float:
    """Returns ``value`` as a float > 0, or raises naming ``name``."""
    result = real_number(name, value)
    if result <= 0:
        raise ValueError(f"`{name}` must be > 0, got {value!r}.")
    return result


def integer_at_least(name: str, value: object, low: int) -> int:
    """Returns ``value`` as an int ≥ ``low``, or raises naming ``name``.

    Accepts Python and NumPy integers and concrete 0-d integer arrays (what
    ``optax.inject_hyperparams`` passes); not bools.
    """
    dtype = getattr(value, "dtype", None)
    integral = isinstance(value, numbers.Integral) or (
        getattr(value, "shape", None) == () and np.issubdtype(dtype, np.integer)
    )
    if isinstance(value, bool | np.bool_) or not integral:
        raise TypeError(f"`{name}` must be an int, got {value!r}.")
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"`{name}` must be a concrete int, got a traced value.")
    result = int(value)  # type: ignore[call-overload]
    if result < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
    return result


def one_of(name: str, value: object, options: Sequence[str]) -> str:
    """Returns ``value`` if it is one of ``options``, or raises naming ``name``."""
    if value not in options:
        expected = ", ".join(repr(o) for o in options)
        raise ValueError(f"`{name}` must be one of {expected}; got {value!r}.")
    return value  # type: ignore[return-value]


def float_dtype(name: str, dtype: object) -> jnp.dtype | None:
    """Returns ``dtype`` as a floating-point ``jnp.dtype`` (``None`` passes).

    Raises:
      TypeError: ``dtype`` is not a dtype, or not a real floating-point one.
    """
    if dtype is None:
        return None
    try:
        result = jnp.dtype(dtype)
    except TypeError as error:
        raise TypeError(
            f"`{name}` must be a floating-point dtype, got {dtype!r}."
        ) from error
    if not jnp.issubdtype(result, jnp.floating):
        raise TypeError(
            f"`{name}` must be a floating-point dtype (float16, bfloat16, float32 "
            f"or float64), got {result.name}."
        )
    return result


def shape_tuple(shape: object) -> tuple[int, ...]:
    """Returns ``shape`` as a tuple of non-negative ints, or raises."""
    if isinstance(shape, numbers.Integral):
        shape = (shape,)
    try:
        dims = tuple(shape)  # type: ignore[call-overload]
    except TypeError as error:
        raise TypeError(
            f"`shape` must be a sequence of ints, got {shape!r}."
        ) from error
    for dim in dims:
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 0:
            raise TypeError(
                f"`shape` must be a sequence of non-negative ints, got {shape!r}."
            )
    return tuple(int(d) for d in dims)


def _difference(expected: object, got: object) -> str | None:
    """How ``got``'s tree differs from ``expected``'s (leaf paths), or None."""
    want, have = jax.tree.structure(expected), jax.tree.structure(got)
    if want == have:
        return None
    paths = [
        {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(t)}
        for t in (expected, got)
    ]
    missing, extra = sorted(paths[0] - paths[1]), sorted(paths[1] - paths[0])
    detail = "; ".join(
        f"{label} {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
        for label, items in (("missing:", missing), ("unexpected:", extra))
        if items
    )
    return detail or f"{want} against {have}"


def same_tree(name: str, expected: object, got: object) -> None:
    """Raises unless ``got`` has the tree structure of ``expected``.

    Called while a step is traced, by the transforms whose state holds a
    value per leaf: a gradient tree other than the one ``init`` saw would
    otherwise give each value to another leaf, or change the state's
    structure from one step to the next.
    """
    detail = _difference(expected, got)
    if detail is not None:
        raise ValueError(
            f"`{name}` was initialized for another tree than the `updates` it "
            f"got ({detail}). Call `init` with a tree of the same structure as "
            "the gradients."
        )


def same_shapes(name: str, expected: object, got: object, what: str) -> None:
    """Raises unless the leaves of ``got`` have the shapes of ``expected``'s."""
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(expected),
        jax.tree.leaves(got),
        strict=True,
    ):
        if np.shape(x) != np.shape(y):
            raise ValueError(
                f"`{name}`: the leaf at {jax.tree_util.keystr(path)} has shape "
                f"{np.shape(y)} in `{what}` and {np.shape(x)} in the updates."
            )


def params_like(name: str, updates: object, params: object) -> None:
    """Raises unless ``params`` were passed and have the tree and shapes of
    ``updates``: for the transforms that measure the parameters too."""
    if params is None:
        raise ValueError(
            f"{name} needs the parameters: call tx.update(updates, state, params)."
        )
    detail = _difference(updates, params)
    if detail is not None:
        raise ValueError(
            f"`{name}`: the `params` passed to update have another tree than "
            f"the updates ({detail}). Pass the parameters the updates are for."
        )
    same_shapes(name, updates, params, what="params")
