"""What the benchmark compares: each clipping rule of jstab and of Optax.

Every variant is a whole optimizer, ``optax.chain(clip, optimizer)`` (or a
wrapper around it; a monitor of updates comes after the optimizer), timed
against the optimizer alone. The thresholds are set
for :func:`jstab.bench.trees.make`'s gradients (global norm 10, elements of
about 1e-3) so that every rule acts at every step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import optax

import jstab


@dataclasses.dataclass(frozen=True)
class Variant:
    """A clipping rule to time, built around the optimizer it is timed with.

    Attributes:
      build: ``optimizer -> GradientTransformation``, the whole step's
        transformation.
      reads: how many gradient-sized arrays the rule must read beyond what
        the optimizer reads (1 for a norm of the gradient, 2 for norms of the
        gradient and of the parameters or for a value rule's largest ``|g|`` and
        count, 0 for an elementwise rule without statistics): what its
        memory-traffic floor is computed from.
      rule: what it does, to line up jstab's and Optax's forms of one rule.
    """

    build: Callable[[optax.GradientTransformation], optax.GradientTransformation]
    reads: int
    rule: str


def _chained(clip: optax.GradientTransformation, reads: int, rule: str) -> Variant:
    return Variant(lambda opt: optax.chain(clip, opt), reads, rule)


def _functional(grads, params):
    """``jstab.clip_grad_norm`` as a hand-written training loop calls it."""
    del params
    return jstab.clip_grad_norm(grads, 1.0)[0]


def _given_loss(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` whose ``update`` is given a loss (a constant: only its cost counts)."""

    def update(updates, state, params=None):
        return tx.update(updates, state, params, loss=jax.numpy.float32(2.0))

    return optax.GradientTransformation(tx.init, update)


def default() -> dict[str, Variant]:
    """jstab's clipping transforms and Optax's with the same rules, by name."""
    return {
        "jstab.clip_by_global_norm": _chained(
            jstab.clip_by_global_norm(1.0), 1, "global norm"
        ),
        "jstab.clip_grad_norm": _chained(
            optax.stateless(_functional), 1, "global norm"
        ),
        "optax.clip_by_global_norm": _chained(
            optax.clip_by_global_norm(1.0), 1, "global norm"
        ),
        # One read: the largest |g| and the count of clipped elements come
        # out of one variadic reduction.
        "jstab.clip_by_value": _chained(jstab.clip_by_value(1e-3), 1, "value"),
        "optax.clip": _chained(optax.clip(1e-3), 0, "value"),
        "jstab.clip_by_range": _chained(jstab.clip_by_range(-1e-3, 2e-3), 1, "range"),
        "jstab.clip_by_layer_norm": _chained(
            jstab.clip_by_layer_norm(0.1), 1, "per-layer norm"
        ),
        "jstab.clip_by_block_rms": _chained(
            jstab.clip_by_block_rms(1e-4), 1, "per-layer RMS"
        ),
        "optax.clip_by_block_rms": _chained(
            optax.clip_by_block_rms(1e-4), 1, "per-layer RMS"
        ),
        # Past its warm-up from the second step: each tensor against its γ.
        "jstab.adagc": _chained(
            jstab.adagc(1.0, warmup_steps=1), 1, "per-tensor adaptive (AdaGC)"
        ),
        "jstab.adaptive_grad_clip": _chained(
            jstab.adaptive_grad_clip(0.01), 2, "unit-wise (AGC)"
        ),
        "optax.adaptive_grad_clip": _chained(
            optax.adaptive_grad_clip(0.01), 2, "unit-wise (AGC)"
        ),
        "jstab.autoclip": _chained(
            jstab.autoclip(10.0, history=1000), 1, "adaptive global norm"
        ),
        "jstab.zclip": _chained(jstab.zclip(), 1, "adaptive global norm"),
        "jstab.monitor_gradients": _chained(
            jstab.monitor_gradients(), 1, "monitor (no clipping)"
        ),
        # After the optimizer: the norms of the update and of the parameters.
        "jstab.monitor_updates": Variant(
            lambda opt: optax.chain(opt, jstab.monitor_updates()),
            2,
            "monitor (no clipping)",
        ),
        "jstab.skip_on_spike": Variant(
            lambda opt: jstab.skip_on_spike(opt, z_thresh=3.0), 1, "skip the step"
        ),
        # The same with a loss test, a window of 128 and forced steps: what it
        # adds is scalar work on the loss and a ring buffer of 2 x 128 floats.
        "jstab.skip_on_spike window": Variant(
            lambda opt: _given_loss(
                jstab.skip_on_spike(
                    opt,
                    z_thresh=3.0,
                    loss_z_thresh=3.0,
                    window=128,
                    max_consecutive=10,
                )
            ),
            1,
            "skip the step",
        ),
        # Replaces the optimizer: timed against Adam (the default baseline),
        # it reads and writes what Adam does.
        "jstab.spam": Variant(lambda opt: jstab.spam(1e-3), 0, "spike-aware Adam"),
        # Unscales the gradient and checks that it is finite: one read.
        "jstab.dynamic_loss_scale": Variant(
            lambda opt: jstab.dynamic_loss_scale(opt), 1, "skip the step"
        ),
        "optax.apply_if_finite": Variant(
            lambda opt: optax.apply_if_finite(opt, 3), 1, "skip the step"
        ),
    }


def optimizer(name: str, learning_rate: float = 1e-3) -> optax.GradientTransformation:
    """The baseline optimizer by name: ``"adam"`` or ``"sgd"`` (plain)."""
    if name == "adam":
        return optax.adam(learning_rate)
    if name == "sgd":
        return optax.sgd(learning_rate)
    raise ValueError(f"`optimizer` must be 'adam' or 'sgd', got {name!r}.")


def passes(tx: optax.GradientTransformation, params: optax.Params) -> float:
    """Gradient-sized arrays a step of ``tx`` must move: its memory traffic.

    It reads the gradient, the parameters and each parameter-sized array of
    its state, and writes the parameters and the state: ``3 + 2 s`` for
    ``s`` state arrays (Adam: 7; plain SGD: 3), counted in bytes.
    """
    size = sum(x.nbytes for x in jax.tree.leaves(params))
    state = jax.eval_shape(tx.init, params)
    state_bytes = sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if x.ndim > 0
    )
    return 3 + 2 * state_bytes / max(size, 1)


def traffic_floor(base_passes: float, reads: int | None) -> float | None:
    """``(passes + reads) / passes``: the ratio a memory-bound step cannot beat."""
    if reads is None:
        return None
    return (base_passes + reads) / base_passes
