"""clip_by_block_rms: Optax's test, a float64 reference, and Optax's outputs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _streams import traced_once
from absl.testing import absltest, parameterized
from jax.test_util import check_grads

from jstab._numerics import ClipState
from jstab.clipping._block_rms import ClipByBlockRmsState, clip_by_block_rms

STEPS = 50


class OptaxClippingTest(absltest.TestCase):
    """``test_clip_by_block_rms`` of Optax's ``transforms/_clipping_test.py``.

    The same updates, assertions and tolerances, run against jstab's
    transform (its state from ``init``) and against Optax's rule, recording
    which assertions fail rather than stopping at the first.

    One assertion fails for Optax's own rule on XLA:CPU: at step 1 (θ = 1)
    the RMS of ``[500, 5] / 353.57108`` comes out 1 - 2**-23, outside
    ``assertAlmostEqual``'s 5e-8 (half an ulp of 1). XLA compiles Optax's
    ``u / max(1, rms/θ)`` as ``u * (1 / max(1, rms/θ))``, each element an ulp
    below the correctly rounded quotient. At θ = 1 jstab's arithmetic is
    the same, so it fails that assertion with the same values, and passes
    every other.
    """

    def setUp(self):
        super().setUp()
        self.init_params = (jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0]))
        self.per_step_updates = (
            jnp.array([500.0, 5.0]),
            jnp.array([300.0, 3.0]),
        )

    def _failures(self, rule):
        """Optax's test body with ``rule``: the failed assertions, by step."""
        failures = []

        def check(step, what, assertion, *args):
            try:
                assertion(*args)
            except AssertionError as error:
                failures.append((step, what, str(error)))

        rmf_fn = lambda t: jnp.sqrt(jnp.mean(t**2))  # noqa: E731
        updates = self.per_step_updates
        for i in range(1, STEPS + 1):
            clipper = rule(1.0 / i)
            # Check that the clipper actually works and block rms is <= threshold
            updates, _ = clipper.update(updates, clipper.init(updates))
            check(i, "rms 0", self.assertAlmostEqual, rmf_fn(updates[0]), 1.0 / i)
            check(i, "rms 1", self.assertAlmostEqual, rmf_fn(updates[1]), 1.0 / i)
            # Check that continuously clipping won't cause numerical issues.
            updates_step, _ = clipper.update(
                self.per_step_updates, clipper.init(self.per_step_updates)
            )
            check(i, "step", chex.assert_trees_all_close, updates, updates_step)
        return failures

    def test_clip_by_block_rms(self):
        failures = self._failures(clip_by_block_rms)
        # Exactly where Optax's own rule fails, with the same message (the
        # same values), and nowhere else.
        self.assertEqual(failures, self._failures(optax.clip_by_block_rms))
        self.assertLessEqual([f[:2] for f in failures], [(1, "rms 0")])


# ------------------------------------------------------------- reference


def _ref_rms(x) -> float:
    """RMS in float64; 0 for a zero-size leaf."""
    x = np.asarray(x, np.float64)
    return float(np.sqrt(np.mean(x**2))) if x.size else 0.0


def _stream(steps=12, seed=0):
    """Four leaves of steady RMS (0.3 to 2), ``w`` spiking 50x at steps 4 and 9.

    RMS values stay at least 1 % away from the thresholds used with it, so
    whether a leaf is clipped does not depend on rounding.
    """
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        g = {
            "w": rng.normal(size=(16, 8)) * 0.5,
            "b": rng.normal(size=(8,)) * 2.0,
            "s": np.asarray(rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 3.0)),
            "e": np.zeros((0, 3)),
        }
        if t in (4, 9):
            g["w"] = g["w"] * 50.0
        out.append({k: jnp.asarray(v, jnp.float32) for k, v in g.items()})
    return out


