"""A Flax model opened up: its layers, in the order the forward pass calls them.

A *layer* is a submodule that owns a ``kernel`` parameter. :func:`probe`
turns a Linen module with its variables, or an NNX module, into a
:class:`Probe`: the trainable parameters as a flat list of arrays, a
traceable ``apply(params)`` returning the model's output and every call's
output of every layer, and ``rebuild(params)`` giving new variables (Linen)
or a new module (NNX). Nothing the user passed is changed.

Linen: outputs are collected with ``capture_intermediates`` and the call
order with ``nn.intercept_methods``. NNX has no interceptor; a throwaway
module is merged from the split state inside ``apply`` and its layers are
given a subclass that records each call, so the user's module and classes
are never touched (``nnx.capture(method_outputs=...)`` patches the classes
themselves and keeps no order).
"""

from __future__ import annotations

import contextvars
import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.core import meta

from jstab import _numerics

Path = tuple[Any, ...]
Outputs = dict[str, list[chex.Array]]


@dataclasses.dataclass
class Probe:
    """A model seen as a function of its flat trainable parameters.

    Attributes:
      params: every trainable parameter, a flat list of arrays.
      kernels: ``{layer name: index of its kernel in params}``, unordered.
      apply: ``apply(params) -> (output, {layer name: [output of each call]})``,
        traceable; tracing it fills ``order``.
      order: the names of the layers called, in the order of their first call.
      rebuild: ``rebuild(params)``: new Linen variables or a new NNX module.
      hidden: the layers called inside a JAX transform of the model (a
        ``scan``, an ``RNN``), whose outputs cannot be seen from outside it;
        filled by tracing ``apply``.
    """

    params: list[chex.Array]
    kernels: dict[str, int]
    apply: Callable[[list[chex.Array]], tuple[Any, Outputs]]
    order: list[str]
    rebuild: Callable[[list[chex.Array]], Any]
    hidden: list[str] = dataclasses.field(default_factory=list)

    def warn_hidden(self, what: str) -> None:
        """Warns that ``what`` leaves out the :attr:`hidden` layers."""
        if self.hidden:
            warnings.warn(
                f"{what}: layers called inside a transform of the model (a scan, "
                f"an RNN) cannot be seen and are left out: {', '.join(self.hidden)}. "
                "Call them in a Python loop to include them.",
                RuntimeWarning,
                stacklevel=3,
            )


def _name(path: Path) -> str:
    return "/".join(str(p) for p in path)


def _kernels(paths: list[Path]) -> dict[str, int]:
    return {
        _name(p[:-1]): i
        for i, p in enumerate(paths)
        if len(p) > 1 and p[-1] == "kernel"
    }


def rows(calls: list[chex.Array]) -> chex.Array:
    """A layer's outputs over all its calls as ``(positions, units)``, wide.

    Units are the last axis (a Dense layer's features, a convolution's
    channels); every other axis, and every call, is a position. If calls
    disagree on the number of units, only the first call is kept. Rows are
    in at least float32.
    """
    for x in calls:
        if not isinstance(x, jax.Array):
            raise TypeError(
                f"a layer returned a {type(x).__name__}; jstab's diagnostics "
                "need layers (modules owning a 'kernel') that return one array"
            )
    if len({x.shape[-1:] for x in calls}) > 1:
        calls = calls[:1]
    units = calls[0].shape[-1] if calls[0].ndim else 1
    wide = _numerics.compute_dtype(calls[0].dtype)
    return jnp.concatenate([x.reshape(-1, units).astype(wide) for x in calls])


def probe(module: Any, variables: Any, batch: Any, kwargs: Mapping | None) -> Probe:
    """The :class:`Probe` of a Linen ``module`` (with ``variables``) or an NNX one.

    Raises:
      TypeError: ``module`` is neither, or owns no layer.
    """
    kwargs = dict(kwargs or {})
    if isinstance(module, nnx.Module):
        found = _nnx(module, batch, kwargs)
    elif isinstance(module, nn.Module):
        found = _linen(module, variables, batch, kwargs)
    else:
        raise TypeError(
            "module: expected a flax.linen.Module or a flax.nnx.Module, got "
            f"{type(module).__name__}"
        )
    if not found.kernels:
        raise TypeError(
            f"module: {type(module).__name__} has no layer (no submodule owns a "
            "'kernel' parameter)"
        )
    return found


def arguments(module: Any, args: tuple) -> tuple[Any, Any]:
    """``(variables, batch)`` from ``args``, as ``module``'s kind expects."""
    nnx_module = isinstance(module, nnx.Module)
    expected = ("batch",) if nnx_module else ("variables", "batch")
    if len(args) != len(expected):
        kind = "an NNX module" if nnx_module else "a Linen module"
        raise TypeError(
            f"for {kind} pass {', '.join(('module', *expected))}; got "
            f"{1 + len(args)} positional arguments"
        )
    return (None, args[0]) if nnx_module else (args[0], args[1])


