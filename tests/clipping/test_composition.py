"""Every clipping transform composes with Optax and keeps a stable state."""

import doctest

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jstab
from jstab.clipping import (
    _adagc,
    _agc,
    _autoclip,
    _block_rms,
    _global_norm,
    _layer_norm,
    _skip,
    _value,
    _zclip,
)


@pytest.fixture(autouse=True)
def _strict_promotion():
    """Overrides the package's fixture: Optax's adam mixes int32 and float."""
    yield


BUILDERS = {
    "clip_by_value": lambda: jstab.clip_by_value(0.05),
    "clip_by_range": lambda: jstab.clip_by_range(-0.05, 0.1),
    "clip_by_global_norm": lambda: jstab.clip_by_global_norm(0.5),
    "clip_by_global_norm_inf": lambda: jstab.clip_by_global_norm(0.1, ord=jnp.inf),
    "clip_by_layer_norm": lambda: jstab.clip_by_layer_norm(0.2),
    "clip_by_layer_norm_module": lambda: jstab.clip_by_layer_norm(0.2, per="module"),
    "adaptive_grad_clip": lambda: jstab.adaptive_grad_clip(0.01),
}


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "dense": {"kernel": jax.random.normal(k1, (6, 4)), "bias": jnp.zeros((4,))},
        "out": {"kernel": jax.random.normal(k2, (4, 1)) * 0.1},
    }


