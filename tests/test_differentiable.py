"""Every transform and wrapper can be differentiated through.

Research code differentiates through optimizer steps (meta-learning, learned
optimizers, hypergradients). For each transform, ``jax.grad`` and ``jax.jvp``
of a scalar function of ``update``'s outputs, with respect to the incoming
updates and the params, are checked against central finite differences in
float64 (``jax.test_util.check_grads``, forward and reverse mode), in a state
where the rule acts: clipping, clipped to an adaptive threshold, skipped or
accumulating. The step runs under strict dtype promotion and under x64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import jstab


def _tree(seed: int, scale: float) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(4, 3)) * scale),
            "bias": jnp.asarray(rng.normal(size=(3,)) * scale),
        },
        "out": {"kernel": jnp.asarray(rng.normal(size=(3, 2)) * scale)},
    }


def _with_loss(tx, loss: float):
    """``tx`` whose ``update`` is given the same ``loss`` at every step."""

    def update(updates, state, params=None):
        return tx.update(updates, state, params, loss=jnp.asarray(loss))

    return optax.GradientTransformation(tx.init, update)


#: name: (build, scale of the differentiated gradient, scales of the steps
#: before it). The gradient of scale 1 has a global norm of about 4.
CASES = {
    "clip_by_value": (lambda: jstab.clip_by_value(0.7), 1.0, []),
    "clip_by_range": (lambda: jstab.clip_by_range(-0.5, 0.8), 1.0, []),
    "clip_by_global_norm": (lambda: jstab.clip_by_global_norm(1.0), 1.0, []),
    "clip_by_global_norm below": (lambda: jstab.clip_by_global_norm(9.0), 1.0, []),
    "clip_by_global_norm inf": (
        lambda: jstab.clip_by_global_norm(0.5, ord=jnp.inf),
        1.0,
        [],
    ),
    "clip_by_layer_norm": (lambda: jstab.clip_by_layer_norm(1.5), 1.0, []),
    "clip_by_layer_norm module": (
        lambda: jstab.clip_by_layer_norm(1.5, per="module"),
        1.0,
        [],
    ),
    "adaptive_grad_clip": (lambda: jstab.adaptive_grad_clip(0.4), 1.0, []),
    "autoclip": (lambda: jstab.autoclip(50.0, history=4), 1.0, [0.3, 0.5, 0.4]),
    "zclip": (lambda: jstab.zclip(warmup_steps=3), 1.0, [0.1, 0.12, 0.11]),
    "zclip mean": (
        lambda: jstab.zclip(warmup_steps=3, clip_option="mean"),
        1.0,
        [0.1, 0.12, 0.11],
    ),
    "skip_on_spike accepted": (
        lambda: jstab.skip_on_spike(optax.adam(0.1), max_norm=100.0),
        1.0,
        [1.0],
    ),
    "skip_on_spike skipped": (
        lambda: jstab.skip_on_spike(optax.adam(0.1), max_norm=1.0),
        1.0,
        [0.1],
    ),
    "skip_on_spike MultiSteps": (
        lambda: jstab.skip_on_spike(optax.MultiSteps(optax.sgd(0.1), 2)),
        1.0,
        [0.5],
    ),
    "skip_on_spike forced": (
        lambda: jstab.skip_on_spike(
            optax.sgd(0.1), max_norm=1.0, window=4, max_consecutive=1
        ),
        1.0,
        [1.0],
    ),
    "skip_on_spike loss": (
        lambda: _with_loss(
            jstab.skip_on_spike(
                optax.sgd(0.1), loss_z_thresh=2.0, window=3, warmup_steps=2
            ),
            2.0,
        ),
        1.0,
        [1.0, 1.0],
    ),
    "clip_by_block_rms": (lambda: jstab.clip_by_block_rms(0.3), 1.0, []),
    "adagc": (lambda: jstab.adagc(warmup_steps=2), 1.0, [0.3, 0.5]),
    "adagc warmup": (lambda: jstab.adagc(), 1.0, []),
    "scale_by_spam": (
        lambda: jstab.scale_by_spam(b2=0.5, spike_threshold=4.0, reset_interval=30),
        1.0,
        [1.0] * 21,
    ),
    "spam": (
        lambda: jstab.spam(
            0.1, b2=0.5, spike_threshold=4.0, reset_interval=30, weight_decay=0.1
        ),
        1.0,
        [1.0] * 21,
    ),
    "dynamic_loss_scale": (
        lambda: jstab.dynamic_loss_scale(optax.sgd(0.1), init_scale=8.0),
        1.0,
        [1.0],
    ),
    "dynamic_loss_scale growing": (
        lambda: jstab.dynamic_loss_scale(
            optax.adam(0.1), init_scale=8.0, growth_interval=2
        ),
        1.0,
        [1.0],
    ),
    "dynamic_loss_scale MultiSteps": (
        lambda: jstab.dynamic_loss_scale(optax.MultiSteps(optax.sgd(0.1), 2)),
        1.0,
        [0.5],
    ),
    "upcast": (lambda: jstab.upcast(optax.adam(0.1)), 1.0, [1.0]),
    "upcast float32": (
        lambda: jstab.upcast(optax.sgd(0.1), dtype=jnp.float32),
        1.0,
        [],
    ),
    "monitor_gradients": (lambda: jstab.monitor_gradients(), 1.0, []),
    "monitor_updates": (lambda: jstab.monitor_updates(), 1.0, [1.0]),
}


def _objective(tx, state, weights):
    """``g, p -> <weights, tx.update(g, state, p)[0]>``: a scalar."""

    def f(g, p):
        out, _ = tx.update(g, state, p)
        terms = jax.tree.map(lambda w, u: jnp.sum(w * u), weights, out)
        return sum(jax.tree.leaves(terms))

    return f


#: Rules whose statistics are float32 by design, whatever the gradient's
#: dtype: the finite differences of their float64 run see float32 rounding
#: (about 1e-7 relative over a step of 1e-4, so 1e-3), and a larger step.
FLOAT32_STATISTICS = ("autoclip", "zclip")


#: Cases around Optax's Adam or MultiSteps, not written for strict promotion.
LOOSE = (
    "skip_on_spike accepted",
    "skip_on_spike skipped",
    "skip_on_spike MultiSteps",
    "dynamic_loss_scale growing",
    "dynamic_loss_scale MultiSteps",
    "upcast",
)


@pytest.mark.parametrize("name", list(CASES))
def test_grad_and_jvp_match_finite_differences(name):
    build, scale, before = CASES[name]
    tolerance = {}
    if name.startswith(FLOAT32_STATISTICS):
        tolerance = {"atol": 2e-3, "rtol": 2e-3, "eps": 1e-3}
    strict = "standard" if name in LOOSE else "strict"
    with jax.enable_x64(True), jax.numpy_dtype_promotion(strict):
        tx = build()
        params = _tree(1, 1.0)
        state = tx.init(params)
        for i, s in enumerate(before):
            _, state = tx.update(_tree(10 + i, s), state, params)
        f = _objective(tx, state, _tree(2, 1.0))
        g = _tree(3, scale)
        check_grads(f, (g, params), order=1, modes=("fwd", "rev"), **tolerance)
        # Under jit too, and the gradient is not all zero where the rule
        # passes something through.
        grads = jax.jit(jax.grad(f))(g, params)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(grads))
        if "skipped" not in name:
            assert any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(grads))


@pytest.mark.parametrize("ord", [2, jnp.inf])
def test_the_functions_are_differentiable(ord):
    with jax.enable_x64(True):
        g = _tree(3, 1.0)
        check_grads(lambda g: jstab.global_norm(g, ord), (g,), 1, ("fwd", "rev"))
        weights = _tree(2, 1.0)

        def clipped(g, max_norm):
            out, _ = jstab.clip_grad_norm(g, max_norm, ord)
            terms = jax.tree.map(lambda w, u: jnp.sum(w * u), weights, out)
            return sum(jax.tree.leaves(terms))

        check_grads(clipped, (g, jnp.asarray(0.3)), 1, ("fwd", "rev"))


@pytest.mark.parametrize(
    "build",
    [
        lambda: jstab.clip_by_global_norm(1.0),
        lambda: jstab.clip_by_layer_norm(1.0),
        lambda: jstab.adaptive_grad_clip(0.1),
        lambda: jstab.zclip(warmup_steps=1),
        lambda: jstab.autoclip(),
    ],
    ids=["global", "layer", "agc", "zclip", "autoclip"],
)
def test_the_gradient_at_a_zero_gradient_is_finite(build):
    # sqrt's derivative at 0 is infinite; the norms' is taken to be 0 there.
    tx = build()
    params = _tree(1, 1.0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    f = _objective(tx, tx.init(params), _tree(2, 1.0))
    grads = jax.grad(f, argnums=(0, 1))(zeros, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(grads))


def _returns_a_transformation(obj: object) -> bool:
    """Whether ``obj`` is a factory whose docstring returns a transformation."""
    returns = (getattr(obj, "__doc__", None) or "").split("Returns:")[-1]
    return not isinstance(obj, type) and "GradientTransformation" in returns


def test_every_public_transform_is_checked_here():
    # A transform added later, without a case above, fails this.
    transforms = {
        n for n in jstab.__all__ if _returns_a_transformation(getattr(jstab, n))
    }
    assert "clip_by_global_norm" in transforms and "skip_on_spike" in transforms
    covered = {case.split()[0] for case in CASES}
    assert transforms <= covered, sorted(transforms - covered)
