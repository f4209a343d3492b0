"""zclip: step by step against a plain-Python port of the authors' algorithm."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _streams import grad_of_norm, traced_once
from absl.testing import parameterized

import jstab


def _stream(n, seed=0):
    """Norms with spikes (10x-100x), a drift, and a long calm run."""
    rng = np.random.default_rng(seed)
    norms = rng.uniform(1.0, 2.0, n) * np.linspace(1.0, 3.0, n)
    spikes = rng.random(n) < 0.12
    norms[spikes] *= rng.uniform(10.0, 100.0, spikes.sum())
    return norms.astype(np.float32)


class _Reference:
    """SPEC §7's ZClip in float64 Python, written from the authors' zclip.py."""

    def __init__(self, alpha=0.97, z_thresh=2.5, max_norm=None, eps=1e-6,
                 warmup_steps=25, mode="zscore", clip_option="adaptive_scaling",
                 clip_factor=1.0, skip_update_on_spike=False):  # fmt: skip
        self.__dict__.update(locals())
        self.buffer, self.mean, self.var = [], None, None

    def _cap(self, value):
        return value if self.max_norm is None else min(value, self.max_norm)

    def detection(self):
        """μ + z_thresh·σ capped by ``max_norm`` (``max_norm`` or inf in warm-up)."""
        if self.mean is None:
            return self._cap(math.inf)
        return self._cap(self.mean + self.z_thresh * math.sqrt(self.var))

    def step(self, norm):
        """Returns (threshold in force, spike?) and updates the statistics."""
        norm = float(norm)
        if self.mean is None:
            self.buffer.append(norm)
            if len(self.buffer) >= self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(
                    self.buffer
                )
            return self._cap(norm), False
        std = math.sqrt(self.var)
        if self.mode == "percentile":
            v = self.mean + self.z_thresh * std
            spike = norm > v
        else:
            z = (norm - self.mean) / (std + self.eps)
            spike = z > self.z_thresh
            if self.clip_option == "mean":
                v = self.mean
            else:
                eta = z / self.z_thresh
                v = (self.mean + (self.z_thresh * std) / eta) * self.clip_factor
        clip = v if spike else norm
        if not (spike and self.skip_update_on_spike):
            self.mean = self.alpha * self.mean + (1 - self.alpha) * clip
            self.var = (
                self.alpha * self.var + (1 - self.alpha) * (clip - self.mean) ** 2
            )
        return self._cap(clip), spike


_CASES = [
    dict(),
    dict(warmup_steps=5, clip_option="mean"),
    dict(warmup_steps=5, mode="percentile"),
    dict(warmup_steps=5, max_norm=20.0),
    dict(warmup_steps=5, clip_factor=0.7, skip_update_on_spike=True),
    dict(warmup_steps=1, alpha=0.5, z_thresh=1.0, eps=1e-3),
]


class ZClipTest(chex.TestCase):
    @parameterized.parameters(*_CASES)
    def test_matches_reference_step_by_step(self, **kwargs):
        norms = _stream(120)
        ref = _Reference(**kwargs)
        tx = jstab.zclip(**kwargs)
        state = tx.init(grad_of_norm(0.0))
        step = jax.jit(tx.update)
        clips = 0
        for t, n in enumerate(norms):
            out, state = step(grad_of_norm(n), state)
            threshold, spike = ref.step(n)
            assert bool(state.spike) == spike, t
            np.testing.assert_allclose(state.applied_threshold, threshold, rtol=2e-5)
            np.testing.assert_allclose(state.threshold, ref.detection(), rtol=2e-5)
            np.testing.assert_allclose(
                out["a"], [n * min(1.0, threshold / n)], rtol=2e-5
            )
            clips += bool(n > threshold)
            assert float(state.clipped) == float(n > threshold), t
            assert int(state.clip_count) == clips
            if ref.mean is not None:
                np.testing.assert_allclose(state.mean, ref.mean, rtol=2e-5)
                np.testing.assert_allclose(state.var, ref.var, rtol=1e-4)
        assert int(state.count) == len(norms)
        assert clips > 0

    def test_without_jit_matches_jit(self):
        norms = _stream(12)
        tx = jstab.zclip(warmup_steps=3)
        states = [tx.init(grad_of_norm(0.0))] * 2
        for n in norms:
            outs = []
            for k, update in enumerate((tx.update, jax.jit(tx.update))):
                out, states[k] = update(grad_of_norm(n), states[k])
                outs.append(out)
            chex.assert_trees_all_close(*outs, rtol=1e-6)
            chex.assert_trees_all_close(*states, rtol=1e-6)

    def test_warmup_collects_exact_mean_and_population_variance(self):
        norms = [3.0, 1.0, 4.0, 1.0, 5.0]
        tx = jstab.zclip(warmup_steps=5, max_norm=4.5)
        state = tx.init(grad_of_norm(0.0))
        for n in norms:
            out, state = tx.update(grad_of_norm(n), state)
        np.testing.assert_allclose(state.mean, np.mean(norms), rtol=1e-6)
        np.testing.assert_allclose(state.var, np.var(norms), rtol=1e-6)
        assert int(state.samples) == 5 and not bool(state.spike)
        # Warm-up clipping to max_norm counts as a clip.
        assert int(state.clip_count) == 1
        np.testing.assert_allclose(out["a"], [4.5])

    def test_below_threshold_is_bitwise_identity(self):
        tx = jstab.zclip(warmup_steps=2)
        g = {
            "w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.bfloat16)
        }
        state = tx.init(g)
        for _ in range(4):
            out, state = jax.jit(tx.update)(g, state)
            assert out["w"].dtype == jnp.bfloat16
            np.testing.assert_array_equal(
                np.asarray(out["w"], np.float32), np.asarray(g["w"], np.float32)
            )
        assert int(state.clip_count) == 0

    def test_constant_norms_then_spike_no_nan(self):
        tx = jstab.zclip(warmup_steps=3)
        state = tx.init(grad_of_norm(0.0))
        for n in [2.0, 2.0, 2.0, 2.0, 50.0, 0.0]:
            out, state = tx.update(grad_of_norm(n), state)
            assert np.isfinite(out["a"]).all() and np.isfinite(state.var)
        # σ = 0 at the spike: z = 48 / eps, the threshold and the EMA's
        # input are μ = 2; then the norm 0 enters.
        assert int(state.clip_count) == 1
        np.testing.assert_allclose(state.mean, 0.97 * 2.0, rtol=1e-6)

    def test_non_finite_norm_does_not_enter_statistics(self):
        tx = jstab.zclip(warmup_steps=2)
        state = tx.init(grad_of_norm(0.0))
        for n in [1.0, 3.0, np.inf, np.nan]:
            _, state = tx.update(grad_of_norm(n), state)
        assert int(state.samples) == 2
        np.testing.assert_allclose([state.mean, state.var], [2.0, 1.0])

    def test_max_norm_schedule_at_step_count(self):
        schedule = optax.linear_schedule(1.0, 3.0, transition_steps=2)
        tx = jstab.zclip(max_norm=schedule, warmup_steps=10)
        state = tx.init(grad_of_norm(0.0))
        for want in [1.0, 2.0, 3.0, 3.0]:
            out, state = tx.update(grad_of_norm(10.0), state)
            np.testing.assert_allclose(out["a"], [want], rtol=1e-6)

    def test_inject_hyperparams_and_compiles_once(self):
        tx = optax.inject_hyperparams(jstab.zclip)(warmup_steps=4, z_thresh=2.0)
        norms = _stream(30)
        ref = _Reference(warmup_steps=4, z_thresh=2.0)
        step = traced_once(tx)

        state = tx.init(grad_of_norm(0.0))
        for n in norms:
            _, state = step(grad_of_norm(n), state)
            threshold, _ = ref.step(n)
            np.testing.assert_allclose(
                optax.tree.get(state, "applied_threshold"), threshold, rtol=2e-5
            )
            np.testing.assert_allclose(
                optax.tree.get(state, "threshold"), ref.detection(), rtol=2e-5
            )
        state.hyperparams["z_thresh"] = jnp.asarray(1e6, jnp.float32)
        _, state = step(grad_of_norm(1e4), state)
        assert not bool(optax.tree.get(state, "spike"))

    @parameterized.parameters(
        (dict(alpha=0.0), ValueError, "alpha"),
        (dict(alpha=1.0), ValueError, "alpha"),
        (dict(z_thresh=0.0), ValueError, "z_thresh"),
        (dict(z_thresh=-1.0), ValueError, "z_thresh"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(max_norm=-1.0), ValueError, "max_norm"),
        (dict(clip_factor=0.0), ValueError, "clip_factor"),
        (dict(warmup_steps=0), ValueError, "warmup_steps"),
        (dict(warmup_steps=2.0), TypeError, "warmup_steps"),
        (dict(mode="ZSCORE"), ValueError, "mode"),
        (dict(clip_option="median"), ValueError, "clip_option"),
        (dict(skip_update_on_spike=1), TypeError, "skip_update_on_spike"),
    )
    def test_rejects_bad_arguments(self, kwargs, error, name):
        with pytest.raises(error, match=name):
            jstab.zclip(**kwargs)
