"""LSUV: layer-sequential unit-variance initialization (Mishkin & Matas, 2015)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, overload

import chex
import jax
import jax.numpy as jnp
from flax import linen, nnx

from jstab import _checks, _numerics
from jstab.diagnostics import _probe
from jstab.init import orthogonal


def _variances(found: _probe.Probe):
    """A jit-compiled ``params -> {layer: var of its outputs}``."""

    def measure(params):
        _, outs = found.apply(params)
        return {name: jnp.var(_probe.rows(calls)) for name, calls in outs.items()}

    return jax.jit(measure)


@overload
def lsuv(
    module: linen.Module, variables: Mapping, batch: Any, **kwargs: Any
) -> Any: ...


@overload
def lsuv(module: nnx.Module, batch: Any, **kwargs: Any) -> nnx.Module: ...


def lsuv(
    module: linen.Module | nnx.Module,
    *args: Any,
    key: chex.PRNGKey | None = None,
    tol: float = 0.1,
    max_iters: int = 10,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    r"""Orthogonal kernels rescaled layer by layer to unit output variance.

    ``lsuv(module, variables, batch)`` returns new Linen variables;
    ``lsuv(model, batch)`` returns a new NNX module. What was passed in is
    never changed. Every layer (a submodule owning a ``kernel``) first gets
    an orthogonal kernel (:func:`jstab.orthogonal`, one key per layer split
    from ``key``, in forward order); then, layer by layer in the order of
    their first call,

    .. math::
      W_\ell \leftarrow W_\ell / \sqrt{\operatorname{Var}(y_\ell)}
      \quad \text{until} \quad |\operatorname{Var}(y_\ell) - 1| \le
      \text{tol}

    or ``max_iters`` rescalings, where :math:`y_\ell` is the layer's output
    on ``batch`` (all its elements, before the nonlinearity). Biases are left
    as they are. A layer whose output has zero or non-finite variance cannot
    be rescaled: it is left with its orthogonal kernel and a warning names it.
    Layers called inside a transform of the model (a ``scan``, an ``RNN``)
    are left as they were, with a warning naming them: a kernel stacked
    over a scan's iterations would need each slice rescaled in turn.
    Each pass is one jit-compiled forward pass; the result is deterministic
    given ``key``.

    Args:
      module: a ``flax.linen.Module`` or a ``flax.nnx.Module``.
      *args: ``variables, batch`` (Linen) or ``batch`` (NNX).
      key: the PRNG key of the orthogonal kernels; ``jax.random.key(0)`` if
        ``None``.
      tol: the tolerance on each layer's output variance, > 0.
      max_iters: the most rescalings of a layer, ≥ 1.
      model_kwargs: keyword arguments of the call (see
        :func:`signal_propagation`).

    Returns:
      New variables (Linen) or a new module (NNX).

    References:
      Mishkin & Matas, `All you need is a good init
      <https://arxiv.org/abs/1511.06422>`_, ICLR 2016.
    """
    _checks.positive("tol", tol)
    max_iters = _checks.integer_at_least("max_iters", max_iters, 1)
    key = jax.random.key(0) if key is None else key
    variables, batch = _probe.arguments(module, args)
    found = _probe.probe(module, variables, batch, model_kwargs)
    variances = _variances(found)
    params = list(found.params)
    measured = variances(params)  # the first trace finds the layers' order
    found.warn_hidden("lsuv")
    layers = [name for name in found.order if name in measured]
    if not layers:
        raise TypeError("module: the forward pass called none of its layers")
    keys = jax.random.split(key, len(layers))
    for name, k in zip(layers, keys, strict=True):
        i = found.kernels[name]
        params[i] = orthogonal()(k, params[i].shape, params[i].dtype)
    for name in layers:
        i = found.kernels[name]
        for _ in range(max_iters):
            var = float(variances(params)[name])
            if not (math.isfinite(var) and var > 0):
                warnings.warn(
                    f"lsuv: the output of layer {name!r} has variance {var}; "
                    "its kernel was left orthogonal, not rescaled",
                    RuntimeWarning,
                    stacklevel=2,
                )
                break
            if abs(var - 1.0) <= tol:
                break
            kernel = params[i]
            wide = kernel.astype(_numerics.compute_dtype(kernel.dtype))
            params[i] = (wide / math.sqrt(var)).astype(kernel.dtype)
    return found.rebuild(params)
