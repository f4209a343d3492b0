"""monitor_updates: a pass-through that measures each update against its params."""

import doctest

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _models import LinenMLP, batch, nnx_training
from flax import nnx
from flax.training import train_state

import jstab
from jstab.diagnostics import _updates


def _norm64(x):
    return np.linalg.norm(np.asarray(x, np.float64).ravel())


def _linen_problem():
    """A 3-layer Linen MLP (its biases start at 0) and its gradient function."""
    model = LinenMLP(depth=3, width=8)
    x = batch((16, 4))
    params = model.init(jax.random.key(0), x)["params"]

    def grads(params, k):
        def loss(p):
            return jnp.mean((model.apply({"params": p}, x) - k) ** 2)

        return jax.grad(loss)(params)

    return model, x, params, grads


def _frozen_zero(params):
    """``params`` with Dense_1's bias held at 0, as a frozen layer would be."""
    out = jax.tree.map(lambda x: x, params)
    out["Dense_1"]["bias"] = jnp.zeros_like(out["Dense_1"]["bias"])
    return out


def _train(tx, steps=4):
    """Jitted steps; each step's params (before it), updates and state."""
    _, _, params, grads = _linen_problem()
    params = _frozen_zero(params)

    @jax.jit
    def step(params, state, k):
        updates, state = tx.update(grads(params, k), state, params)
        return _frozen_zero(optax.apply_updates(params, updates)), updates, state

    state, seen = tx.init(params), []
    for k in range(steps):
        new_params, updates, state = step(params, state, jnp.float32(k))
        seen.append((params, updates, state))
        params = new_params
    return seen


def test_norms_and_ratios_equal_float64_numpy_at_every_step():
    tx = optax.chain(optax.adam(1e-2), jstab.monitor_updates())
    seen = _train(tx)
    for step, (params, updates, state) in enumerate(seen):
        s = state[1]
        chex.assert_trees_all_equal_structs(s.update_norms, params)
        p_leaves = [_norm64(x) for x in jax.tree.leaves(params)]
        u_leaves = [_norm64(x) for x in jax.tree.leaves(updates)]
        got = zip(
            jax.tree.leaves(s.update_norms),
            jax.tree.leaves(s.param_norms),
            jax.tree.leaves(s.update_ratio),
            strict=True,
        )
        for (un, pn, r), u, p in zip(got, u_leaves, p_leaves, strict=True):
            assert un.dtype == pn.dtype == r.dtype == jnp.float32
            assert un.shape == pn.shape == r.shape == ()
            assert u > 0  # every leaf moves, the frozen one's update included
            np.testing.assert_allclose(float(un), u, rtol=1e-6)
            np.testing.assert_allclose(float(pn), p, rtol=1e-6)
            np.testing.assert_allclose(float(r), u / p if p > 0 else 0.0, rtol=1e-6)
        frozen = s.update_ratio["Dense_1"]["bias"]
        assert float(s.param_norms["Dense_1"]["bias"]) == 0.0
        assert float(frozen) == 0.0  # not inf, not NaN
        # At the first step every bias is at its Linen init, 0.
        zero_bias = float(s.update_ratio["Dense_0"]["bias"]) == 0.0
        assert zero_bias == (step == 0)
        all_u = np.concatenate([np.ravel(x) for x in jax.tree.leaves(updates)])
        all_p = np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])
        assert s.global_update_norm.dtype == s.global_param_norm.dtype == jnp.float32
        np.testing.assert_allclose(
            float(s.global_update_norm), _norm64(all_u), rtol=1e-6
        )
        np.testing.assert_allclose(
            float(s.global_param_norm), _norm64(all_p), rtol=1e-6
        )


def test_param_norms_are_of_the_params_before_the_update():
    seen = _train(optax.chain(optax.sgd(0.5), jstab.monitor_updates()), steps=2)
    (p0, u0, s0), (p1, _, s1) = seen
    kernel = ("Dense_2", "kernel")
    before, after = p0[kernel[0]][kernel[1]], p1[kernel[0]][kernel[1]]
    assert _norm64(before) != pytest.approx(_norm64(after), rel=1e-4)
    np.testing.assert_allclose(
        float(s0[1].param_norms[kernel[0]][kernel[1]]), _norm64(before), rtol=1e-6
    )
    np.testing.assert_allclose(
        float(s1[1].param_norms[kernel[0]][kernel[1]]), _norm64(after), rtol=1e-6
    )


def test_updates_pass_through_bit_for_bit():
    plain = _train(optax.adam(1e-2))
    watched = _train(optax.chain(optax.adam(1e-2), jstab.monitor_updates()))
    for (pa, ua, _), (pb, ub, _) in zip(plain, watched, strict=True):
        chex.assert_trees_all_equal(ub, ua)
        chex.assert_trees_all_equal(pb, pa)


