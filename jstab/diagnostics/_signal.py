"""Signal propagation at initialization: will this model vanish or explode?"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal, overload

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

from jstab import _checks, _numerics
from jstab.diagnostics import _probe

Nonlinearity = Literal["relu", "sigmoid", "tanh"]
_SATURATED = 3.0


@dataclasses.dataclass(frozen=True, eq=False)
class SignalReport:
    """Per-layer statistics of one forward and backward pass, in forward order.

    ``print(report)`` shows them as a table.

    Attributes:
      layers: the layers' names (module paths such as ``"Dense_0"`` or
        ``"blocks/2/linear"``), in the order of their first call. A layer
        whose kernel is stacked over the iterations of a scan has one row
        per iteration, ``"blocks/linear[i]"`` for the iteration that uses
        slice ``i`` of the kernel; the layers of one scan's body alternate
        (``a[0], b[0], a[1], b[1], ...``).
      activation_mean: float32 array, the mean of each layer's output over
        all its elements (before the nonlinearity that follows it).
      activation_std: float32 array, their standard deviation.
      dead_fraction: float32 array, the fraction of each layer's output units
        (last axis) that are dead for the whole batch: ``≤ 0`` everywhere for
        ``nonlinearity="relu"``, ``|x| > 3`` everywhere (saturated) for
        ``"sigmoid"`` and ``"tanh"``.
      grad_norm: float32 array, the L2 norm of ``∂L/∂kernel`` of each layer
        (of slice ``i`` of it for a row ``"name[i]"``).
      vanishing: ``grad_norm[0] < vanishing_ratio * grad_norm[-1]``.
      exploding: a statistic is not finite, or
        ``activation_std[-1] > exploding_ratio * activation_std[0]``, or
        ``grad_norm[0] > grad_norm[-1] / vanishing_ratio``.
    """

    layers: tuple[str, ...]
    activation_mean: np.ndarray
    activation_std: np.ndarray
    dead_fraction: np.ndarray
    grad_norm: np.ndarray
    vanishing: bool
    exploding: bool

    @property
    def verdict(self) -> str:
        """``"vanishing"``, ``"exploding"``, both joined by ``" and "``, or ``"ok"``."""
        said = [
            w
            for w, on in (("vanishing", self.vanishing), ("exploding", self.exploding))
            if on
        ]
        return " and ".join(said) or "ok"

    def __str__(self) -> str:
        width = max([len("layer"), *map(len, self.layers)])
        head = f"{'layer':<{width}}  {'mean':>10}  {'std':>10}  {'dead':>6}  "
        head += f"{'grad norm':>10}"
        rows = [head, "-" * len(head)]
        for i, name in enumerate(self.layers):
            rows.append(
                f"{name:<{width}}  {self.activation_mean[i]:>10.3g}  "
                f"{self.activation_std[i]:>10.3g}  {self.dead_fraction[i]:>6.1%}  "
                f"{self.grad_norm[i]:>10.3g}"
            )
        rows.append(f"verdict: {self.verdict}")
        return "\n".join(rows)


def _default_loss(output: Any) -> chex.Array:
    if not isinstance(output, jax.Array):
        raise TypeError(
            "loss_fn: the model returned a "
            f"{type(output).__name__}, not an array; pass loss_fn=... mapping "
            "the output to a scalar"
        )
    x = output.astype(_numerics.compute_dtype(output.dtype))
    return 0.5 * jnp.mean(x * x)


def _dead(rows: chex.Array, nonlinearity: str) -> chex.Array:
    """Per unit (column of ``rows``): dead or saturated at every position."""
    if nonlinearity == "relu":
        return jnp.all(rows <= 0, axis=0)
    return jnp.all(jnp.abs(rows) > _SATURATED, axis=0)


def _layer_stats(calls: list[chex.Array], nonlinearity: str) -> list[chex.Array]:
    """Mean, std and dead fraction of a layer's outputs over all its calls."""
    rows = _probe.rows(calls)
    dead = _dead(rows, nonlinearity)
    return [jnp.mean(rows), jnp.std(rows), jnp.mean(dead.astype(rows.dtype))]


@dataclasses.dataclass
class _Moments:
    """Count, mean, sum of squared deviations and dead units of some calls."""

    count: int
    mean: float
    m2: float
    dead: np.ndarray

    def merge(self, other: _Moments) -> None:
        """Adds ``other``'s calls (Chan et al.'s pairwise update)."""
        if other.dead.shape != self.dead.shape:  # as rows(): the first call's units
            return
        count = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / count
        self.m2 += other.m2 + delta * delta * self.count * other.count / count
        self.count = count
        self.dead = self.dead & other.dead

    def stats(self) -> list[float]:
        return [self.mean, np.sqrt(self.m2 / self.count), float(np.mean(self.dead))]


