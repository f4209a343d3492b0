"""jstab.global_norm and jstab.clip_grad_norm: NumPy, the transform, devices."""

import textwrap

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

import jstab


def _tree(rng, scale=1.0, dtype=jnp.float32):
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(0, scale, (8, 4)), dtype)},
        "bias": jnp.asarray(rng.normal(0, scale, (4,)), dtype),
        "conv": jnp.asarray(rng.normal(0, scale, (3, 3, 2, 4)), dtype),
    }


def _numpy_norm(tree, ord=2):
    """The norm in NumPy float64, of the leaves' values as stored."""
    leaves = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
    flat = np.concatenate(leaves) if leaves else np.zeros(0)
    if ord == np.inf:
        return float(np.abs(flat).max(initial=0.0))
    return float(np.sqrt(np.sum(flat**2)))


class GlobalNormTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(
        dtype=(jnp.float32, jnp.bfloat16, jnp.float16), ord=(2, np.inf)
    )
    def test_matches_numpy_float64(self, dtype, ord):
        tree = _tree(np.random.default_rng(0), scale=3.0, dtype=dtype)
        norm = self.variant(lambda t: jstab.global_norm(t, ord))(tree)
        self.assertEqual(norm.dtype, jnp.float32)
        np.testing.assert_allclose(norm, _numpy_norm(tree, ord), rtol=1e-6)

    @parameterized.parameters(jnp.float16, jnp.bfloat16)
    def test_half_precision_values_of_300(self, dtype):
        # 300**2 = 90000 overflows float16: Optax's norm of this tree is inf.
        tree = {"w": jnp.full((16,), 300.0, dtype), "b": jnp.full((3,), -300.0, dtype)}
        want = 300.0 * np.sqrt(19)
        np.testing.assert_allclose(jstab.global_norm(tree), want, rtol=1e-6)
        self.assertEqual(float(jstab.global_norm(tree, jnp.inf)), 300.0)
        if dtype == jnp.float16:
            self.assertEqual(float(optax.tree.norm(tree)), np.inf)

    @parameterized.parameters(({},), ([],), (None,), ({"a": None, "b": ()},))
    def test_empty_tree_is_zero(self, tree):
        for ord in (2, jnp.inf):
            norm = jax.jit(lambda t, o=ord: jstab.global_norm(t, o))(tree)
            self.assertEqual(norm.dtype, jnp.float32)
            self.assertEqual(float(norm), 0.0)

    def test_infinite_and_nan_elements(self):
        tree = _tree(np.random.default_rng(1))
        tree["bias"] = tree["bias"].at[2].set(-jnp.inf)
        self.assertEqual(float(jstab.global_norm(tree)), np.inf)
        self.assertEqual(float(jstab.global_norm(tree, jnp.inf)), np.inf)
        tree["bias"] = tree["bias"].at[1].set(jnp.nan)
        self.assertTrue(np.isnan(jstab.global_norm(tree)))

    @parameterized.parameters(1e30, 1e-30)
    def test_float32_at_both_ends_of_the_range(self, scale):
        # Squares of 1e30 overflow and those of 1e-30 underflow in float32.
        rng = np.random.default_rng(2)
        tree = jax.tree.map(lambda x: x * np.float32(scale), _tree(rng))
        want = _numpy_norm(tree)
        np.testing.assert_allclose(jstab.global_norm(tree), want, rtol=2e-6)

    def test_mixed_dtypes_and_array_likes(self):
        tree = {"a": jnp.ones(3, jnp.bfloat16), "b": np.full(2, 2.0, np.float32)}
        tree["c"] = 2.0  # a Python float is a leaf, as in optax.tree.norm
        norm = jstab.global_norm(tree)
        self.assertEqual(norm.dtype, jnp.float32)
        np.testing.assert_allclose(norm, np.sqrt(3 + 8 + 4), rtol=1e-7)

    def test_float64_under_x64(self):
        with jax.enable_x64(True):
            tree = {"a": jnp.full(3, 1 / 3, jnp.float64), "b": jnp.ones(2, jnp.float16)}
            norm = jstab.global_norm(tree)
            self.assertEqual(norm.dtype, jnp.float64)
            self.assertEqual(float(norm), float(np.sqrt(3 * (1 / 3) ** 2 + 2)))

    def test_traced_ord_selects_at_run_time(self):
        tree = _tree(np.random.default_rng(3))
        f = jax.jit(jstab.global_norm)
        self.assertEqual(
            float(f(tree, jnp.inf)), float(jstab.global_norm(tree, np.inf))
        )
        self.assertEqual(float(f(tree, 2.0)), float(jstab.global_norm(tree)))

    @parameterized.parameters(1, 3, "fro", True, None)
    def test_bad_ord(self, ord):
        with self.assertRaisesRegex(ValueError, "`ord` must be 2 or jnp.inf"):
            jstab.global_norm({"a": jnp.ones(2)}, ord)

    @parameterized.parameters(jnp.int32, jnp.bool_, jnp.complex64)
    def test_non_float_leaf_is_named(self, dtype):
        tree = {"ok": jnp.ones(2), "step": {"n": jnp.zeros(2, dtype)}}
        with self.assertRaisesRegex(TypeError, r"\['step'\]\['n'\] has dtype"):
            jstab.global_norm(tree)
        with self.assertRaisesRegex(TypeError, "`grads` must hold floating-point"):
            jstab.clip_grad_norm(tree, 1.0)


