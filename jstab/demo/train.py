"""The demo's training loop: several seeds at once, steps in compiled scans.

A training run is a pure function of its key: ``fit`` draws each step's
minibatch with ``sample(key)``, computes the gradient of ``loss_fn``, and
applies the Optax transformation ``tx``. Seeds are trained side by side with
``jax.vmap`` (one compilation for all of them) and steps run ``chunk`` at a
time inside a ``jax.lax.scan`` (one dispatch per chunk), so that the host
only wakes up to report progress; convolutional networks, which XLA's CPU
backend runs slowly that way, train one seed and one step at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

import jstab

# loss_fn(params, model_state, batch) -> (loss, new model_state)
LossFn = Callable[[optax.Params, Any, Any], tuple[chex.Array, Any]]
Sampler = Callable[[chex.PRNGKey], Any]


class Run(NamedTuple):
    """The outcome of :func:`fit`, every array with a leading seed axis.

    Attributes:
      params: the trained parameters.
      model_state: the trained model state (batch statistics), or ``{}``.
      opt_state: the final optimizer state; :func:`jstab.statistics` reads
        what the clipping transforms did from it.
      loss: float32 ``(seeds, steps)``, the minibatch loss at every step.
      grad_norm: float32 ``(seeds, steps)``, the global norm of the raw
        gradient at every step, before any clipping (and unscaled).
      loss_scale: float32 ``(seeds, steps)``, the loss scale every step's
        loss was multiplied by (1 without loss scaling).
    """

    params: optax.Params
    model_state: Any
    opt_state: optax.OptState
    loss: chex.Array
    grad_norm: chex.Array
    loss_scale: chex.Array


def stack(trees: list[Any]) -> Any:
    """Trees of one structure stacked leaf by leaf: a new leading axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def fit(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    params: optax.Params,
    model_state: Any,
    sample: Sampler,
    key: chex.PRNGKey,
    *,
    steps: int,
    chunk: int = 100,
    progress: Callable[[int], Any] | None = None,
    vectorize: bool = True,
    scale_loss: bool = False,
) -> Run:
    """Trains one model per seed, all seeds in one compiled program.

    Args:
      loss_fn: ``loss_fn(params, model_state, batch) -> (loss, model_state)``
        of one model (not batched over seeds).
      tx: the optimizer, an ``optax.GradientTransformation``.
      params: the initial parameters, with a leading seed axis.
      model_state: the initial model state with a leading seed axis (batch
        statistics), or ``{}``.
      sample: ``sample(key) -> batch``, one minibatch.
      key: the key of the minibatches: one key per seed, shape ``(seeds,)``.
      steps: the number of optimizer steps.
      chunk: the steps of one compiled scan; ``steps`` need not be a
        multiple (a shorter last chunk compiles once more).
      progress: called with the number of steps done after every chunk.
      vectorize: whether the seeds are trained side by side, in compiled
        scans (``jax.vmap`` of ``jax.lax.scan``), or one after another, one
        compiled step at a time. XLA's CPU backend runs convolutions slowly
        both vmapped over their kernels (as grouped convolutions) and inside
        a scan's loop: on 2 cores, an Adam step of the demo's 12-layer CNN
        took 4.9 ms for one seed and 46 ms for 3 seeds vmapped, and with
        its minibatch drawn, 11 ms called from Python and 47 ms in a scan.
      scale_loss: whether the loss is multiplied by the loss scale of
        ``tx``'s state (:func:`jstab.scale_loss`) before it is
        differentiated: ``tx`` must hold a :func:`jstab.dynamic_loss_scale`.

    Returns:
      A :class:`Run`.
    """

    def step(carry, step_key):
        params, model_state, opt_state = carry
        scale = jstab.loss_scale(opt_state) if scale_loss else jnp.ones(())

        def objective(params, model_state, batch):
            loss, model_state = loss_fn(params, model_state, batch)
            scaled = jstab.scale_loss(loss, opt_state) if scale_loss else loss
            return scaled, (loss, model_state)

        (_, (loss, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(
            params, model_state, sample(step_key)
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        norm = jstab.global_norm(grads) / scale
        return (params, model_state, opt_state), (loss, norm, scale)

    if vectorize:
        # One seed's scan over the steps' keys, vmapped over the seeds.
        run_chunk = jax.jit(jax.vmap(lambda c, k: jax.lax.scan(step, c, k)))
    else:
        one = jax.jit(step)

        def run_chunk(carry, keys):
            seeds = []
            for i in range(keys.shape[0]):
                seed_carry, outs = jax.tree.map(lambda a, i=i: a[i], carry), []
                for step_key in keys[i]:
                    seed_carry, out = one(seed_carry, step_key)
                    outs.append(out)
                seeds.append((seed_carry, stack(outs)))
            return stack(seeds)

    carry = (params, model_state, jax.vmap(tx.init)(params))
    keys = jax.vmap(lambda k: jax.random.split(k, steps))(key)
    outs = []
    for start in range(0, steps, chunk):
        carry, out = run_chunk(carry, keys[:, start : start + chunk])
        outs.append(out)
        if progress is not None:
            jax.block_until_ready(out)
            progress(min(start + chunk, steps))
    loss, norm, scale = (jnp.concatenate(x, axis=1) for x in zip(*outs, strict=True))
    return Run(*carry, loss, norm, scale)
