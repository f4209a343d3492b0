"""A threshold known only at run time never reverses or poisons the update.

A schedule decaying through zero, ``optax.inject_hyperparams`` or a traced
argument can make a threshold 0, negative or NaN. The effective threshold is
then max(θ, 0), NaN counting as 0: the update is zero, counted as clipped,
never reversed and never NaN, and eager and jitted runs agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jstab

BAD = [0.0, -1.0, float("nan")]

#: name: (factory, the threshold's keyword, other keywords).
RULES = {
    "clip_by_value": (jstab.clip_by_value, "max_abs", {}),
    "clip_by_global_norm": (jstab.clip_by_global_norm, "max_norm", {}),
    "clip_by_layer_norm": (jstab.clip_by_layer_norm, "max_norm", {}),
    "adaptive_grad_clip": (jstab.adaptive_grad_clip, "clipping", {}),
    "clip_by_block_rms": (jstab.clip_by_block_rms, "threshold", {}),
    "adagc warm-up": (jstab.adagc, "clipping", {}),
    "zclip max_norm": (jstab.zclip, "max_norm", {"warmup_steps": 1}),
}


def _params():
    return {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.2, -0.1])}


def _grads():
    return {"w": jnp.array([[3.0, -4.0], [1.0, 2.0]]), "b": jnp.array([-0.5, 0.25])}


def _is_zero(tree) -> bool:
    return all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("bad", BAD, ids=["zero", "negative", "nan"])
@pytest.mark.parametrize("name", list(RULES))
def test_injected_bad_threshold_gives_a_zero_update(name, bad):
    factory, key, kwargs = RULES[name]
    tx = optax.inject_hyperparams(factory)(**{key: 1.0}, **kwargs)
    params = _params()
    state = tx.init(params)
    state.hyperparams[key] = jnp.asarray(bad, jnp.float32)
    eager, eager_state = tx.update(_grads(), state, params)
    jitted, jit_state = jax.jit(tx.update)(_grads(), state, params)
    assert _is_zero(eager) and _is_zero(jitted)
    assert float(optax.tree.get(eager_state, "clipped")) > 0
    jax.tree.map(np.testing.assert_array_equal, eager_state, jit_state)


def test_a_schedule_decaying_through_zero_never_climbs_the_loss():
    # 0.5 |p|^2 with SGD: a reversed step would increase the loss.
    schedule = optax.linear_schedule(2.0, -2.0, transition_steps=4)
    tx = optax.chain(jstab.clip_by_global_norm(schedule), optax.sgd(0.5))
    params = {"p": jnp.array([3.0, -4.0])}
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(p, s))  # the gradient is p itself
    losses, clipped = [], []
    for _ in range(6):
        updates, state = step(params, state)
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
        params = optax.apply_updates(params, updates)
        losses.append(float(0.5 * jnp.sum(params["p"] ** 2)))
        clipped.append(float(optax.tree.get(state, "clipped")))
    assert all(b <= a for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] == losses[2]  # from the step where θ = 0, no move
    assert clipped == [1.0] * 6
    assert int(optax.tree.get(state, "clip_count")) == 6


def test_skip_on_spike_with_a_schedule_through_zero_skips():
    schedule = optax.linear_schedule(10.0, -10.0, transition_steps=2)
    tx = jstab.skip_on_spike(optax.sgd(1.0), max_norm=schedule)
    state = tx.init(_params())
    skipped = []
    for _ in range(4):
        out, state = jax.jit(tx.update)(_grads(), state)
        skipped.append(bool(state.skipped))
        assert skipped[-1] == _is_zero(out)
    assert skipped == [False, True, True, True]


@pytest.mark.parametrize("bad", BAD, ids=["zero", "negative", "nan"])
def test_clip_grad_norm_with_an_array_threshold_agrees_eager_and_jitted(bad):
    g = _grads()
    eager, norm = jstab.clip_grad_norm(g, jnp.asarray(bad))
    jitted, _ = jax.jit(jstab.clip_grad_norm)(g, jnp.asarray(bad))
    assert _is_zero(eager) and _is_zero(jitted)
    assert float(norm) > 0


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_a_static_bad_threshold_still_raises(bad):
    with pytest.raises(ValueError, match=r"`max_norm` must be > 0"):
        jstab.clip_grad_norm(_grads(), bad)
    with pytest.raises(ValueError, match=r"`max_norm` must be > 0"):
        jstab.clip_by_global_norm(bad)


def test_clip_by_range_empty_or_nan_at_run_time():
    tx = optax.inject_hyperparams(jstab.clip_by_range)(lower=-1.0, upper=1.0)
    state = tx.init(_params())
    state.hyperparams["lower"] = jnp.asarray(0.5)
    state.hyperparams["upper"] = jnp.asarray(-0.5)
    out, _ = jax.jit(tx.update)(_grads(), state)
    assert _is_zero(out)  # an empty range clips everything to 0
    state.hyperparams["lower"] = jnp.asarray(float("nan"))
    state.hyperparams["upper"] = jnp.asarray(1.0)
    out, _ = jax.jit(tx.update)(_grads(), state)
    np.testing.assert_array_equal(out["b"], [0.0, 0.25])  # NaN counts as 0
    np.testing.assert_array_equal(out["w"], [[1.0, 0.0], [1.0, 1.0]])


@pytest.mark.parametrize("key", ["z_thresh", "clip_factor", "eps"])
@pytest.mark.parametrize("bad", BAD, ids=["zero", "negative", "nan"])
def test_zclip_bad_hyperparameters_never_poison_its_statistics(key, bad):
    tx = optax.inject_hyperparams(jstab.zclip)(warmup_steps=2)
    state = tx.init(_params())
    for scale in [0.1, 0.12]:
        g = jax.tree.map(lambda x, s=scale: x * s, _grads())
        _, state = tx.update(g, state)
    state.hyperparams[key] = jnp.asarray(bad, jnp.float32)
    for _ in range(3):
        out, state = jax.jit(tx.update)(_grads(), state)
        for x, g in zip(jax.tree.leaves(out), jax.tree.leaves(_grads()), strict=True):
            assert bool(jnp.all(jnp.isfinite(x)))
            assert float(jnp.sum(x * g)) >= 0  # never reversed
    for field in ("mean", "var"):
        assert np.isfinite(float(optax.tree.get(state, field)))


def test_autoclip_nan_percentile_gives_a_finite_threshold():
    tx = optax.inject_hyperparams(jstab.autoclip, static_args=("history",))(history=4)
    state = tx.init(_params())
    state.hyperparams["percentile"] = jnp.asarray(float("nan"))
    out, state = jax.jit(tx.update)(_grads(), state)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
    assert np.isfinite(float(optax.tree.get(state, "threshold")))