def _transform(grads, max_norm, ord=2):
    tx = jstab.clip_by_global_norm(max_norm, ord)
    out, state = tx.update(grads, tx.init(grads))
    return out, state.norm


class ClipGradNormTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(
        dtype=(jnp.float32, jnp.bfloat16, jnp.float16),
        ord=(2, np.inf),
        max_norm=(0.5, 1e4),
    )
    def test_equals_the_transform_bit_for_bit(self, dtype, ord, max_norm):
        grads = _tree(np.random.default_rng(4), scale=3.0, dtype=dtype)
        grads["extra"] = jnp.full((5,), 0.25, jnp.float32)
        clip = self.variant(lambda g: jstab.clip_grad_norm(g, max_norm, ord))
        got = clip(grads)
        want = self.variant(lambda g: _transform(g, max_norm, ord))(grads)
        chex.assert_trees_all_equal(got, want)
        chex.assert_trees_all_equal_dtypes(got[0], grads)
        if max_norm == 1e4:  # below the threshold: the very same bits
            chex.assert_trees_all_equal(got[0], grads)

    def test_matches_torch_formula(self):
        # torch.nn.utils.clip_grad_norm_ in float64 (it adds 1e-6 to the norm).
        grads = _tree(np.random.default_rng(5), scale=3.0)
        out, norm = jstab.clip_grad_norm(grads, 1.0)
        total = _numpy_norm(grads)
        np.testing.assert_allclose(norm, total, rtol=1e-6)
        for got, g in zip(jax.tree.leaves(out), jax.tree.leaves(grads), strict=True):
            want = np.asarray(g, np.float64) * min(1.0 / (total + 1e-6), 1.0)
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)

    def test_traced_and_array_thresholds_agree(self):
        grads = _tree(np.random.default_rng(6), scale=2.0)
        want = jstab.clip_grad_norm(grads, 0.75)
        chex.assert_trees_all_equal(jax.jit(jstab.clip_grad_norm)(grads, 0.75), want)
        chex.assert_trees_all_equal(
            jstab.clip_grad_norm(grads, jnp.asarray(0.75, jnp.float32)), want
        )

    def test_half_precision_values_of_300(self):
        grads = {"w": jnp.full((16,), 300.0, jnp.float16)}
        out, norm = jstab.clip_grad_norm(grads, 1.0)
        self.assertEqual(float(norm), 1200.0)
        self.assertEqual(out["w"].dtype, jnp.float16)
        np.testing.assert_allclose(out["w"].astype(np.float32), 0.25, rtol=1e-3)

    def test_empty_tree(self):
        out, norm = jstab.clip_grad_norm({"a": {}, "b": None}, 1.0)
        self.assertEqual(out, {"a": {}, "b": None})
        self.assertEqual(float(norm), 0.0)

    def test_zero_gradient_stays_zero(self):
        grads = {"w": jnp.zeros((3, 2))}
        out, norm = jstab.clip_grad_norm(grads, 1.0)
        chex.assert_trees_all_equal(out, grads)
        self.assertEqual(float(norm), 0.0)

    @parameterized.parameters(0.0, -1.0, np.nan, np.inf)
    def test_bad_threshold_value(self, max_norm):
        with self.assertRaisesRegex(ValueError, "`max_norm` must be"):
            jstab.clip_grad_norm({"a": jnp.ones(2)}, max_norm)

    def test_bad_threshold_type(self):
        grads = {"a": jnp.ones(2)}
        with self.assertRaisesRegex(TypeError, "for a schedule use"):
            jstab.clip_grad_norm(grads, optax.constant_schedule(1.0))
        with self.assertRaisesRegex(TypeError, "scalar"):
            jstab.clip_grad_norm(grads, jnp.ones(2))
        with self.assertRaisesRegex(TypeError, "scalar"):
            jax.jit(jstab.clip_grad_norm)(grads, jnp.ones(2))
        with self.assertRaisesRegex(TypeError, "real number"):
            jstab.clip_grad_norm(grads, "1.0")


