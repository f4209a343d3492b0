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

A layer called inside a JAX transform of the model (``nn.scan``,
``nnx.scan``, ``nn.RNN``, ...) returns a value of the transform's inner
trace, which cannot leave it: such a layer is *hidden*. ``apply(params,
tap)`` hands each of its calls, as it is traced, to ``tap``, which may
compute statistics and send them out with ``jax.debug.callback``. A hidden
layer whose kernel the call sees without one axis (the kernel is stacked
over the iterations of a scan, or the members of a vmap) is *stacked*: it
is given an extra integer leaf beside its kernel, sliced by the transform
as the kernel is, whose slice tells ``tap`` which iteration a call is.
:func:`probe` traces the model once (``jax.eval_shape``) to find the
hidden and stacked layers. Each ``apply`` tags its NNX layers anew: JAX
keeps a scan's traced body for the same function and argument structure
(an NNX graph included), and a body not traced again would keep the taps
(or their absence) of an earlier trace.
"""

from __future__ import annotations

import contextvars
import dataclasses
import itertools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from flax.core import meta, tracers

from jstab import _numerics

Path = tuple[Any, ...]
Outputs = dict[str, list[chex.Array]]
Tap = Callable[[str, chex.Array, chex.Array | None], None]

# The key of the iteration leaf given to a stacked layer (see Stack).
_ITERATION = "jstab_iteration"


@dataclasses.dataclass(frozen=True)
class Stack:
    """A kernel stacked over the iterations of a transform.

    A call sees the kernel without one of ``axes`` (equal shapes result from
    removing any of them; all have length ``n``). The iteration leaf
    (:meth:`leaf`) is sliced by the transform as the kernel is, and the
    slice a call sees tells which axis was sliced at which index
    (:meth:`decode`).
    """

    axes: tuple[int, ...]
    n: int
    ndim: int

    def leaf(self) -> np.ndarray:
        """An int32 array of length ``n`` on ``axes`` (1 elsewhere): the digits
        of its elements in base ``n`` are their indices on ``axes``."""
        code = np.zeros([self.n if a in self.axes else 1 for a in range(self.ndim)])
        for j, a in enumerate(self.axes):
            index = np.arange(self.n).reshape(
                [-1 if b == a else 1 for b in range(self.ndim)]
            )
            code = code + index * self.n**j
        return code.astype(np.int32)

    def decode(self, code: Any) -> tuple[int, int]:
        """``(axis, index)`` of the slice of :meth:`leaf` a call saw.

        The sliced axis's digit is the one the same in every element (the
        other axes of ``axes`` are still there, and run over all indices).
        """
        powers = self.n ** np.arange(len(self.axes))
        digits = np.ravel(code)[:, None] // powers % self.n
        k = int(np.argmax(np.all(digits == digits[:1], axis=0)))
        return self.axes[k], int(digits[0, k])


def _stack(outer: tuple[int, ...], inner: tuple[int, ...]) -> Stack | None:
    """How a kernel of shape ``outer`` seen as ``inner`` is stacked, if it is."""
    outer, inner = tuple(outer), tuple(inner)
    axes = tuple(a for a in range(len(outer)) if outer[:a] + outer[a + 1 :] == inner)
    if not axes or outer[axes[0]] ** len(axes) > np.iinfo(np.int32).max:
        return None
    return Stack(axes, outer[axes[0]], len(outer))


class _Trace:
    """Numbers the traces layers are called in: ``None`` for the trace of
    ``apply`` itself, 0, 1, ... for those of transforms inside the model."""

    def __init__(self):
        self.outer = tracers.current_trace()
        self.inner: list[Any] = []

    def __call__(self) -> int | None:
        now = tracers.current_trace()
        if now == self.outer:
            return None
        for i, seen in enumerate(self.inner):
            if seen == now:
                return i
        self.inner.append(now)
        return len(self.inner) - 1


@dataclasses.dataclass
class Probe:
    """A model seen as a function of its flat trainable parameters.

    Attributes:
      params: every trainable parameter, a flat list of arrays.
      kernels: ``{layer name: index of its kernel in params}``, unordered.
      apply: ``apply(params, tap=None) -> (output, {layer name: [output of
        each call]})``, traceable; the outputs are those of the calls
        outside any transform. Each call of a :attr:`hidden` layer is handed
        to ``tap(name, output, code)`` as it is traced, ``code`` being the
        slice of its iteration leaf for a :attr:`stacked` layer (see
        :meth:`Stack.decode`), else ``None``.
      order: the names of the layers called, in the order of their first call.
      rebuild: ``rebuild(params)``: new Linen variables or a new NNX module.
      hidden: the layers called only inside a JAX transform of the model (a
        ``scan``, an ``RNN``), whose outputs cannot leave it, in call order.
      stacked: ``{name: Stack}`` of the hidden layers whose kernel is
        stacked over the transform's iterations.
      calls: every call of the first trace in order, as ``(name, trace)``:
        ``trace`` is ``None`` outside transforms, else a number shared by
        the calls traced in the same transform's body.
      shapes: ``{name: shape of its kernel as its first call saw it}``.
    """

    params: list[chex.Array]
    kernels: dict[str, int]
    apply: Callable[..., tuple[Any, Outputs]]
    order: list[str]
    rebuild: Callable[[list[chex.Array]], Any]
    hidden: list[str] = dataclasses.field(default_factory=list)
    stacked: dict[str, Stack] = dataclasses.field(default_factory=dict)
    calls: list[tuple[str, int | None]] = dataclasses.field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    def traced(self, calls: list, outs: Outputs) -> None:
        """Notes what a trace of ``apply`` saw: its ``calls`` and ``outs``."""
        if not self.calls:
            self.calls[:] = calls
        self.hidden[:] = [name for name in self.order if name not in outs]

    def warn_hidden(self, what: str) -> None:
        """Warns that ``what`` leaves out the :attr:`hidden` layers."""
        if self.hidden:
            warnings.warn(
                f"{what}: layers called inside a transform of the model (a scan, "
                f"an RNN) are left out: {', '.join(self.hidden)}. "
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
    jax.eval_shape(found.apply, found.params)  # finds the hidden layers
    for name in found.hidden:
        outer = jnp.shape(found.params[found.kernels[name]])
        stack = _stack(outer, found.shapes.get(name, outer))
        if stack is not None:
            found.stacked[name] = stack
    return found


def _code(leaf: Any, stack: Stack | None) -> chex.Array | None:
    """The slice of the iteration leaf a call sees, if the leaf was sliced."""
    if stack is None or leaf is None or jnp.ndim(leaf) >= stack.ndim:
        return None
    return jnp.asarray(leaf)


def _with_leaf(tree: Mapping, path: Path, leaf: Any) -> dict:
    """``tree`` with ``leaf`` added under ``_ITERATION`` at ``path``."""
    if not path:
        return {**tree, _ITERATION: leaf}
    return {**tree, path[0]: _with_leaf(tree[path[0]], path[1:], leaf)}


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

    def capture(mdl: nn.Module, method: str) -> bool:
        return method == "__call__" and tuple(mdl.path) in layers

    def apply(flat, tap: Tap | None = None):
        tree = jax.tree.unflatten(treedef, flat)
        for name, stack in found.stacked.items():
            tree = _with_leaf(tree, paths[kernels[name]][:-1], stack.leaf())
        trace = _Trace()
        calls: list[tuple[str, int | None]] = []

        def intercept(next_fun, args, kw, context):
            name = layers.get(tuple(context.module.path))
            if context.method_name != "__call__" or name is None:
                return next_fun(*args, **kw)
            if name not in order:
                order.append(name)
            calls.append((name, trace()))
            out = next_fun(*args, **kw)
            params = context.module.variables.get("params", {})
            if "kernel" in params:
                found.shapes.setdefault(name, jnp.shape(params["kernel"]))
            if tap is not None and name in found.hidden:
                stack = found.stacked.get(name)
                tap(name, out, _code(params.get(_ITERATION), stack))
            return out

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
        found.traced(calls, outs)
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
# An NNX layer's tag: (its name, the number of the apply that tagged it).
_TAG = "_jstab_layer"
_APPLIES = itertools.count()


def _recording(cls: type) -> type:
    """``cls`` with a ``__call__`` that the active recorder runs."""
    if cls not in _RECORDING:

        def __call__(self, *args, **kwargs):
            call = super(sub, self).__call__
            record = _RECORDER.get()
            if record is None:
                return call(*args, **kwargs)
            return record(self, lambda: call(*args, **kwargs))

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


def _value(variable: Any) -> Any:
    return variable.get_value() if isinstance(variable, nnx.Variable) else variable


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

    def apply(flat, tap: Tap | None = None):
        copy = rebuild(flat)
        number = next(_APPLIES)
        for path, node in nnx.iter_graph(copy):
            name = layers.get(tuple(path))
            if name is not None and isinstance(node, nnx.Module):
                node.__class__ = _recording(type(node))
                # Copies made by NNX transforms inside the model keep the tag.
                setattr(node, _TAG, (name, number))
                if name in found.stacked:
                    kind = type(node.kernel)  # the transform slices it as the kernel
                    setattr(node, _ITERATION, kind(found.stacked[name].leaf()))
        trace = _Trace()
        calls: list[tuple[str, int | None]] = []
        outs: Outputs = {}

        def record(layer, call):
            name, tagged = getattr(layer, _TAG, (None, None))
            if tagged != number:
                return call()
            if name not in order:
                order.append(name)
            inside = trace()
            calls.append((name, inside))
            out = call()
            found.shapes.setdefault(name, jnp.shape(_value(layer.kernel)))
            if inside is None:
                outs.setdefault(name, []).append(out)
            elif tap is not None and name in found.hidden:
                stack = found.stacked.get(name)
                tap(name, out, _code(_value(getattr(layer, _ITERATION, None)), stack))
            return out

        token = _RECORDER.set(record)
        try:
            y = copy(batch, **kwargs)
        finally:
            _RECORDER.reset(token)
        found.traced(calls, outs)
        return y, outs

    found = Probe(params, kernels, apply, order, rebuild)
    return found
