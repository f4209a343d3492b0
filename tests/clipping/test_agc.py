"""adaptive_grad_clip: output-channel units, against Optax where Optax is right."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import jstab


def _pair(shapes, seed=0, grad_scale=1.0):
    rng = np.random.default_rng(seed)
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes}
    grads = {
        k: jnp.asarray(rng.normal(size=s) * grad_scale * (1 + i), jnp.float32)
        for i, (k, s) in enumerate(shapes)
    }
    return params, grads


def _reference(g, w, clipping, eps, axes):
    """AGC in NumPy float64: unit norms over ``axes``."""
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    gn = np.sqrt(np.sum(g**2, axis=axes, keepdims=True))
    limit = clipping * np.maximum(np.sqrt(np.sum(w**2, axis=axes, keepdims=True)), eps)
    over = gn > limit
    return np.where(over, g * limit / np.where(over, gn, 1.0), g), over


class AdaptiveGradClipTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_agrees_with_optax_on_dense_and_conv2d(self):
        shapes = [("kernel", (16, 8)), ("bias", (8,)), ("conv", (3, 3, 4, 8))]
        params, grads = _pair(shapes, grad_scale=0.1)
        tx = jstab.adaptive_grad_clip(0.1)
        out, state = self.variant(tx.update)(grads, tx.init(params), params)
        ref, _ = optax.adaptive_grad_clip(0.1).update(grads, optax.EmptyState(), params)
        chex.assert_trees_all_close(out, ref, rtol=2e-6)
        self.assertGreater(float(state.clipped), 0.0)
        self.assertLess(float(state.clipped), 1.0)

    @parameterized.parameters(
        ((5, 4, 8),),  # Conv1D (w, in, out): Optax would reduce axis 0 only
        ((2, 3, 3, 4, 8),),  # Conv3D
        ((1, 8),),  # Dense with one input: Optax squeezes it into one unit
        ((8,),),
        ((),),
    )
    def test_units_are_output_channels(self, shape):
        params, grads = _pair([("w", shape)], seed=3, grad_scale=0.2)
        tx = jstab.adaptive_grad_clip(0.1)
        out, state = jax.jit(tx.update)(grads, tx.init(params), params)
        axes = tuple(range(len(shape) - 1)) if len(shape) >= 2 else None
        want, over = _reference(grads["w"], params["w"], 0.1, 1e-3, axes)
        np.testing.assert_allclose(out["w"], want, rtol=2e-6)
        self.assertAlmostEqual(float(state.clipped), over.mean(), places=6)
        g64 = np.asarray(grads["w"], np.float64)
        np.testing.assert_allclose(state.norm["w"], np.sqrt(np.sum(g64**2)), rtol=1e-6)

    def test_axis_reproduces_optax(self):
        params, grads = _pair([("w", (5, 4, 8))], seed=4, grad_scale=0.3)
        tx = jstab.adaptive_grad_clip(0.1, axis=0)
        out, _ = tx.update(grads, tx.init(params), params)
        ref, _ = optax.adaptive_grad_clip(0.1).update(grads, optax.EmptyState(), params)
        chex.assert_trees_all_close(out, ref, rtol=2e-6)
        tx = jstab.adaptive_grad_clip(0.1, axis=(0, 1))
        out, _ = tx.update(grads, tx.init(params), params)
        want, _ = _reference(grads["w"], params["w"], 0.1, 1e-3, (0, 1))
        np.testing.assert_allclose(out["w"], want, rtol=2e-6)

    def test_zero_initialised_weights_use_eps(self):
        params = {"b": jnp.zeros((4,))}
        grads = {"b": jnp.array([1.0, 0.0, 0.0, 0.0])}
        tx = jstab.adaptive_grad_clip(0.01, eps=1e-3)
        out, state = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(out["b"], [1e-5, 0, 0, 0], rtol=1e-6)
        self.assertEqual(float(state.clipped), 1.0)

    def test_zero_gradients_stay_zero(self):
        params = {"w": jnp.ones((3, 2))}
        grads = {"w": jnp.zeros((3, 2))}
        tx = jstab.adaptive_grad_clip(0.01)
        out, state = jax.jit(tx.update)(grads, tx.init(params), params)
        chex.assert_trees_all_equal(out, grads)
        self.assertEqual(float(state.norm["w"]), 0.0)
        self.assertEqual(float(state.clipped), 0.0)

    def test_half_precision(self):
        params = {"w": jnp.ones((4, 3), jnp.float16)}
        grads = {"w": jnp.full((4, 3), 300.0, jnp.float16)}
        tx = jstab.adaptive_grad_clip(0.5)
        out, state = tx.update(grads, tx.init(params), params)
        self.assertEqual(out["w"].dtype, jnp.float16)
        np.testing.assert_allclose(np.asarray(out["w"], np.float32), 0.5, rtol=1e-3)
        np.testing.assert_allclose(float(state.norm["w"]), 300 * np.sqrt(12), rtol=1e-6)

    def test_needs_params(self):
        tx = jstab.adaptive_grad_clip()
        g = {"w": jnp.ones((2, 2))}
        with pytest.raises(ValueError, match="params"):
            tx.update(g, tx.init(g))

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="clipping"):
            jstab.adaptive_grad_clip(0.0)
        with pytest.raises(ValueError, match="eps"):
            jstab.adaptive_grad_clip(0.01, eps=-1.0)
        with pytest.raises(TypeError, match="axis"):
            jstab.adaptive_grad_clip(0.01, axis="last")
        tx = jstab.adaptive_grad_clip(0.01, axis=3)
        g = {"w": jnp.ones((2, 2))}
        with pytest.raises(ValueError, match="axis"):
            tx.update(g, tx.init(g), g)
