"""Signal propagation at initialization: will this model vanish or explode?"""

from __future__ import annotations

import dataclasses
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
        ``"blocks/2/linear"``), in the order of their first call.
      activation_mean: float32 array, the mean of each layer's output over
        all its elements (before the nonlinearity that follows it).
      activation_std: float32 array, their standard deviation.
      dead_fraction: float32 array, the fraction of each layer's output units
        (last axis) that are dead for the whole batch: ``≤ 0`` everywhere for
        ``nonlinearity="relu"``, ``|x| > 3`` everywhere (saturated) for
        ``"sigmoid"`` and ``"tanh"``.
      grad_norm: float32 array, the L2 norm of ``∂L/∂kernel`` of each layer.
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


def _layer_stats(calls: list[chex.Array], nonlinearity: str) -> list[chex.Array]:
    """Mean, std and dead fraction of a layer's outputs over all its calls."""
    rows = _probe.rows(calls)
    if nonlinearity == "relu":
        dead = jnp.all(rows <= 0, axis=0)
    else:
        dead = jnp.all(jnp.abs(rows) > _SATURATED, axis=0)
    return [jnp.mean(rows), jnp.std(rows), jnp.mean(dead.astype(rows.dtype))]


def _report(
    found: _probe.Probe,
    loss_fn: Callable[[Any], chex.Array] | None,
    nonlinearity: str,
    vanishing_ratio: float,
    exploding_ratio: float,
) -> SignalReport:
    loss_fn = loss_fn or _default_loss

    def measure(params):
        def loss(params):
            y, outs = found.apply(params)
            return loss_fn(y), outs

        (_, outs), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return {
            name: [
                *_layer_stats(calls, nonlinearity),
                _numerics.global_norm([grads[found.kernels[name]]]),
            ]
            for name, calls in outs.items()
        }

    measured = jax.device_get(jax.jit(measure)(found.params))
    names = tuple(name for name in found.order if name in measured)
    if not names:
        raise TypeError("module: the forward pass called none of its layers")
    table = np.array([measured[n] for n in names], np.float32).reshape(len(names), 4)
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
    ``scan``, such as ``nn.RNN`` or ``nnx.RNN``) cannot be seen from outside
    it: they are left out, with a warning naming them.

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
    report = _report(found, loss_fn, nonlinearity, vanishing_ratio, exploding_ratio)
    found.warn_hidden("signal_propagation")
    return report
