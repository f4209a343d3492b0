"""monitor_gradients: a pass-through that measures and judges the gradient."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

import jstab


def _grads(scale_first=1.0, n=12):
    """A Linen-like gradient whose layer names sort out of depth order."""
    rng = np.random.default_rng(0)
    layers = {}
    for i in range(n):
        s = scale_first if i == 0 else 1.0
        layers[f"Dense_{i}"] = {
            "kernel": jnp.asarray(rng.normal(size=(5, 4)) * s, jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(4,)) * s, jnp.float32),
        }
    return {"params": layers}


def _numpy_norm(x):
    return np.linalg.norm(np.asarray(x, np.float64).ravel())


class MonitorTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_norms_equal_numpy_and_updates_pass_through(self):
        g = _grads()
        tx = jstab.monitor_gradients()
        out, state = self.variant(tx.update)(g, tx.init(g))
        chex.assert_trees_all_equal(out, g)  # bit for bit
        chex.assert_trees_all_equal_structs(state.layer_norms, g)
        norms = jax.tree.leaves(state.layer_norms)
        for x, n in zip(jax.tree.leaves(g), norms, strict=True):
            self.assertEqual(n.dtype, jnp.float32)
            np.testing.assert_allclose(float(n), _numpy_norm(x), rtol=1e-6)
        want = _numpy_norm(np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]))
        np.testing.assert_allclose(float(state.global_norm), want, rtol=1e-6)
        self.assertEqual(int(state.nonfinite), 0)
        self.assertFalse(bool(state.vanishing))
        self.assertFalse(bool(state.exploding))

    def test_inside_a_chain_with_adam_updates_are_identical(self):
        g0 = _grads()
        params = jax.tree.map(jnp.zeros_like, g0)
        plain = optax.adam(1e-2)
        watched = optax.chain(jstab.monitor_gradients(), optax.adam(1e-2))

        def run(tx):
            @jax.jit
            def step(params, state, k):
                grads = jax.tree.map(lambda x: x * (1.0 + k), g0)
                with jax.numpy_dtype_promotion("standard"):
                    updates, state = tx.update(grads, state, params)
                return optax.apply_updates(params, updates), state, updates

            state, p, all_updates = tx.init(params), params, []
            for k in range(4):
                p, state, u = step(p, state, jnp.float32(k))
                all_updates.append(u)
            return all_updates, state

        want, _ = run(plain)
        got, state = run(watched)
        chex.assert_trees_all_equal(got, want)  # bit for bit, every step
        norm = optax.tree.get(state, "global_norm")
        expect = 4.0 * _numpy_norm(
            np.concatenate([np.ravel(x) for x in jax.tree.leaves(g0)])
        )
        np.testing.assert_allclose(float(norm), expect, rtol=1e-6)
        layer = optax.tree.get(state, "layer_norms")["params"]["Dense_3"]["kernel"]
        want_layer = 4.0 * _numpy_norm(g0["params"]["Dense_3"]["kernel"])
        np.testing.assert_allclose(float(layer), want_layer, rtol=1e-6)

    @parameterized.parameters(0, 11)
    def test_vanishing_does_not_depend_on_the_order_of_the_leaves(self, which):
        # Dense_10 and Dense_11 sort before Dense_2: the verdict compares the
        # smallest and largest kernel norms, wherever the leaves fall.
        g = _grads()
        g["params"][f"Dense_{which}"]["kernel"] *= 1e-4
        tx = jstab.monitor_gradients(vanishing_ratio=1e-3)
        _, state = jax.jit(tx.update)(g, tx.init(g))
        self.assertTrue(bool(state.vanishing))
        self.assertFalse(bool(state.exploding))
        _, state = jax.jit(jstab.monitor_gradients(vanishing_ratio=1e-5).update)(
            g, tx.init(g)
        )
        self.assertFalse(bool(state.vanishing))

    def test_biases_do_not_count_as_vanishing(self):
        g = _grads()
        g["params"]["Dense_4"]["bias"] = jnp.zeros((4,))
        tx = jstab.monitor_gradients()
        _, state = tx.update(g, tx.init(g))
        self.assertFalse(bool(state.vanishing))

    @chex.variants(with_jit=True, without_jit=True)
    def test_exploding_by_norm_and_by_nonfinite_elements(self):
        g = _grads()
        tx = jstab.monitor_gradients(exploding_norm=10.0)
        _, state = self.variant(tx.update)(g, tx.init(g))
        self.assertTrue(bool(state.exploding))  # global norm about 30
        bad = jax.tree.map(lambda x: x, g)
        kernel = bad["params"]["Dense_2"]["kernel"]
        bad["params"]["Dense_2"]["kernel"] = kernel.at[0, 0].set(jnp.nan)
        bad["params"]["Dense_5"]["bias"] = (
            bad["params"]["Dense_5"]["bias"].at[1].set(-jnp.inf)
        )
        tx = jstab.monitor_gradients()
        out, state = self.variant(tx.update)(bad, tx.init(bad))
        chex.assert_trees_all_equal(out, bad)
        self.assertEqual(int(state.nonfinite), 2)
        self.assertTrue(bool(state.exploding))
        self.assertFalse(bool(state.vanishing))  # non-finite norms are skipped
        self.assertTrue(np.isnan(float(state.global_norm)))

    def test_nonfinite_count_is_exact_past_float32_integers(self):
        # Leaves of up to 2**24 elements are counted in float32, bigger ones
        # in int32: 2**24 + 1 and 2**24 bad elements, and 2**25 + 2 in all,
        # would each be off by one if a float32 sum had rounded.
        n = 1 << 24
        g = {
            "big": jnp.full((n + 1,), jnp.nan, jnp.float32),
            "edge": jnp.full((n // 64, 64), -jnp.inf, jnp.float32),
            "small": jnp.array([1.0, jnp.inf, 2.0], jnp.float32),
        }
        tx = jstab.monitor_gradients()
        _, state = jax.jit(tx.update)(g, tx.init(g))
        self.assertEqual(int(state.nonfinite), 2 * n + 2)

    @parameterized.parameters(jnp.bfloat16, jnp.float16)
    def test_half_precision_is_accumulated_in_float32(self, dtype):
        # 300**2 overflows float16: the norm must not.
        g = {"w": jnp.full((10, 10), 300.0, dtype), "b": jnp.full((10,), 1.0, dtype)}
        tx = jstab.monitor_gradients()
        out, state = jax.jit(tx.update)(g, tx.init(g))
        chex.assert_trees_all_equal(out, g)
        np.testing.assert_allclose(state.layer_norms["w"], 3000.0, rtol=1e-6)
        np.testing.assert_allclose(
            state.global_norm, np.sqrt(3000.0**2 + 10), rtol=1e-6
        )
        self.assertEqual(int(state.nonfinite), 0)
        self.assertTrue(bool(state.exploding))  # 3000 > 1e3

    @parameterized.parameters(1e30, 1e-30)
    def test_extreme_float32_norms_are_accurate(self, scale):
        g = jax.tree.map(lambda x: x * jnp.float32(scale), _grads())
        tx = jstab.monitor_gradients(exploding_norm=1e38)
        _, state = jax.jit(tx.update)(g, tx.init(g))
        want = _numpy_norm(np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]))
        np.testing.assert_allclose(float(state.global_norm), want, rtol=1e-5)
        self.assertFalse(bool(state.exploding))

    def test_empty_tree_and_state_is_stable_under_jit_loops(self):
        tx = jstab.monitor_gradients()
        out, state = tx.update({}, tx.init({}))
        self.assertEqual(out, {})
        self.assertEqual(float(state.global_norm), 0.0)
        g = _grads(n=2)
        state = tx.init(g)
        _, new = jax.jit(tx.update)(g, state)
        chex.assert_trees_all_equal_shapes_and_dtypes(new, state)

    @parameterized.parameters(
        ("vanishing_ratio", 0.0),
        ("vanishing_ratio", -1.0),
        ("exploding_norm", 0.0),
        ("exploding_norm", "big"),
    )
    def test_bad_arguments_are_named(self, name, value):
        with pytest.raises((ValueError, TypeError), match=name):
            jstab.monitor_gradients(**{name: value})


DTYPES = {"float32": (jnp.float32, 30), "bfloat16": (jnp.bfloat16, 30)}
DTYPES["float16"] = (jnp.float16, 4)
SHAPES = [(), (3,), (2, 3), (4, 1, 2), (3, 3)]


@st.composite
def _trees(draw):
    """Trees of 1 to 5 leaves: mixed shapes, dtypes, magnitudes, NaN and inf."""
    tree = {}
    for i in range(draw(st.integers(1, 5))):
        dtype, decades = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
        shape = draw(st.sampled_from(SHAPES))
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        x = rng.normal(size=shape) * 10.0 ** draw(st.integers(-decades, decades))
        kind = draw(st.sampled_from(["plain", "plain", "plain", "zeros", "bad"]))
        if kind == "zeros":
            x = np.zeros(shape)
        elif kind == "bad" and x.size:
            x.flat[draw(st.integers(0, x.size - 1))] = draw(
                st.sampled_from([np.nan, np.inf, -np.inf])
            )
        tree[f"Dense_{draw(st.integers(0, 20))}_{i}"] = jnp.asarray(x, dtype)
    return tree


@settings(max_examples=40, deadline=None)
@given(_trees())
def test_property_monitor_agrees_with_numpy(tree):
    tx = jstab.monitor_gradients(vanishing_ratio=1e-2, exploding_norm=1e3)
    out, state = jax.jit(tx.update)(tree, tx.init(tree))
    chex.assert_trees_all_equal(out, tree)  # bit for bit, NaN included
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    want = [np.linalg.norm(x.ravel()) for x in leaves]
    got = [float(n) for n in jax.tree.leaves(state.layer_norms)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    everything = np.concatenate([x.ravel() for x in leaves])
    bad = int(np.sum(~np.isfinite(everything)))
    assert int(state.nonfinite) == bad
    total = np.linalg.norm(everything)
    np.testing.assert_allclose(float(state.global_norm), total, rtol=1e-5)
    assert bool(state.exploding) == (bad > 0 or total > 1e3)
    kernels = [n for n, x in zip(want, leaves, strict=True) if x.ndim >= 2]
    kernels = [n for n in kernels if np.isfinite(n)]
    vanishing = len(kernels) >= 2 and min(kernels) < 1e-2 * max(kernels)
    assert bool(state.vanishing) == vanishing