def _linen(module: nn.Module, variables: Any, batch: Any, kwargs: dict) -> Probe:
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError(
            "variables: expected the Linen variables {'params': ...} of module, "
            f"got {type(variables).__name__}"
        )
    # Intermediates captured before would be mixed with this pass's.
    boxed = {k: v for k, v in variables.items() if k != "intermediates"}
    plain = meta.unbox(boxed)
    flat_boxed, treedef = jax.tree_util.tree_flatten_with_path(
        boxed["params"], is_leaf=lambda x: isinstance(x, meta.AxisMetadata)
    )
    paths = [tuple(k.key for k in path) for path, _ in flat_boxed]
    params = jax.tree.leaves(plain["params"])
    kernels = _kernels(paths)
    layers = {paths[i][:-1]: name for name, i in kernels.items()}
    order: list[str] = []

    def intercept(next_fun, args, kw, context):
        name = layers.get(tuple(context.module.path))
        if context.method_name == "__call__" and name and name not in order:
            order.append(name)
        return next_fun(*args, **kw)

    def capture(mdl: nn.Module, method: str) -> bool:
        return method == "__call__" and tuple(mdl.path) in layers

    def apply(flat):
        tree = jax.tree.unflatten(treedef, flat)
        with nn.intercept_methods(intercept):
            y, state = module.apply(
                {**plain, "params": tree},
                batch,
                capture_intermediates=capture,
                # Batch statistics may change in training mode; params may not.
                mutable=[c for c in plain if c != "params"] + ["intermediates"],
                **kwargs,
            )
        outs = {}
        for path, name in layers.items():
            node = state.get("intermediates", {})
            for key in path:
                node = node.get(key, {})
            if "__call__" in node:
                outs[name] = list(node["__call__"])
        found.hidden[:] = [name for name in order if name not in outs]
        return y, outs

    def rebuild(flat):
        new = [
            x.replace_boxed(v) if isinstance(x, meta.AxisMetadata) else v
            for v, (_, x) in zip(flat, flat_boxed, strict=True)
        ]
        out = {**variables, "params": jax.tree.unflatten(treedef, new)}
        return type(variables)(out) if type(variables) is not dict else out

    found = Probe(params, kernels, apply, order, rebuild)
    return found


_RECORDER: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "jstab_layer_recorder", default=None
)
_RECORDING: dict[type, type] = {}


def _recording(cls: type) -> type:
    """``cls`` with a ``__call__`` that reports to the active recorder."""
    if cls not in _RECORDING:

        def __call__(self, *args, **kwargs):
            record = _RECORDER.get()
            if record is not None:
                record(self, None)
            out = super(sub, self).__call__(*args, **kwargs)
            if record is not None:
                record(self, out)
            return out

        sub = type(cls.__name__, (cls,), {"__call__": __call__})
        sub.__module__ = cls.__module__
        sub.__qualname__ = cls.__qualname__
        _RECORDING[cls] = sub
    return _RECORDING[cls]


def _nnx_path(keys: tuple) -> Path:
    """A state leaf's key path as plain names, without ``Variable``'s ``.value``."""
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey):
        keys = keys[:-1]
    return tuple(getattr(k, "key", getattr(k, "idx", None)) for k in keys)


def _nnx(model: nnx.Module, batch: Any, kwargs: dict) -> Probe:
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    # split and merge share Variable objects with the model: every module
    # built here gets new ones, unflattened from the arrays.
    others, others_def = jax.tree.flatten(rest)
    flat_state, treedef = jax.tree_util.tree_flatten_with_path(state)
    paths = [_nnx_path(path) for path, _ in flat_state]
    params = [x for _, x in flat_state]
    kernels = _kernels(paths)
    layers = {paths[i][:-1]: name for name, i in kernels.items()}
    order: list[str] = []

    def rebuild(flat):
        params = jax.tree.unflatten(treedef, flat)
        return nnx.merge(graphdef, params, jax.tree.unflatten(others_def, others))

    def apply(flat):
        copy = rebuild(flat)
        names = {}
        for path, node in nnx.iter_graph(copy):
            name = layers.get(tuple(path))
            if name is not None and isinstance(node, nnx.Module):
                names[id(node)] = name
                node.__class__ = _recording(type(node))
        outs: Outputs = {}

        def record(layer, out):
            name = names.get(id(layer))
            if name is None:  # a copy made by an NNX transform inside the model
                hidden = f"a {type(layer).__name__}"
                if hidden not in found.hidden:
                    found.hidden.append(hidden)
                return
            if out is None:
                if name not in order:
                    order.append(name)
            else:
                outs.setdefault(name, []).append(out)

        token = _RECORDER.set(record)
        try:
            y = copy(batch, **kwargs)
        finally:
            _RECORDER.reset(token)
        return y, outs

    found = Probe(params, kernels, apply, order, rebuild)
    return found