def test_direct_update_returns_the_same_arrays_and_records_no_gradient():
    tx = jstab.monitor_updates()
    params = {"w": jnp.array([3.0, 4.0]), "b": jnp.zeros(2)}
    updates = {"w": jnp.array([0.3, 0.0]), "b": jnp.array([0.1, 0.1])}
    state = tx.init(params)
    out, new = tx.update(updates, state, params)
    chex.assert_trees_all_equal(out, updates)
    np.testing.assert_allclose(new.update_ratio["w"], 0.06, rtol=1e-6)

    def recorded(u, p):
        s = tx.update(u, state, p)[1]
        return s.global_update_norm + s.update_ratio["w"] + s.param_norms["w"]

    gu, gp = jax.grad(recorded, argnums=(0, 1))(updates, params)
    chex.assert_trees_all_equal(gu, jax.tree.map(jnp.zeros_like, updates))
    chex.assert_trees_all_equal(gp, jax.tree.map(jnp.zeros_like, params))
    passed = jax.grad(lambda u: jnp.sum(tx.update(u, state, params)[0]["w"] * 2.0))
    np.testing.assert_array_equal(passed(updates)["w"], [2.0, 2.0])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_is_accumulated_in_float32(dtype):
    # 100 elements of 300: a sum of squares of 9e6 overflows float16.
    params = {"w": jnp.full((10, 10), 300.0, dtype), "b": jnp.zeros((10,), dtype)}
    updates = {"w": jnp.full((10, 10), 3.0, dtype), "b": jnp.full((10,), 2.0, dtype)}
    tx = jstab.monitor_updates()
    out, state = jax.jit(tx.update)(updates, tx.init(params), params)
    chex.assert_trees_all_equal(out, updates)  # same values, same dtypes
    assert all(x.dtype == dtype for x in jax.tree.leaves(out))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state))
    np.testing.assert_allclose(state.param_norms["w"], 3000.0, rtol=1e-6)
    np.testing.assert_allclose(state.update_norms["w"], 30.0, rtol=1e-6)
    np.testing.assert_allclose(state.update_ratio["w"], 0.01, rtol=1e-6)
    np.testing.assert_allclose(state.update_norms["b"], np.sqrt(40.0), rtol=1e-6)
    assert float(state.update_ratio["b"]) == 0.0
    np.testing.assert_allclose(state.global_param_norm, 3000.0, rtol=1e-6)
    np.testing.assert_allclose(
        state.global_update_norm, np.sqrt(900.0 + 40.0), rtol=1e-6
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_params_in_a_chain_keep_their_dtype(dtype):
    params = {"w": jnp.full((4, 4), 300.0, dtype), "b": jnp.zeros((4,), dtype)}
    grads = {"w": jnp.full((4, 4), 1.0, dtype), "b": jnp.full((4,), -1.0, dtype)}
    tx = optax.chain(optax.sgd(0.5), jstab.monitor_updates())
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    chex.assert_trees_all_equal_dtypes(updates, params)
    np.testing.assert_allclose(state[1].update_norms["w"], 2.0, rtol=1e-6)
    np.testing.assert_allclose(state[1].param_norms["w"], 1200.0, rtol=1e-6)


def _params():
    return {
        "Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
        "Dense_1": {"kernel": jnp.ones((2, 1))},
    }


def test_update_without_params_is_an_error():
    tx = optax.chain(optax.adam(1e-3), jstab.monitor_updates())
    state = tx.init(_params())
    with pytest.raises(ValueError, match="params"):
        tx.update(_params(), state)
    with pytest.raises(ValueError, match="params"):
        jax.jit(tx.update)(_params(), state)


# A tree other than init's, and params other than the updates: tests/test_trust.py.


def test_nnx_optimizer():
    tx = optax.chain(optax.adam(1e-2), jstab.monitor_updates())
    model, _, step = nnx_training(tx)

    def flat_params():
        return {
            "/".join(map(str, path)): np.asarray(v[...], np.float64)
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
        }

    before = flat_params()

    stats = step()
    after = flat_params()
    layers = ["head/bias", "head/kernel", "layers/0/bias", "layers/0/kernel"]
    assert sorted(before) == layers
    for field in ("update_norms", "param_norms", "update_ratio"):
        assert sorted(k for k in stats if f"/{field}/" in k) == [
            f"monitor_updates/{field}/{name}" for name in layers
        ]
    for name in layers:
        assert stats[f"monitor_updates/param_norms/{name}"].dtype == jnp.float32
        np.testing.assert_allclose(
            stats[f"monitor_updates/param_norms/{name}"],
            _norm64(before[name]),
            rtol=1e-6,
        )
        # The step the optimizer took, to the rounding of float32 p + u.
        np.testing.assert_allclose(
            stats[f"monitor_updates/update_norms/{name}"],
            _norm64(after[name] - before[name]),
            rtol=1e-4,
        )
    assert float(stats["monitor_updates/update_ratio/head/bias"]) == 0.0  # bias 0
    assert float(stats["monitor_updates/update_norms/head/bias"]) > 0.0
    np.testing.assert_allclose(
        stats["monitor_updates/global_param_norm"],
        np.sqrt(sum(_norm64(v) ** 2 for v in before.values())),
        rtol=1e-6,
    )


def test_linen_train_state():
    model, x, params, grads = _linen_problem()
    tx = optax.chain(optax.adam(1e-2), jstab.monitor_updates())
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    new = jax.jit(lambda s: s.apply_gradients(grads=grads(s.params, 1.0)))(state)
    stats = jstab.statistics(new.opt_state)
    layers = [f"Dense_{i}/{leaf}" for i in range(3) for leaf in ("bias", "kernel")]
    assert list(stats) == (
        [f"monitor_updates/update_norms/{name}" for name in layers]
        + [f"monitor_updates/param_norms/{name}" for name in layers]
        + [f"monitor_updates/update_ratio/{name}" for name in layers]
        + ["monitor_updates/global_update_norm", "monitor_updates/global_param_norm"]
    )
    kernel = params["Dense_1"]["kernel"]
    np.testing.assert_allclose(
        stats["monitor_updates/param_norms/Dense_1/kernel"], _norm64(kernel), rtol=1e-6
    )
    step = new.params["Dense_1"]["kernel"] - kernel
    np.testing.assert_allclose(
        stats["monitor_updates/update_norms/Dense_1/kernel"], _norm64(step), rtol=1e-4
    )


def test_docstring_example():
    result = doctest.testmod(_updates, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
