"""autoclip: step by step against a NumPy reference, state, errors, jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _streams import grad_of_norm, traced_once
from absl.testing import parameterized

import jstab


def _stream(n=60, seed=0):
    """Norms with spikes: mostly around 1, now and then 100x, a long run."""
    rng = np.random.default_rng(seed)
    norms = rng.uniform(0.5, 1.5, n)
    norms[rng.random(n) < 0.1] *= 100.0
    return norms.astype(np.float32)


def _reference(norms, percentile, history):
    """Plain NumPy AutoClip: thresholds and clip factors, step by step."""
    held, out = [], []
    for n in norms:
        held = ([*held, float(n)])[-history:]
        threshold = np.percentile(np.asarray(held, np.float32), percentile)
        out.append((threshold, min(1.0, threshold / n)))
    return out


class AutoClipTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(
        (10.0, 7, 60), (37.3, 5, 60), (50.0, 1, 30), (0.0, 4, 30), (100.0, 9, 30)
    )
    def test_matches_numpy_step_by_step(self, percentile, history, steps):
        # Eager steps are slow: the runs without jit stop after 12 steps,
        # still past the history.
        jitted = self.variant.type == chex.ChexVariantType.WITH_JIT
        norms = _stream(steps if jitted else 12)
        tx = jstab.autoclip(percentile, history)
        state = tx.init(grad_of_norm(0.0))
        update = self.variant(tx.update)
        clips = 0
        for t, (n, (threshold, factor)) in enumerate(
            zip(norms, _reference(norms, percentile, history), strict=True)
        ):
            g = grad_of_norm(n)
            out, state = update(g, state)
            # Bit for bit eagerly; under jit XLA may fuse the interpolation
            # into one multiply-add, rounded once instead of twice.
            np.testing.assert_array_max_ulp(
                np.float32(state.threshold), np.float32(threshold), maxulp=int(jitted)
            )
            np.testing.assert_allclose(out["a"], [n * factor], rtol=2e-6)
            np.testing.assert_array_equal(out["b"], 0.0)
            clips += bool(n > threshold)
            assert float(state.clipped) == float(n > threshold)
            assert int(state.clip_count) == clips
            assert int(state.count) == t + 1
            assert int(state.filled) == min(t + 1, history)
        np.testing.assert_allclose(state.norm, norms[-1], rtol=1e-6)

    def test_state_fields_and_shapes(self):
        tx = optax.chain(jstab.autoclip(history=16), optax.sgd(1e-3))
        state = tx.init(grad_of_norm(0.0))
        step = jax.jit(tx.update)
        for n in [1.0, 2.0, 50.0]:
            _, state = step(grad_of_norm(n), state)
        assert optax.tree.get(state, "history").shape == (16,)
        assert optax.tree.get(state, "history").dtype == jnp.float32
        # Steps 2 and 3: 2 > 1.1 (the 10th percentile of [1, 2]), 50 > 1.2.
        assert int(optax.tree.get(state, "clip_count")) == 2
        assert float(optax.tree.get(state, "clipped")) == 1.0
        np.testing.assert_allclose(optax.tree.get(state, "norm"), 50.0, rtol=1e-6)
        # 10th percentile of [1, 2, 50]: 1 + 0.2 * (2 - 1).
        np.testing.assert_allclose(optax.tree.get(state, "threshold"), 1.2, rtol=1e-6)

    def test_below_threshold_is_bitwise_identity(self):
        tx = jstab.autoclip(percentile=100.0, history=3)
        g = {
            "w": jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.bfloat16)
        }
        state = tx.init(g)
        out, state = jax.jit(tx.update)(g, state)
        assert out["w"].dtype == jnp.bfloat16
        np.testing.assert_array_equal(
            np.asarray(out["w"], np.float32), np.asarray(g["w"], np.float32)
        )
        assert int(state.clip_count) == 0

    def test_keeps_dtypes_and_accumulates_half_precision_in_float32(self):
        tx = jstab.autoclip(percentile=0.0, history=2)
        big = {"h": jnp.full((4,), 300.0, jnp.float16), "b": jnp.ones(3, jnp.bfloat16)}
        state = tx.init(big)
        _, state = tx.update(jax.tree.map(lambda x: x / 300, big), state)
        out, state = tx.update(big, state)
        assert out["h"].dtype == jnp.float16 and out["b"].dtype == jnp.bfloat16
        # 300**2 * 4 overflows float16; the norm is accumulated in float32.
        np.testing.assert_allclose(state.norm, np.sqrt(4 * 300.0**2 + 3), rtol=1e-3)
        assert np.all(np.isfinite(np.asarray(out["h"], np.float32)))
        assert float(state.clipped) == 1.0

    def test_non_finite_norm_is_not_recorded(self):
        tx = jstab.autoclip(percentile=50.0, history=4)
        state = tx.init(grad_of_norm(0.0))
        step = jax.jit(tx.update)
        for n in [1.0, 3.0]:
            _, state = step(grad_of_norm(n), state)
        _, state = step({"a": jnp.array([jnp.nan]), "b": jnp.array([1.0])}, state)
        _, state = step({"a": jnp.array([jnp.inf]), "b": jnp.array([1.0])}, state)
        assert int(state.filled) == 2 and int(state.position) == 2
        np.testing.assert_allclose(state.threshold, 2.0)
        _, state = step(grad_of_norm(5.0), state)
        np.testing.assert_allclose(state.threshold, 3.0)

    def test_first_step_non_finite_leaves_no_threshold(self):
        tx = jstab.autoclip(history=3)
        state = tx.init(grad_of_norm(0.0))
        out, state = tx.update(
            {"a": jnp.array([jnp.nan]), "b": jnp.array([1.0])}, state
        )
        assert int(state.filled) == 0 and float(state.threshold) == np.inf
        assert float(out["b"][0]) == 1.0

    def test_zero_gradient_gives_no_nan(self):
        tx = jstab.autoclip(history=3)
        state = tx.init(grad_of_norm(0.0))
        for _ in range(4):
            out, state = tx.update(grad_of_norm(0.0), state)
        assert float(state.threshold) == 0.0
        assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(out))

    def test_compiles_once(self):
        tx = jstab.autoclip(history=5)
        step = traced_once(tx)

        state = tx.init(grad_of_norm(0.0))
        for n in _stream(12):
            _, state = step(grad_of_norm(n), state)
        assert int(state.count) == 12

    def test_inject_hyperparams(self):
        norms = _stream(30)
        tx = optax.inject_hyperparams(jstab.autoclip)(percentile=37.3, history=6)
        state = tx.init(grad_of_norm(0.0))
        step = jax.jit(tx.update)
        for n, (threshold, _) in zip(norms, _reference(norms, 37.3, 6), strict=True):
            _, state = step(grad_of_norm(n), state)
            # A traced percentile computes the virtual index in float32.
            np.testing.assert_allclose(
                optax.tree.get(state, "threshold"), threshold, rtol=1e-6
            )
        state.hyperparams["percentile"] = jnp.asarray(100.0, jnp.float32)
        _, state = step(grad_of_norm(1.0), state)
        np.testing.assert_allclose(
            optax.tree.get(state, "threshold"), max(norms[-5:].max(), 1.0)
        )

    def test_jitted_init_with_static_history(self):
        tx = optax.inject_hyperparams(jstab.autoclip, static_args=("history",))(
            history=8
        )
        state = jax.jit(tx.init)(grad_of_norm(0.0))
        assert optax.tree.get(state, "history").shape == (8,)

    def test_jitted_init_with_traced_history_says_what_to_do(self):
        tx = optax.inject_hyperparams(jstab.autoclip)(history=8)
        with pytest.raises(TypeError, match="static_args"):
            jax.jit(tx.init)(grad_of_norm(0.0))

    def test_multi_steps(self):
        tx = optax.MultiSteps(jstab.autoclip(percentile=50.0, history=4), 2)
        state = tx.init(grad_of_norm(0.0))
        step = jax.jit(tx.update)
        with jax.numpy_dtype_promotion("standard"):  # MultiSteps is not strict-safe
            for n in [1.0, 3.0, 5.0, 7.0]:
                _, state = step(grad_of_norm(n), state)
        # Two inner steps, on the averages 2 and 6.
        assert int(optax.tree.get(state, "filled")) == 2
        np.testing.assert_allclose(optax.tree.get(state, "threshold"), 4.0, rtol=1e-6)

    @parameterized.parameters(
        (dict(percentile=-1.0), ValueError, "percentile"),
        (dict(percentile=100.5), ValueError, "percentile"),
        (dict(percentile="10"), TypeError, "percentile"),
        (dict(history=0), ValueError, "history"),
        (dict(history=2.5), TypeError, "history"),
        (dict(history=True), TypeError, "history"),
    )
    def test_rejects_bad_arguments(self, kwargs, error, name):
        with pytest.raises(error, match=name):
            jstab.autoclip(**kwargs)