@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        st.integers(1, 40),
        elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=False),
    ),
    max_norm=st.floats(1e-3, 1e3),
)
def test_clipped_norm_and_direction(x, max_norm):
    grads = {"a": jnp.asarray(x), "b": jnp.asarray(x[::-1] * 0.5)}
    out, norm = jstab.clip_grad_norm(grads, max_norm)
    clipped = float(jstab.global_norm(out))
    assert np.isfinite(clipped)
    assert clipped <= max_norm * (1 + 1e-6)  # a few float32 roundings
    if float(norm) > 0:
        for g, o in zip(jax.tree.leaves(grads), jax.tree.leaves(out), strict=True):
            # The same direction: o = f * g with one factor f in (0, 1].
            np.testing.assert_allclose(
                o, g * min(1.0, max_norm / float(norm)), rtol=2e-6, atol=1e-30
            )


SHARDED = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, jstab
    from jax.sharding import NamedSharding, PartitionSpec as P

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("d",))
    shard = NamedSharding(mesh, P("d"))
    rng = np.random.default_rng(0)
    base = {"w": rng.normal(size=(64, 3)), "b": rng.normal(size=(16,)) * 3}

    def close(a, b):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            assert x.dtype == y.dtype, (x.dtype, y.dtype)
            np.testing.assert_allclose(np.float64(x), np.float64(y), rtol=2e-6)

    for dtype in (jnp.float32, jnp.bfloat16):
        for scale, ord in [(1.0, 2), (1e30, 2), (1e-30, 2), (1.0, jnp.inf)]:
            if dtype == jnp.bfloat16 and scale != 1.0:
                continue
            g = jax.tree.map(lambda x: jnp.asarray(x * scale, dtype), base)
            want_norm = jstab.global_norm(g, ord)
            want = jstab.clip_grad_norm(g, 1.0, ord)
            gs = jax.device_put(g, shard)

            # Under jit with sharded arrays: the norm is global already.
            close(jax.jit(lambda t: jstab.global_norm(t, ord))(gs), want_norm)
            got = jax.jit(lambda t: jstab.clip_grad_norm(t, 1.0, ord))(gs)
            close(got, want)
            assert got[0]["w"].sharding.is_equivalent_to(shard, 2)

            # Inside shard_map, axis_name combines the slices' partial norms.
            def local(t):
                return (jstab.global_norm(t, ord, axis_name="d"),
                        jstab.clip_grad_norm(t, 1.0, ord, axis_name="d"))

            f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("d"),),
                                      out_specs=(P(), (P("d"), P()))))
            norm, clipped = f(gs)
            close(norm, want_norm)
            close(clipped, want)
    print("ok")
    """
)


def test_eight_devices_give_the_one_device_results(run_on_eight_devices):
    run_on_eight_devices(SHARDED)
