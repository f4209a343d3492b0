"""clip_by_layer_norm: per leaf and per Flax module (Linen and NNX)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from flax import linen as nn
from flax import nnx

import jstab


def _grads():
    return {
        "params": {
            "Dense_0": {"kernel": jnp.full((4, 3), 2.0), "bias": jnp.full((3,), 2.0)},
            "Dense_1": {"kernel": jnp.full((3, 2), 0.01), "bias": jnp.zeros((2,))},
        }
    }


class ClipByLayerNormTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(2, np.inf)
    def test_per_leaf(self, ord):
        g = _grads()
        tx = jstab.clip_by_layer_norm(1.0, ord=ord)
        out, state = self.variant(tx.update)(g, tx.init(g))
        chex.assert_trees_all_equal_structs(state.norm, g)
        for x, y, n in zip(*map(jax.tree.leaves, (g, out, state.norm)), strict=True):
            x = np.asarray(x, np.float64)
            want = np.abs(x).max() if ord == np.inf else np.linalg.norm(x)
            np.testing.assert_allclose(float(n), want, rtol=1e-6)
            if want > 1.0:
                np.testing.assert_allclose(y, x / want, rtol=1e-6)
            else:
                np.testing.assert_array_equal(y, x)  # bit for bit
        self.assertEqual(float(state.clipped), 0.5)  # 2 of 4 leaves
        self.assertEqual(int(state.clip_count), 1)

    @chex.variants(with_jit=True, without_jit=True)
    def test_per_module_linen(self):
        g = _grads()
        tx = jstab.clip_by_layer_norm(1.0, per="module")
        state = tx.init(g)
        self.assertEqual(set(state.norm), {"params/Dense_0", "params/Dense_1"})
        out, state = self.variant(tx.update)(g, state)
        norm0 = np.sqrt(12 * 4 + 3 * 4)  # kernel and bias together
        np.testing.assert_allclose(state.norm["params/Dense_0"], norm0, rtol=1e-6)
        d0 = out["params"]["Dense_0"]
        np.testing.assert_allclose(d0["kernel"], 2.0 / norm0, rtol=1e-6)
        np.testing.assert_allclose(d0["bias"], 2.0 / norm0, rtol=1e-6)
        chex.assert_trees_all_equal(out["params"]["Dense_1"], g["params"]["Dense_1"])
        self.assertEqual(float(state.clipped), 0.5)

    def test_per_module_on_real_linen_and_nnx_gradients(self):
        x = jnp.ones((2, 3))
        model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(1)])
        variables = model.init(jax.random.key(0), x)
        grads = jax.grad(lambda v: jnp.sum(model.apply(v, x) ** 2))(variables)
        tx = jstab.clip_by_layer_norm(1e-3, per="module")
        _, state = tx.update(grads, tx.init(grads))
        self.assertEqual(set(state.norm), {"params/layers_0", "params/layers_2"})

        class MLP(nnx.Module):
            def __init__(self, rngs):
                self.first = nnx.Linear(3, 8, rngs=rngs)
                self.last = nnx.Linear(8, 1, rngs=rngs)

            def __call__(self, x):
                return self.last(jax.nn.relu(self.first(x)))

        mlp = MLP(nnx.Rngs(0))
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(mlp)
        params = nnx.state(mlp, nnx.Param)
        _, state = tx.update(grads, tx.init(params))
        self.assertEqual(set(state.norm), {"first", "last"})
        k = np.asarray(grads["first"]["kernel"][...])
        b = np.asarray(grads["first"]["bias"][...])
        want = np.sqrt(np.sum(k.astype(np.float64) ** 2) + np.sum(b**2.0))
        np.testing.assert_allclose(state.norm["first"], want, rtol=1e-5)

    def test_works_with_nnx_optimizer(self):
        model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
        tx = optax.chain(jstab.clip_by_layer_norm(1e-3, per="module"), optax.sgd(0.1))
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
        x = jnp.ones((4, 3))
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
        opt.update(model, grads)
        self.assertEqual(int(optax.tree.get(opt.opt_state, "clip_count")), 1)

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="per"):
            jstab.clip_by_layer_norm(1.0, per="layer")
        with pytest.raises(ValueError, match="max_norm"):
            jstab.clip_by_layer_norm(-1.0)
        with pytest.raises(ValueError, match="ord"):
            jstab.clip_by_layer_norm(1.0, ord=1)