def _deliver(sink: list, name: str, count: int, mean, m2, dead, code) -> None:
    """Keeps one call of a hidden layer, as ``jax.debug.callback`` delivers it.

    Calls arrive in no set order, and a call may arrive twice (a
    rematerialized forward pass runs again for the gradient): twice the
    same moments leave a row's mean, std and dead units as they are.
    """
    moments = _Moments(count, float(mean), float(m2), np.asarray(dead, bool))
    sink.append((name, moments, None if code is None else np.asarray(code)))


def _hidden_rows(
    found: _probe.Probe, sink: list, grads: dict
) -> dict[tuple[str, int | None], list[float]]:
    """``{(layer, iteration or None): [mean, std, dead, grad norm]}`` of the
    hidden layers' delivered calls."""
    moments: dict[tuple[str, int | None], _Moments] = {}
    axes: dict[str, int] = {}
    for name, m, code in sink:
        key = (name, None)
        if code is not None:
            axes[name], i = found.stacked[name].decode(code)
            key = (name, i)
        if key in moments:
            moments[key].merge(m)
        else:
            moments[key] = m
    rows = {}
    for (name, i), m in moments.items():
        total, slices = grads[name]
        grad = total if i is None else slices[axes[name]][i]
        rows[(name, i)] = [*m.stats(), grad]
    return rows


def _forward_order(
    found: _probe.Probe, keys: set[tuple[str, int | None]]
) -> list[tuple[str, int | None]]:
    """The rows ``keys`` in forward order.

    A row ``(name, None)`` takes its layer's first call. The iterations of
    the stacked layers traced in one transform's body run together:
    ``(a, 0), (b, 0), (a, 1), (b, 1), ...``.
    """
    iterations: dict[str, set[int]] = {}
    for name, i in keys:
        if i is not None:
            iterations.setdefault(name, set()).add(i)
    bodies: dict[int | None, list[str]] = {}
    for name, trace in found.calls:
        if name in iterations and name not in bodies.setdefault(trace, []):
            bodies[trace].append(name)
    order: list[tuple[str, int | None]] = []
    done: set[str] = set()
    for name, trace in found.calls:
        if name in done:
            continue
        if (name, None) in keys:
            order.append((name, None))
            done.add(name)
        elif name in iterations:
            body = [m for m in bodies[trace] if m not in done]
            for i in sorted(set().union(*(iterations[m] for m in body))):
                order += [(m, i) for m in body if (m, i) in keys]
            done.update(body)
    return order


def _report(
    found: _probe.Probe,
    loss_fn: Callable[[Any], chex.Array] | None,
    nonlinearity: str,
    vanishing_ratio: float,
    exploding_ratio: float,
) -> SignalReport:
    loss_fn = loss_fn or _default_loss
    sink: list = []

    def tap(name, out, code):
        rows = _probe.rows([out])
        mean = jnp.mean(rows)
        m2 = jnp.sum(jnp.square(rows - mean))
        deliver = functools.partial(_deliver, sink, name, rows.size)
        jax.debug.callback(deliver, mean, m2, _dead(rows, nonlinearity), code)

    def measure(params):
        def loss(params):
            y, outs = found.apply(params, tap)
            return loss_fn(y), outs

        (_, outs), grads = jax.value_and_grad(loss, has_aux=True)(params)
        plain = {
            name: [
                *_layer_stats(calls, nonlinearity),
                _numerics.global_norm([grads[found.kernels[name]]]),
            ]
            for name, calls in outs.items()
        }
        hidden = {}
        for name in found.hidden:
            g = grads[found.kernels[name]]
            stack = found.stacked.get(name)
            slices = {
                a: _numerics.group_norms(
                    list(jnp.moveaxis(g, a, 0)),
                    [[i] for i in range(stack.n)],
                    zero=True,
                )
                for a in (stack.axes if stack else ())
            }
            hidden[name] = (_numerics.global_norm([g]), slices)
        return plain, hidden

    plain, grads = jax.device_get(jax.jit(measure)(found.params))
    jax.effects_barrier()  # every call of a hidden layer is delivered
    measured = {(name, None): row for name, row in plain.items()}
    measured.update(_hidden_rows(found, sink, grads))
    keys = _forward_order(found, set(measured))
    if not keys:
        raise TypeError("module: the forward pass called none of its layers")
    names = tuple(name if i is None else f"{name}[{i}]" for name, i in keys)
    table = np.array([measured[k] for k in keys], np.float32).reshape(len(names), 4)
    mean, std, dead, grad = (np.ascontiguousarray(c) for c in table.T)
    vanishing = bool(grad[0] < vanishing_ratio * grad[-1])
    exploding = bool(
        not np.all(np.isfinite(table))
        or std[-1] > exploding_ratio * std[0]
        or grad[0] > grad[-1] / vanishing_ratio
    )
    return SignalReport(names, mean, std, dead, grad, vanishing, exploding)


