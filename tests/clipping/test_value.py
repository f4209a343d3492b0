"""clip_by_value and clip_by_range against the NumPy formulas."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import jstab


def _tree(rng, dtype=np.float32):
    return {
        "w": jnp.asarray(rng.normal(0, 3, (4, 5)), dtype),
        "b": jnp.asarray(rng.normal(0, 3, (5,)), dtype),
    }


class ClipByValueTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_torch_clip_grad_value(self):
        g = _tree(np.random.default_rng(0))
        tx = jstab.clip_by_value(2.0)
        out, state = self.variant(tx.update)(g, tx.init(g))
        leaves = [np.asarray(x) for x in jax.tree.leaves(g)]
        for got, x in zip(jax.tree.leaves(out), leaves, strict=True):
            # torch.nn.utils.clip_grad_value_: g.clamp_(-c, c)
            np.testing.assert_array_equal(got, np.clip(x, -2.0, 2.0))
        flat = np.concatenate([x.ravel() for x in leaves])
        self.assertEqual(float(state.norm), np.abs(flat).max())
        self.assertAlmostEqual(float(state.clipped), np.mean(np.abs(flat) > 2.0))
        self.assertEqual(int(state.clip_count), 1)
        self.assertEqual(int(state.count), 1)

    @chex.variants(with_jit=True, without_jit=True)
    def test_bound_equal_to_element_is_not_clipped(self):
        g = jnp.array([1.0, -1.0, 0.5])
        tx = jstab.clip_by_value(1.0)
        out, state = self.variant(tx.update)(g, tx.init(g))
        np.testing.assert_array_equal(out, g)
        self.assertEqual(float(state.clipped), 0.0)
        self.assertEqual(int(state.clip_count), 0)
        self.assertEqual(float(state.norm), 1.0)

    @parameterized.parameters(jnp.bfloat16, jnp.float16)
    def test_half_precision_bound_is_rounded_inward(self, dtype):
        g = jnp.array([0.5, -0.5, 0.05], dtype)
        tx = jstab.clip_by_value(0.1)  # not representable in half precision
        out, state = tx.update(g, tx.init(g))
        self.assertEqual(out.dtype, dtype)
        wide = np.asarray(out.astype(jnp.float32))
        self.assertTrue(np.all(np.abs(wide) <= 0.1))
        # the largest value of the dtype not above 0.1
        below = jnp.nextafter(jnp.asarray(0.1, dtype), jnp.asarray(0, dtype))
        hi = jnp.asarray(0.1, dtype)
        best = hi if float(hi) <= 0.1 else below
        self.assertEqual(float(out[0]), float(best))
        self.assertEqual(float(out[2]), float(g[2]))
        self.assertAlmostEqual(float(state.clipped), 2 / 3, places=6)

    def test_schedule_is_evaluated_at_the_step_count(self):
        tx = jstab.clip_by_value(optax.linear_schedule(1.0, 3.0, 2))
        g = jnp.array([5.0])
        state = tx.init(g)
        for step in range(3):
            out, state = tx.update(g, state)
            self.assertEqual(float(out[0]), 1.0 + step)
        self.assertEqual(int(state.clip_count), 3)

    def test_empty_and_zero_trees(self):
        tx = jstab.clip_by_value(1.0)
        out, state = tx.update({}, tx.init({}))
        self.assertEqual(out, {})
        self.assertEqual(float(state.norm), 0.0)
        z = {"a": jnp.zeros((3,)), "b": jnp.zeros((0, 2))}
        out, state = tx.update(z, tx.init(z))
        np.testing.assert_array_equal(out["a"], z["a"])
        self.assertEqual(float(state.norm), 0.0)
        self.assertEqual(float(state.clipped), 0.0)

    @parameterized.parameters(0.0, -1.0, float("nan"), float("inf"))
    def test_bad_bound(self, value):
        with pytest.raises(ValueError, match="max_abs"):
            jstab.clip_by_value(value)

    def test_bound_must_be_a_number(self):
        with pytest.raises(TypeError, match="max_abs"):
            jstab.clip_by_value("1")


class ClipByRangeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy_clip(self):
        g = _tree(np.random.default_rng(1))
        tx = jstab.clip_by_range(-1.0, 0.25)
        out, state = self.variant(tx.update)(g, tx.init(g))
        leaves = [np.asarray(x) for x in jax.tree.leaves(g)]
        for got, x in zip(jax.tree.leaves(out), leaves, strict=True):
            np.testing.assert_array_equal(got, np.clip(x, -1.0, 0.25))
        flat = np.concatenate([x.ravel() for x in leaves])
        outside = (flat < -1.0) | (flat > 0.25)
        self.assertAlmostEqual(float(state.clipped), outside.mean(), places=6)
        self.assertEqual(float(state.norm), np.abs(flat).max())

    def test_bounds_may_be_equal_or_one_signed(self):
        g = jnp.array([-2.0, 0.0, 3.0])
        for (lo, hi), want in [((0.5, 0.5), [0.5] * 3), ((1.0, 2.0), [1, 1, 2])]:
            tx = jstab.clip_by_range(lo, hi)
            out, _ = tx.update(g, tx.init(g))
            np.testing.assert_array_equal(out, want)

    def test_lower_above_upper(self):
        with pytest.raises(ValueError, match="lower.*upper"):
            jstab.clip_by_range(1.0, -1.0)

    def test_nonfinite_bound(self):
        with pytest.raises(ValueError, match="upper"):
            jstab.clip_by_range(0.0, float("inf"))


class CountTest(parameterized.TestCase):
    """The clipped fraction is exact whichever way leaves are reduced.

    Small leaves of one size are reduced stacked, big ones alone (several of
    one shape, each with its own copy of the bounds), and every dtype with
    its own rounding of the bounds.
    """

    @parameterized.parameters(
        (lambda lo, hi: jstab.clip_by_value(hi), (-0.7, 0.7)),
        (jstab.clip_by_range, (-0.4, 0.9)),
    )
    def test_count_over_mixed_leaves(self, rule, bounds):
        def outside(x, lo, hi):
            return (x < lo) | (x > hi)

        rng = np.random.default_rng(5)
        shapes = [(300, 70), (300, 70), (7,), (7,), (9, 3), (1,)]
        g = {
            f"{i}{d}": jnp.asarray(rng.normal(0, 1, s), d)
            for i, s in enumerate(shapes)
            for d in ("float32", "bfloat16")
        }
        tx = rule(*bounds)
        out, state = jax.jit(tx.update)(g, tx.init(g))
        n = size = 0
        top = 0.0
        for name, x in g.items():
            x = np.asarray(x.astype(jnp.float32))
            got = np.asarray(out[name].astype(jnp.float32))
            kept = ~outside(got, *bounds)
            # Bounds are rounded inward: every output lies within them.
            self.assertTrue(kept.all())
            n += outside(x, *bounds).sum()
            size += x.size
            top = max(top, np.abs(x).max())
        self.assertEqual(float(state.clipped), np.float32(n / size))
        self.assertEqual(float(state.norm), top)