def _check_against_reference(tx, thresholds, stream):
    """Runs ``tx`` jitted over ``stream``; ``thresholds[t]`` is θ at step t."""
    state = tx.init(stream[0])
    assert type(state) is ClipByBlockRmsState and isinstance(state, ClipState)
    step = jax.jit(tx.update)
    clip_count = 0
    for t, g in enumerate(stream):
        out, state = step(g, state)
        theta = max(thresholds[t], 0.0) if thresholds[t] == thresholds[t] else 0.0
        over = 0
        for key, x in g.items():
            rms = _ref_rms(x)
            assert rms == 0 or abs(rms - theta) > 0.01 * rms, (t, key)  # margin
            # float32 sums and divisions against float64: a few ulps.
            np.testing.assert_allclose(state.norm[key], rms, rtol=1e-6)
            assert state.norm[key].dtype == jnp.float32
            y = np.asarray(out[key])
            assert y.dtype == np.float32 and y.shape == x.shape
            if rms > theta:
                over += 1
                want = np.asarray(x, np.float64) * (theta / rms)
                np.testing.assert_allclose(y, want, rtol=1e-6, atol=0)
                if theta > 0:
                    np.testing.assert_allclose(_ref_rms(y), theta, rtol=1e-6)
            else:
                np.testing.assert_array_equal(y, x)  # bit for bit
        clip_count += over > 0
        assert float(state.clipped) == over / len(g), t
        assert int(state.clip_count) == clip_count, t
        assert int(state.count) == t + 1
    return clip_count


@jax.jit
def _both(tree, theta):
    """jstab's output and state, and Optax's output, for a traced θ."""
    tx = clip_by_block_rms(theta)
    ours, state = tx.update(tree, tx.init(tree))
    with jax.numpy_dtype_promotion("standard"):
        theirs, _ = optax.clip_by_block_rms(theta).update(tree, None)
    rms = jax.tree.map(lambda x: jnp.sqrt(jnp.mean(x**2)), tree)  # Optax's
    return ours, state, theirs, rms