def _grads(params, step):
    return jax.tree.map(lambda p: jnp.cos(p + step) * (1.0 + step), params)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_chained_step_compiles_once_and_state_is_stable(name):
    chex.clear_trace_counter()
    params = _params()
    tx = optax.chain(BUILDERS[name](), optax.adam(1e-2))
    state = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, i):
        updates, state = tx.update(_grads(params, i), state, params)
        return optax.apply_updates(params, updates), state

    shapes = jax.eval_shape(lambda: state)
    for i in range(3):
        params, state = step(params, state, jnp.float32(i))
        chex.assert_trees_all_equal_shapes_and_dtypes(state, shapes)
    assert int(optax.tree.get(state, "clip_count")) == 3
    assert optax.tree.get(state, "clipped").dtype == jnp.float32
    assert state[0].count.dtype == jnp.int32 and int(state[0].count) == 3
    norms = jax.tree.leaves(optax.tree.get(state, "norm"))
    assert all(n.dtype == jnp.float32 and n.shape == () for n in norms)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_multisteps_masked_and_apply_if_finite(name):
    params = _params()
    mask = {"dense": {"kernel": True, "bias": False}, "out": {"kernel": True}}
    inner = optax.chain(optax.masked(BUILDERS[name](), mask), optax.sgd(0.1))
    tx = optax.MultiSteps(optax.apply_if_finite(inner, 2), every_k_schedule=2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for i in range(4):
        updates, state = update(_grads(params, float(i)), state, params)
        params = optax.apply_updates(params, updates)
    assert int(optax.tree.get(state, "clip_count")) == 2  # two emitted steps
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), _grads(params, 0.0))
    for _ in range(2):
        updates, state = update(bad, state, params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    assert int(optax.tree.get(state, "clip_count")) == 2


ADAPTIVE = {
    "autoclip": lambda: jstab.autoclip(25.0, history=2),
    "zclip": lambda: jstab.zclip(warmup_steps=1, z_thresh=0.1),
    "zclip_percentile": lambda: jstab.zclip(warmup_steps=1, mode="percentile"),
}


@pytest.mark.parametrize("name", sorted(BUILDERS | ADAPTIVE) + ["skip_on_spike"])
def test_state_can_be_donated(name):
    """A training step donates the optimizer state: no buffer may appear twice."""
    params = _params()
    if name == "skip_on_spike":
        tx = jstab.skip_on_spike(optax.adam(1e-2), z_thresh=0.1, warmup_steps=1)
    else:
        tx = optax.chain((BUILDERS | ADAPTIVE)[name](), optax.adam(1e-2))

    def step(params, state, i):
        updates, state = tx.update(_grads(params, i), state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, donate_argnums=(0, 1))
    state = tx.init(params)
    for i in range(4):
        params, state = step(params, state, jnp.float32(i))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    count = "skip_count" if name == "skip_on_spike" else "clip_count"
    assert int(optax.tree.get(state, count)) >= 1


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_adaptive_rules_in_masked_multisteps_and_apply_if_finite(name):
    params = _params()
    mask = {"dense": {"kernel": True, "bias": False}, "out": {"kernel": True}}
    inner = optax.chain(optax.masked(ADAPTIVE[name](), mask), optax.sgd(0.1))
    tx = optax.MultiSteps(optax.apply_if_finite(inner, 2), every_k_schedule=2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for i in range(8):
        updates, state = update(_grads(params, float(i)), state, params)
        params = optax.apply_updates(params, updates)
    assert int(optax.tree.get(state, "count")) == 4  # four emitted steps
    assert 1 <= int(optax.tree.get(state, "clip_count")) <= 3


THRESHOLD = {
    "clip_by_value": "max_abs",
    "clip_by_global_norm": "max_norm",
    "clip_by_layer_norm": "max_norm",
    "adaptive_grad_clip": "clipping",
}


@pytest.mark.parametrize("name", sorted(THRESHOLD))
def test_inject_hyperparams_changes_behaviour(name):
    chex.clear_trace_counter()
    params = _params()
    grads = _grads(params, 3.0)
    tx = optax.inject_hyperparams(getattr(jstab, name))(**{THRESHOLD[name]: 1e-3})
    update = jax.jit(chex.assert_max_traces(tx.update, n=1))
    state = tx.init(params)
    tight, state = update(grads, state, params)
    assert float(optax.tree.get(state, "clipped")) > 0
    state.hyperparams[THRESHOLD[name]] = jnp.asarray(1e6, jnp.float32)
    loose, state = update(grads, state, params)
    chex.assert_trees_all_equal(loose, grads)
    assert float(optax.tree.get(state, "clipped")) == 0
    assert int(optax.tree.get(state, "clip_count")) == 1


def test_inject_hyperparams_with_traced_ord_and_schedule():
    params = _params()
    grads = _grads(params, 3.0)
    tx = optax.inject_hyperparams(jstab.clip_by_global_norm)(
        max_norm=optax.linear_schedule(0.5, 1.0, 1), ord=jnp.inf
    )
    state = tx.init(params)
    update = jax.jit(tx.update)
    out, state = update(grads, state, params)
    linf = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))
    assert float(optax.tree.get(state, "norm")) == pytest.approx(linf, rel=1e-6)
    out_linf = max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(out))
    assert out_linf == pytest.approx(0.5, rel=1e-6)
    state.hyperparams["ord"] = jnp.asarray(2.0)
    out, state = update(grads, state, params)
    l2 = np.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads)))
    assert float(optax.tree.get(state, "norm")) == pytest.approx(l2, rel=1e-6)
    out_l2 = np.sqrt(sum(float(jnp.sum(u**2)) for u in jax.tree.leaves(out)))
    assert out_l2 == pytest.approx(1.0, rel=1e-5)  # the schedule's second value


def test_inject_hyperparams_with_bfloat16_params():
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _params())
    tx = optax.inject_hyperparams(jstab.clip_by_global_norm)(max_norm=0.1)
    grads = _grads(params, jnp.bfloat16(2.0))
    out, state = jax.jit(tx.update)(grads, tx.init(params), params)
    chex.assert_trees_all_equal_dtypes(out, params)
    assert optax.tree.get(state, "norm").dtype == jnp.float32


@pytest.mark.parametrize(
    "module",
    [
        _value,
        _global_norm,
        _layer_norm,
        _block_rms,
        _agc,
        _adagc,
        _autoclip,
        _zclip,
        _skip,
    ],
)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
