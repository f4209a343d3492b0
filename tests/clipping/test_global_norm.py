"""clip_by_global_norm: the torch formula, exactness, dtypes and range."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import jstab


def _tree(rng, scale=1.0):
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(0, scale, (8, 4)), jnp.float32)},
        "bias": jnp.asarray(rng.normal(0, scale, (4,)), jnp.float32),
        "conv": jnp.asarray(rng.normal(0, scale, (3, 3, 2, 4)), jnp.float32),
    }


def _torch_clip_grad_norm(leaves, max_norm, ord):
    """torch.nn.utils.clip_grad_norm_, in NumPy float64 (PyTorch adds 1e-6)."""
    flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])
    total = np.abs(flat).max() if ord == np.inf else np.sqrt(np.sum(flat**2))
    coef = min(max_norm / (total + 1e-6), 1.0)
    return [np.asarray(x, np.float64) * coef for x in leaves], total


class ClipByGlobalNormTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(2, np.inf)
    def test_matches_torch(self, ord):
        g = _tree(np.random.default_rng(0), scale=3.0)
        tx = jstab.clip_by_global_norm(1.0, ord=ord)
        out, state = self.variant(tx.update)(g, tx.init(g))
        want, total = _torch_clip_grad_norm(jax.tree.leaves(g), 1.0, ord)
        for got, w in zip(jax.tree.leaves(out), want, strict=True):
            np.testing.assert_allclose(got, w, rtol=2e-6, atol=1e-12)
        np.testing.assert_allclose(state.norm, total, rtol=1e-6)
        self.assertEqual(float(state.clipped), 1.0)
        self.assertEqual(int(state.clip_count), 1)

    @chex.variants(with_jit=True, without_jit=True)
    def test_below_and_at_threshold_bit_for_bit(self):
        g = _tree(np.random.default_rng(1))
        probe = jstab.clip_by_global_norm(1.0)
        norm = probe.update(g, probe.init(g))[1].norm  # the float32 norm itself
        for threshold in (norm * 1.5, norm):
            tx = jstab.clip_by_global_norm(threshold)
            out, state = self.variant(tx.update)(g, tx.init(g))
            chex.assert_trees_all_equal(out, g)
            self.assertEqual(float(state.clipped), 0.0)
            self.assertEqual(int(state.clip_count), 0)

    @parameterized.parameters(jnp.float16, jnp.bfloat16)
    def test_half_precision_gradients_of_300(self, dtype):
        # Optax squares in float16: 300**2 overflows and the update is zeroed.
        g = {"w": jnp.full((16,), 300.0, dtype)}
        tx = jstab.clip_by_global_norm(1.0)
        out, state = jax.jit(tx.update)(g, tx.init(g))
        self.assertEqual(out["w"].dtype, dtype)
        np.testing.assert_allclose(float(state.norm), 1200.0, rtol=1e-6)
        np.testing.assert_allclose(
            np.asarray(out["w"], np.float32), np.full(16, 0.25), rtol=1e-2
        )
        if dtype == jnp.float16:
            bad, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
            self.assertFalse(np.any(np.asarray(bad["w"], np.float32) == 0.25))

    @parameterized.parameters(1e30, 1e-30, 1e-20, 1e-17, 1e19)
    def test_extreme_magnitudes_keep_direction(self, magnitude):
        rng = np.random.default_rng(2)
        base = rng.normal(size=(50,))
        g = {"w": jnp.asarray(base * magnitude, jnp.float32)}
        tx = jstab.clip_by_global_norm(1.0)
        out, state = jax.jit(tx.update)(g, tx.init(g))
        want = np.linalg.norm(base) * magnitude
        np.testing.assert_allclose(float(state.norm), want, rtol=1e-5)
        got = np.asarray(out["w"], np.float64)
        self.assertTrue(np.all(np.isfinite(got)))
        if want > 1.0:
            np.testing.assert_allclose(got, base / np.linalg.norm(base), rtol=1e-5)
        else:
            np.testing.assert_array_equal(got, np.asarray(g["w"], np.float64))

    def test_zero_gradient(self):
        g = {"a": jnp.zeros((3, 3)), "b": jnp.zeros((), jnp.bfloat16)}
        tx = jstab.clip_by_global_norm(1.0)
        out, state = jax.jit(tx.update)(g, tx.init(g))
        chex.assert_trees_all_equal(out, g)
        self.assertEqual(float(state.norm), 0.0)

    def test_mixed_dtypes_keep_each_leaf_dtype(self):
        g = {
            "a": jnp.full((4,), 10.0, jnp.bfloat16),
            "b": jnp.full((4,), 10.0, jnp.float16),
            "c": jnp.full((4,), 10.0, jnp.float32),
        }
        tx = jstab.clip_by_global_norm(1.0)
        out, state = jax.jit(tx.update)(g, tx.init(g))
        chex.assert_trees_all_equal_dtypes(out, g)
        self.assertEqual(state.norm.dtype, jnp.float32)
        np.testing.assert_allclose(float(state.norm), np.sqrt(1200), rtol=1e-6)

    def test_float64_under_x64(self):
        with jax.enable_x64(True):
            g = {"a": jnp.full((4,), 1e200, jnp.float64)}
            tx = jstab.clip_by_global_norm(1.0)
            out, state = tx.update(g, tx.init(g))
            self.assertEqual(out["a"].dtype, jnp.float64)
            np.testing.assert_allclose(np.asarray(out["a"]), 0.5, rtol=1e-12)

    def test_nonfinite_gradient_is_not_hidden(self):
        g = {"a": jnp.array([1.0, jnp.nan])}
        tx = jstab.clip_by_global_norm(1.0)
        out, state = tx.update(g, tx.init(g))
        self.assertTrue(np.isnan(float(state.norm)))
        self.assertTrue(np.isnan(np.asarray(out["a"])[1]))

    @parameterized.parameters(0.0, -2.0, float("nan"))
    def test_bad_threshold(self, value):
        with pytest.raises(ValueError, match="max_norm"):
            jstab.clip_by_global_norm(value)

    @parameterized.parameters(1, 3, "fro", -np.inf, True)
    def test_bad_ord(self, ord):
        with pytest.raises(ValueError, match="ord"):
            jstab.clip_by_global_norm(1.0, ord=ord)

    def test_inject_hyperparams_under_strict_promotion(self):
        # inject_hyperparams turns the default ord=2 into an int32 array.
        g = {"a": jnp.array([3.0, -4.0])}
        tx = optax.inject_hyperparams(jstab.clip_by_global_norm)(max_norm=1.0)
        out, state = jax.jit(tx.update)(g, tx.init(g))
        assert state.hyperparams["ord"].dtype == jnp.int32
        np.testing.assert_allclose(out["a"], [0.6, -0.8], rtol=1e-6)
        self.assertEqual(float(optax.tree.get(state, "norm")), 5.0)

    def test_ord_as_concrete_array(self):
        g = {"a": jnp.array([3.0, -4.0])}
        tx = jstab.clip_by_global_norm(1.0, ord=jnp.asarray(jnp.inf))
        _, state = tx.update(g, tx.init(g))
        self.assertEqual(float(state.norm), 4.0)