class BlockRmsTest(chex.TestCase):
    def test_matches_reference_step_by_step(self):
        stream = _stream()
        clips = _check_against_reference(clip_by_block_rms(1.0), [1.0] * 12, stream)
        assert clips >= 2  # the spikes, at least

    def test_schedule_is_evaluated_at_the_step_count(self):
        schedule = optax.linear_schedule(4.0, -1.0, transition_steps=10)
        thresholds = [float(schedule(t)) for t in range(12)]
        assert thresholds[-1] < 0  # it decays through zero
        clips = _check_against_reference(
            clip_by_block_rms(schedule), thresholds, _stream()
        )
        assert clips >= 6  # from θ = 0.5 on every step, and the spikes

    @parameterized.parameters(0.0, -1.0, float("nan"))
    def test_inject_hyperparams_with_a_bad_runtime_threshold(self, bad):
        tx = optax.inject_hyperparams(clip_by_block_rms)(threshold=1.0)
        g = _stream()[0]
        state = tx.init(g)
        state.hyperparams["threshold"] = jnp.asarray(bad, jnp.float32)
        eager, eager_state = tx.update(g, state)
        jitted, jit_state = jax.jit(tx.update)(g, state)
        for out in (eager, jitted):
            for x in jax.tree.leaves(out):
                np.testing.assert_array_equal(x, np.zeros(x.shape))
        # Three nonzero leaves clipped; the zero-size one has RMS 0, not > 0.
        assert float(optax.tree.get(eager_state, "clipped")) == 0.75
        jax.tree.map(np.testing.assert_array_equal, eager_state, jit_state)

    def test_inject_hyperparams_traces_once_and_follows_the_threshold(self):
        tx = optax.inject_hyperparams(clip_by_block_rms)(threshold=1.0)
        stream = _stream(6)
        step = traced_once(tx)
        state = tx.init(stream[0])
        for t, g in enumerate(stream):
            theta = [1.0, 0.5, 3.0, 1e-3, 1.0, 100.0][t]
            state.hyperparams["threshold"] = jnp.asarray(theta, jnp.float32)
            out, state = step(g, state)
            for key, x in g.items():
                rms = _ref_rms(x)
                want = np.asarray(x, np.float64) * min(1.0, theta / max(rms, 1e-300))
                np.testing.assert_allclose(out[key], want, rtol=1e-6)
        assert int(state.inner_state.count) == 6

    def test_one_trace_over_several_steps(self):
        tx = clip_by_block_rms(1.0)
        step = traced_once(tx)
        stream = _stream()
        state = tx.init(stream[0])
        for g in stream:
            _, state = step(g, state)
        assert int(state.count) == len(stream) and int(state.clip_count) >= 2

    @parameterized.parameters(range(8))
    def test_matches_optax_on_random_trees(self, seed):
        rng = np.random.default_rng(seed)
        shapes = [(1,), (3,), (7, 5), (64, 33), (4, 4, 9), (1000,), ()]
        tree = {
            f"l{i}": jnp.asarray(
                rng.normal(size=s) * 10.0 ** rng.uniform(-3, 3), jnp.float32
            )
            for i, s in enumerate(shapes)
        }
        theta = jnp.asarray(10.0 ** rng.uniform(-2, 2), jnp.float32)

        ours, state, theirs, rms = _both(tree, theta)
        for key, x in tree.items():
            # The RMS is computed as Optax computes it (the docstring).
            np.testing.assert_array_equal(state.norm[key], rms[key])
            a, b = np.asarray(ours[key]), np.asarray(theirs[key])
            ulps = np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32))
            if float(state.norm[key]) <= float(theta):
                np.testing.assert_array_equal(a, b)  # both unchanged
                np.testing.assert_array_equal(a, x)
            else:
                # min(1, θ/rms)·u against u·(1 / max(1, rms/θ)), as XLA
                # compiles Optax's division: at most 2 ulps (the docstring).
                assert ulps.max() <= 2, (key, ulps.max())

    def test_adafactor_is_this_clip_after_factored_rms(self):
        # optax.adafactor is scale_by_factored_rms, Optax's block-RMS clip,
        # a learning rate and -1: with jstab's clip in its place, the same.
        def chain(clip):
            return optax.chain(
                optax.scale_by_factored_rms(),
                clip,
                optax.scale_by_learning_rate(0.1, flip_sign=False),
                optax.scale(-1.0),
            )

        stream = _stream(6)
        params = jax.tree.map(jnp.ones_like, stream[0])
        with jax.numpy_dtype_promotion("standard"):
            ref = optax.adafactor(0.1, multiply_by_parameter_scale=False)
            ours = chain(clip_by_block_rms(1.0))
            ref_state, state = ref.init(params), ours.init(params)
            for g in stream:
                want, ref_state = ref.update(g, ref_state, params)
                got, state = ours.update(g, state, params)
                chex.assert_trees_all_close(got, want, rtol=1e-6, atol=0)
        assert int(optax.tree.get(state, "clip_count")) >= 1

    def test_after_adam(self):
        stream = _stream(6)
        params = jax.tree.map(jnp.ones_like, stream[0])
        with jax.numpy_dtype_promotion("standard"):
            txs = [
                optax.chain(optax.scale_by_adam(), clip, optax.scale(-0.1))
                for clip in (clip_by_block_rms(0.5), optax.clip_by_block_rms(0.5))
            ]
            states = [tx.init(params) for tx in txs]
            for g in stream:
                outs = []
                for k, tx in enumerate(txs):
                    out, states[k] = tx.update(g, states[k], params)
                    outs.append(out)
                chex.assert_trees_all_close(*outs, rtol=1e-6, atol=0)
        # Adam's first step is ±1 elementwise, of RMS 1: clipped to 0.5.
        assert int(optax.tree.get(states[0], "clip_count")) >= 1

    @parameterized.parameters(jnp.float16, jnp.bfloat16, jnp.float32)
    def test_half_precision_keeps_dtypes_and_float32_rms(self, dtype):
        # float16 squares of 300 and 400 overflow: the RMS is accumulated
        # in float32. Optax's is infinite there and zeroes the leaf.
        g = {
            "big": jnp.asarray([300.0, -400.0, 0.0], dtype),
            "small": jnp.asarray([0.25, -0.5], dtype),
            "wide": jnp.asarray([3.0, 4.0], jnp.float32),
        }
        tx = clip_by_block_rms(2.0)
        out, state = jax.jit(tx.update)(g, tx.init(g))
        for key, x in g.items():
            assert out[key].dtype == x.dtype
            assert state.norm[key].dtype == jnp.float32
            rms = _ref_rms(x)
            np.testing.assert_allclose(state.norm[key], rms, rtol=1e-6)
            want = np.asarray(x, np.float64) * min(1.0, 2.0 / rms)
            # One rounding to the leaf's dtype: half an ulp of it.
            eps = float(jnp.finfo(x.dtype).eps)
            np.testing.assert_allclose(np.asarray(out[key], np.float64), want, eps)
        np.testing.assert_array_equal(out["small"], g["small"])  # bit for bit
        assert float(state.clipped) == pytest.approx(2 / 3)

    def test_huge_and_zero_size_leaves(self):
        g = {
            "huge": jnp.asarray([3e19, -4e19], jnp.float32),  # squares overflow
            "empty": jnp.zeros((0,), jnp.float32),
            "zero": jnp.zeros((2, 2), jnp.float32),
        }
        tx = clip_by_block_rms(1.0)
        out, state = tx.update(g, tx.init(g))
        np.testing.assert_allclose(state.norm["huge"], 3.5355339e19, rtol=1e-6)
        np.testing.assert_allclose(out["huge"], [0.8485281, -1.1313709], rtol=1e-6)
        assert float(state.norm["empty"]) == 0.0 and out["empty"].shape == (0,)
        assert float(state.norm["zero"]) == 0.0
        np.testing.assert_array_equal(out["zero"], g["zero"])
        assert float(state.clipped) == pytest.approx(1 / 3)

    def test_empty_tree(self):
        tx = clip_by_block_rms(1.0)
        out, state = jax.jit(tx.update)({}, tx.init({}))
        assert out == {} and float(state.clipped) == 0.0 and int(state.count) == 1

    @parameterized.parameters(
        (0.0, ValueError, r"`threshold` must be > 0, got 0.0"),
        (-1.0, ValueError, r"`threshold` must be > 0, got -1.0"),
        (float("nan"), ValueError, r"`threshold` must be finite, got nan"),
        (float("inf"), ValueError, r"`threshold` must be finite, got inf"),
        (True, TypeError, r"`threshold` must be a real number, got True"),
        ("1.0", TypeError, r"`threshold` must be a real number, got '1.0'"),
        (np.ones(2), TypeError, r"`threshold` must be a scalar"),
    )
    def test_rejects_bad_arguments(self, value, error, match):
        with pytest.raises(error, match=match):
            clip_by_block_rms(value)

    def test_accepts_runtime_thresholds_without_checking(self):
        # A schedule or an array is checked at run time: 0 gives zero.
        for theta in (optax.constant_schedule(0.0), jnp.asarray(0.0)):
            tx = clip_by_block_rms(theta)
            g = {"a": jnp.ones(3)}
            out, _ = tx.update(g, tx.init(g))
            np.testing.assert_array_equal(out["a"], np.zeros(3))

    @chex.variants(with_jit=True, without_jit=True)
    def test_rejects_another_tree(self):
        tx = clip_by_block_rms(1.0)
        state = tx.init({"a": jnp.ones(2), "b": jnp.ones(3)})
        with pytest.raises(ValueError, match=r"`clip_by_block_rms` was initialized"):
            self.variant(tx.update)({"a": jnp.ones(2)}, state)

    def test_grad_and_jvp_match_finite_differences(self):
        # Leaves above and below θ, a zero-size one, and θ itself an input.
        rng = np.random.default_rng(3)
        with jax.enable_x64(True):
            g = {
                "w": jnp.asarray(rng.normal(size=(4, 3)) * 3.0),
                "b": jnp.asarray(rng.normal(size=(3,)) * 0.1),
                "s": jnp.asarray(2.5),
                "e": jnp.zeros((0,)),
            }
            weights = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), g)

            def f(g, theta):
                tx = clip_by_block_rms(theta)
                out, _ = tx.update(g, tx.init(g))
                terms = jax.tree.map(lambda w, u: jnp.sum(w * u), weights, out)
                return sum(jax.tree.leaves(terms))

            theta = jnp.asarray(1.0)
            check_grads(f, (g, theta), order=1, modes=("fwd", "rev"))
            zeros = jax.tree.map(jnp.zeros_like, g)
            check_grads(f, (zeros, theta), order=1, modes=("fwd", "rev"))
            grads = jax.jit(jax.grad(f, argnums=(0, 1)))(zeros, theta)
            leaves = jax.tree.leaves(grads)
            assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
            # At zero nothing is clipped: the gradient is the weights.
            chex.assert_trees_all_close(grads[0], weights)
            # And clipped, the gradient through the RMS is not zero.
            grads = jax.jit(jax.grad(f))(g, theta)
            assert float(jnp.abs(grads["w"] - weights["w"]).max()) > 1e-3