@overload
def signal_propagation(
    module: linen.Module, variables: Mapping, batch: Any, **kwargs: Any
) -> SignalReport: ...


@overload
def signal_propagation(
    module: nnx.Module, batch: Any, **kwargs: Any
) -> SignalReport: ...


def signal_propagation(
    module: linen.Module | nnx.Module,
    *args: Any,
    loss_fn: Callable[[Any], chex.Array] | None = None,
    nonlinearity: Nonlinearity = "relu",
    vanishing_ratio: float = 1e-3,
    exploding_ratio: float = 1e3,
    model_kwargs: Mapping[str, Any] | None = None,
) -> SignalReport:
    r"""How signals travel through a Flax model at initialization.

    ``signal_propagation(module, variables, batch)`` for a Linen module,
    ``signal_propagation(model, batch)`` for an NNX one. One jit-compiled
    forward and backward pass on ``batch``, with the loss

    .. math::
      L = \text{loss\_fn}(f(x)), \quad \text{by default } \tfrac12\,
      \overline{f(x)^2},

    measures for every layer (a submodule owning a ``kernel``: Dense, Conv,
    ..., in the order of its first call) its output's mean and standard
    deviation, its dead or saturated units and the norm of its kernel's
    gradient; see :class:`SignalReport`. It tells before training whether the
    initialization will make the gradient vanish or explode (Glorot & Bengio,
    2010; He et al., 2015; Schoenholz et al., 2017, "Deep information
    propagation"). The model is used as it is: Linen outputs come from
    ``capture_intermediates``, NNX ones from a throwaway copy of the model.
    A layer called several times (a shared or recurrent cell) is measured
    over all its calls. Layers called inside a transform of the model (a
    ``scan``: ``nn.scan``, ``nnx.scan``, ``nn.RNN``, ``nnx.RNN``) are
    measured inside it, without unrolling it: each call's statistics leave
    the compiled pass by ``jax.debug.callback``. A layer whose kernel is
    stacked over the scan's iterations (blocks scanned over, "scan over
    layers") gets one row per iteration, ``"blocks/linear[i]"``, with the
    norm of slice ``i`` of its kernel's gradient; the rows of a scan run
    with ``reverse=True`` stay in the order of the slices. A layer whose
    kernel the scan shares between iterations (a recurrent cell) gets one
    row over all its calls, as in a Python loop; so does a kernel stacked
    over two nested scans.

    Args:
      module: a ``flax.linen.Module`` or a ``flax.nnx.Module``.
      *args: ``variables, batch`` (Linen) or ``batch`` (NNX).
      loss_fn: maps the model's output to the scalar loss.
      nonlinearity: what follows the layers: ``"relu"`` (and its variants:
        a unit is dead when ``≤ 0``) or ``"sigmoid"``/``"tanh"`` (saturated
        when ``|x| > 3``).
      vanishing_ratio: the ratio of first to last layer's gradient norm
        below which the gradient vanishes (and above whose inverse it
        explodes).
      exploding_ratio: the ratio of last to first layer's activation std
        above which the forward signal explodes.
      model_kwargs: keyword arguments of the call: ``{"train": False}``;
        for Linen also ``apply``'s, such as ``{"rngs": {"dropout": key}}``.

    Returns:
      A :class:`SignalReport`.
    """
    _checks.one_of("nonlinearity", nonlinearity, ("relu", "sigmoid", "tanh"))
    _checks.positive("vanishing_ratio", vanishing_ratio)
    _checks.positive("exploding_ratio", exploding_ratio)
    variables, batch = _probe.arguments(module, args)
    found = _probe.probe(module, variables, batch, model_kwargs)
    return _report(found, loss_fn, nonlinearity, vanishing_ratio, exploding_ratio)
