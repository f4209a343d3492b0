"""upcast: Adam on float16 parameters is finite, and is exactly Adam run in
float32 and cast back; updates keep each parameter's dtype, the state is
float32, wider and non-floating leaves pass as they are."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jstab

f16, bf16, f32 = jnp.float16, jnp.bfloat16, jnp.float32


def _dtypes(tree):
    return None if tree is None else jax.tree.map(lambda x: jnp.dtype(x.dtype), tree)


def _recording():
    """An identity transformation that records the dtypes it is given."""
    seen = {}

    def init(params):
        seen["init"] = _dtypes(params)
        return optax.EmptyState()

    def update(updates, state, params=None):
        seen["updates"], seen["params"] = _dtypes(updates), _dtypes(params)
        return updates, state

    return optax.GradientTransformation(init, update), seen


def _wide(tree):
    return jax.tree.map(lambda x: x.astype(f32), tree)


# ------------------------------------------------------------ optax issue 1754


def _half_stream(n=20, seed=0):
    """float16 gradients: element 0 is zero at every step, and every fifth
    step is zero everywhere."""
    rng = np.random.default_rng(seed)
    for t in range(n):
        g = rng.normal(scale=1e-2, size=(2, 4))
        g[0, 0] = 0.0
        yield {"w": jnp.asarray(g * (t % 5 != 4), f16)}


def test_plain_adam_on_float16_gives_nan_and_upcast_does_not():
    params = {"w": jnp.ones((2, 4), f16)}
    plain = optax.adam(1e-3)
    state = plain.init(params)
    out, _ = jax.jit(plain.update)(next(_half_stream()), state, params)
    assert np.isnan(np.asarray(out["w"][0, 0]))  # 0 / (sqrt(0) + eps -> 0)

    nan_steps = 0
    for g in _half_stream():
        out, state = jax.jit(plain.update)(g, state, params)
        nan_steps += bool(jnp.any(jnp.isnan(out["w"])))
    assert nan_steps == 20

    tx = jstab.upcast(optax.adam(1e-3))
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t, g in enumerate(_half_stream()):
        out, state = step(g, state, params)
        assert out["w"].dtype == f16
        assert bool(jnp.all(jnp.isfinite(out["w"]))), t
        assert float(out["w"][0, 0]) == 0.0, t
        if t % 5 == 4:  # a zero-gradient step after nonzero ones: momentum
            assert bool(jnp.any(out["w"] != 0)), t
        params = optax.apply_updates(params, out)
        assert params["w"].dtype == f16
    assert bool(jnp.all(jnp.isfinite(params["w"])))
    assert float(params["w"][0, 0]) == 1.0
    assert bool(jnp.any(params["w"] != 1.0))


# ----------------------------------------------- exactly Adam in float32


@pytest.mark.parametrize("dtype", [f16, bf16])
def test_equals_adam_on_float32_copies_bit_for_bit(dtype):
    rng = np.random.default_rng(1)
    params = {
        "w": jnp.asarray(rng.normal(size=(3, 5)), dtype),
        "b": jnp.asarray(rng.normal(size=5), dtype),
    }
    tx = jstab.upcast(optax.adam(1e-2))
    ref = optax.adam(1e-2)
    state, ref_state = tx.init(params), ref.init(_wide(params))
    step, ref_step = jax.jit(tx.update), jax.jit(ref.update)
    for t in range(8):
        g = jax.tree.map(
            lambda p: jnp.asarray(rng.normal(scale=0.1, size=p.shape), dtype), params
        )
        if t == 5:
            g["b"] = jnp.zeros(5, dtype)
        out, state = step(g, state, params)
        want, ref_state = ref_step(_wide(g), ref_state, _wide(params))
        for k in params:
            assert out[k].dtype == dtype
            np.testing.assert_array_equal(out[k], want[k].astype(dtype), err_msg=k)
        jax.tree.map(np.testing.assert_array_equal, state.inner_state, ref_state)
        params = optax.apply_updates(params, out)


# ----------------------------------------------------------------- dtypes


def test_updates_in_param_dtype_and_adam_moments_in_float32():
    params = {
        "h": jnp.ones(3, f16),
        "b": jnp.ones(3, bf16),
        "f": jnp.ones(3, f32),
    }
    tx = jstab.upcast(optax.adam(1e-3))
    state = tx.init(params)
    adam = state.inner_state[0]
    for moment in (adam.mu, adam.nu):
        assert _dtypes(moment) == {k: jnp.dtype(f32) for k in params}
    step = jax.jit(tx.update)
    state_dtypes = _dtypes(state)
    for grads in (params, _wide(params)):  # float32 gradients too
        for _ in range(3):
            out, state = step(grads, state, params)
            assert _dtypes(out) == _dtypes(params)
            assert _dtypes(state) == state_dtypes


def test_inner_sees_float32_and_other_leaves_pass_as_they_are():
    inner, seen = _recording()
    params = {
        "h": jnp.ones(3, f16),
        "b": jnp.ones(3, bf16),
        "f": jnp.ones(3, f32),
        "i": jnp.ones(3, jnp.int32),
    }
    tx = jstab.upcast(inner)
    state = tx.init(params)
    out, _ = tx.update(params, state, params)
    wide = {"h": f32, "b": f32, "f": f32, "i": jnp.int32}
    wide = {k: jnp.dtype(d) for k, d in wide.items()}
    assert seen["init"] == seen["updates"] == seen["params"] == wide
    assert _dtypes(out) == _dtypes(params)
    np.testing.assert_array_equal(out["i"], params["i"])


def test_float64_leaves_pass_through_under_x64():
    with jax.enable_x64(True):
        params = {"d": jnp.ones(3, jnp.float64), "h": jnp.ones(3, f16)}
        inner, seen = _recording()
        tx = jstab.upcast(inner)
        out, _ = tx.update(params, tx.init(params), params)
        assert seen["updates"] == {"d": jnp.dtype(jnp.float64), "h": jnp.dtype(f32)}
        assert _dtypes(out) == _dtypes(params)

        tx = jstab.upcast(optax.adam(1e-3))
        state = tx.init(params)
        out, state = jax.jit(tx.update)(params, state, params)
        assert _dtypes(out) == _dtypes(params)
        assert _dtypes(state.inner_state[0].mu) == {
            "d": jnp.dtype(jnp.float64),
            "h": jnp.dtype(f32),
        }

        inner, seen = _recording()
        tx = jstab.upcast(inner, dtype=jnp.float64)
        out, _ = tx.update(params, tx.init(params), params)
        assert seen["updates"] == {
            "d": jnp.dtype(jnp.float64),
            "h": jnp.dtype(jnp.float64),
        }
        assert _dtypes(out) == _dtypes(params)


def test_bfloat16_target_casts_only_narrower_leaves():
    # float16 has bfloat16's itemsize: it is not narrower, so it is not cast;
    # nor is float32 narrowed.
    inner, seen = _recording()
    params = {"h": jnp.ones(3, f16), "b": jnp.ones(3, bf16), "f": jnp.ones(3, f32)}
    tx = jstab.upcast(inner, dtype=bf16)
    out, _ = tx.update(params, tx.init(params), params)
    assert seen["updates"] == _dtypes(params) == seen["init"]
    assert _dtypes(out) == _dtypes(params)

    tx = jstab.upcast(optax.adam(1e-3), dtype=bf16)
    assert _dtypes(tx.init(params).inner_state[0].mu) == _dtypes(params)


def test_without_params_updates_keep_the_gradient_dtypes():
    grads = {"h": jnp.full(3, 0.5, f16), "b": jnp.full(3, 0.5, bf16), "f": jnp.ones(2)}
    tx = jstab.upcast(optax.sgd(0.5))
    state = tx.init(grads)
    out, _ = jax.jit(tx.update)(grads, state)
    assert _dtypes(out) == _dtypes(grads)
    for k in grads:
        np.testing.assert_array_equal(
            np.asarray(out[k], np.float32), -0.5 * np.asarray(grads[k], np.float32)
        )
    inner, seen = _recording()
    tx = jstab.upcast(inner)
    tx.update(grads, tx.init(grads))
    assert seen["params"] is None
    assert seen["updates"] == {k: jnp.dtype(f32) for k in grads}


# ---------------------------------------------------- MultiSteps, bad dtype


def test_multisteps_inner():
    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(rng.normal(size=(2, 3)), f16)}
    tx = jstab.upcast(optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2))
    ref = optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2)
    state, ref_state = tx.init(params), ref.init(_wide(params))
    assert _dtypes(state.inner_state.acc_grads) == {"w": jnp.dtype(f32)}
    assert _dtypes(state.inner_state.inner_opt_state[0].nu) == {"w": jnp.dtype(f32)}
    step, ref_step = jax.jit(tx.update), jax.jit(ref.update)
    for t in range(6):
        g = {"w": jnp.asarray(rng.normal(scale=0.1, size=(2, 3)), f16)}
        g["w"] = g["w"].at[0, 0].set(0)
        out, state = step(g, state, params)
        want, ref_state = ref_step(_wide(g), ref_state, _wide(params))
        assert out["w"].dtype == f16
        assert bool(jnp.all(jnp.isfinite(out["w"])))
        np.testing.assert_array_equal(out["w"], want["w"].astype(f16))
        assert bool(jnp.any(out["w"] != 0)) == (t % 2 == 1)
        params = optax.apply_updates(params, out)
    assert int(state.inner_state.gradient_step) == 3


@pytest.mark.parametrize("dtype", [jnp.int32, "foo", None, jnp.bool_])
def test_bad_dtype_raises(dtype):
    with pytest.raises(TypeError, match="dtype"):
        jstab.upcast(optax.adam(1e-3), dtype=dtype)


def test_inner_that_is_not_a_transformation_raises():
    with pytest.raises(TypeError, match="inner"):
        jstab.upcast(object())


# ---------------------------------------------- with dynamic loss scaling


def test_loss_scaled_upcast_adam_trains_float16_regression():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(64, 4)), f16)
    y = (np.asarray(x, np.float32) @ np.array([1.0, -2.0, 0.5, 3.0]) + 0.5).astype(
        np.float32
    )
    params = {"w": jnp.zeros(4, f16), "b": jnp.zeros((), f16)}
    tx = jstab.dynamic_loss_scale(jstab.upcast(optax.adam(0.1)))
    state = tx.init(params)

    def loss(p):
        out = (x @ p["w"] + p["b"]).astype(f32)
        return jnp.mean(jnp.square(out - y))

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(lambda p: jstab.scale_loss(loss(p), state))(
            params
        )
        out, state = tx.update(grads, state, params)
        return optax.apply_updates(params, out), state, loss(params)

    losses = []
    for _ in range(30):
        params, state, value = step(params, state)
        losses.append(float(value))
        assert _dtypes(params) == {"w": jnp.dtype(f16), "b": jnp.dtype(f16)}
        assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
    final = float(loss(params))
    assert np.all(np.isfinite(losses))
    # 2**15 times this loss overflows float16 at first: steps are skipped
    # and the scale backs off, then training proceeds.
    assert 1 <= int(state.skip_count) < 15
    assert final < 0.1 * losses[0]
