"""skip_on_spike's loss test, window and forced steps, against a float64 reference.

The reference below is the rule written out in float64 Python: which steps
are skipped, the statistics after each step, and the forced steps. The
wrapper's steps are then compared with it on scripted streams of gradient
norms and losses with spikes, non-finite values and a level shift.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _streams import grad_of_norm

import jstab
from jstab import _numerics, _wrappers
from jstab.clipping import _running


class _Stat:
    """The statistics of one tracked value (norm or loss), in float64."""

    def __init__(self, alpha, window):
        self.alpha, self.window = alpha, window
        self.values, self.mean, self.var = [], 0.0, 0.0

    def z(self, v):
        return (v - self.mean) / (math.sqrt(self.var) + 1e-6)

    def enter(self, v, warm):
        self.values.append(v)
        if self.window is not None:
            held = np.asarray(self.values[-self.window :])
            self.mean, self.var = float(held.mean()), float(held.var())
        elif not warm:
            held = np.asarray(self.values)
            self.mean, self.var = float(held.mean()), float(held.var())
        else:
            a = self.alpha
            self.mean = a * self.mean + (1 - a) * v
            self.var = a * self.var + (1 - a) * (v - self.mean) ** 2


class _Reference:
    """The whole rule: returns ``(skipped, forced)`` for each step."""

    def __init__(
        self,
        max_norm=None,
        z_thresh=None,
        alpha=0.97,
        warmup_steps=25,
        loss_z_thresh=None,
        window=None,
        max_consecutive=None,
    ):
        self.__dict__.update(locals())
        self.norm, self.loss = _Stat(alpha, window), _Stat(alpha, window)
        self.samples = self.consecutive = self.forced_count = 0

    def step(self, norm, loss=0.0):
        norm = float(norm)
        loss = float(loss) if self.loss_z_thresh is not None else 0.0
        finite = math.isfinite(norm) and math.isfinite(loss)
        warm = self.samples >= self.warmup_steps
        skip = not finite
        skip |= self.max_norm is not None and norm > self.max_norm
        if warm and self.z_thresh is not None:
            skip |= self.norm.z(norm) > self.z_thresh
        if warm and self.loss_z_thresh is not None:
            skip |= self.loss.z(loss) > self.loss_z_thresh
        forced = False
        if self.max_consecutive is not None:
            forced = skip and finite and self.consecutive >= self.max_consecutive
            skip = skip and not forced
            self.consecutive = self.consecutive + 1 if skip else 0
            self.forced_count += forced
        if not skip:
            self.norm.enter(norm, warm)
            self.loss.enter(loss, warm)
            self.samples += 1
        return skip, forced


def _streams(n, seed):
    """Norms and losses: noise, spikes in either, NaNs, and a level shift."""
    rng = np.random.default_rng(seed)
    norms = rng.uniform(1.0, 2.0, n)
    losses = 3.0 - np.linspace(0, 1, n) + rng.normal(0, 0.02, n)
    norms[rng.random(n) < 0.1] *= 20.0
    losses[rng.random(n) < 0.1] += 2.0
    norms[n // 4] = np.nan
    losses[n // 3] = np.inf
    norms[2 * n // 3 :] *= 8.0  # a level shift
    return norms.astype(np.float32), losses.astype(np.float32)


CASES = {
    "loss": dict(loss_z_thresh=3.0, warmup_steps=5),
    "loss and norm": dict(z_thresh=3.0, loss_z_thresh=3.0, warmup_steps=5),
    "window": dict(z_thresh=3.0, window=8, warmup_steps=4),
    "window loss": dict(z_thresh=4.0, loss_z_thresh=3.0, window=16, warmup_steps=10),
    "window shorter than warm-up": dict(z_thresh=3.0, window=3, warmup_steps=6),
    "forced": dict(z_thresh=3.0, max_consecutive=4, warmup_steps=5),
    "forced max_norm": dict(max_norm=10.0, max_consecutive=2, warmup_steps=5),
    "all": dict(
        max_norm=60.0,
        z_thresh=3.0,
        loss_z_thresh=2.5,
        alpha=0.9,
        window=12,
        max_consecutive=3,
        warmup_steps=6,
    ),
}


def _loss_of(kwargs, loss):
    return {"loss": jnp.asarray(loss)} if "loss_z_thresh" in kwargs else {}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_the_reference_step_by_step(name):
    kwargs = CASES[name]
    tx = jstab.skip_on_spike(optax.sgd(1.0), **kwargs)
    ref = _Reference(**kwargs)
    state = tx.init(grad_of_norm(0.0))
    step = jax.jit(tx.update)
    norms, losses = _streams(120, seed=len(name))
    skips = forced_steps = 0
    for t, (n, loss) in enumerate(zip(norms, losses, strict=True)):
        g = grad_of_norm(n)
        out, state = step(g, state, **_loss_of(kwargs, loss))
        skip, forced = ref.step(n, loss)
        skips += skip
        forced_steps += forced
        assert bool(state.skipped) == skip, t
        assert int(state.skip_count) == skips and int(state.samples) == ref.samples
        want = 0.0 if skip else -float(n)
        np.testing.assert_array_equal(out["a"], np.float32([want]))
        # float32 statistics against float64: a few ulps of the values.
        np.testing.assert_allclose(state.mean, ref.norm.mean, rtol=2e-5)
        np.testing.assert_allclose(state.var, ref.norm.var, rtol=5e-4, atol=1e-6)
        if "loss_z_thresh" in kwargs:
            assert float(state.loss) == float(loss) or not math.isfinite(loss)
            np.testing.assert_allclose(state.loss_mean, ref.loss.mean, rtol=2e-5)
            np.testing.assert_allclose(
                state.loss_var, ref.loss.var, rtol=5e-4, atol=1e-6
            )
        if "max_consecutive" in kwargs:
            assert int(state.forced_count) == forced_steps
            assert int(state.consecutive) == ref.consecutive
    # Each case exercises what it names.
    assert 0 < skips < len(norms)
    if "max_consecutive" in kwargs:
        assert forced_steps > 0


def _before(inner, max_norm=None, z_thresh=None, alpha=0.97, warmup_steps=25):
    """The wrapper's update as it was before these options, kept frozen here."""

    def update(updates, state, params=None):
        norm = _numerics.global_norm(jax.tree.leaves(updates), 2, None)
        moments = _running.of(state)
        skip = ~jnp.isfinite(norm)
        if max_norm is not None:
            skip = skip | (
                norm > _numerics.threshold(max_norm, state.count, norm.dtype)
            )
        if z_thresh is not None:
            z, _ = _running.zscore(norm, moments, 1e-6)
            spike = z > _numerics.effective(jnp.asarray(z_thresh, jnp.float32))
            skip = skip | (_running.ready(moments, warmup_steps) & spike)
        out, inner_state = _wrappers.update_unless(
            skip, inner.update, updates, state.inner_state, params
        )
        moments = _running.observe(moments, norm, ~skip, alpha, warmup_steps)
        return out, state._replace(
            inner_state=inner_state,
            skipped=skip,
            skip_count=jnp.where(
                skip, _numerics.safe_increment(state.skip_count), state.skip_count
            ),
            count=_numerics.safe_increment(state.count),
            norm=norm.astype(jnp.float32),
            **moments._asdict(),
        )

    return update


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(max_norm=30.0), dict(z_thresh=2.0, alpha=0.8, warmup_steps=3)],
)
def test_without_the_new_options_the_bits_are_as_before(kwargs):
    inner = optax.sgd(1e-2, momentum=0.9)
    tx = jstab.skip_on_spike(inner, **kwargs)
    old = jax.jit(_before(inner, **kwargs))
    new = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}
    state = old_state = tx.init(params)
    # The state has the leaves it had: the new fields are None.
    assert len(jax.tree.leaves(state)) == 1 + 7  # the momentum
    for t in range(40):
        g = rng.normal(size=(5, 3)) * (40.0 if t % 9 == 8 else 1.0)
        if t == 20:
            g[1, 1] = np.nan
        g = {"w": jnp.asarray(g, jnp.float32)}
        out, state = new(g, state)
        want, old_state = old(g, old_state)
        chex.assert_trees_all_equal(out, want)
        chex.assert_trees_all_equal(state, old_state)


def _level_shift(tx, n=60):
    """Norm 1 for 20 steps, then 10 for good: the skips, step by step."""
    state = tx.init(grad_of_norm(0.0))
    step = jax.jit(tx.update)
    skipped = []
    for t in range(n):
        _, state = step(grad_of_norm(1.0 + 0.01 * (t % 3) + 9.0 * (t >= 20)), state)
        skipped.append(bool(state.skipped))
    return np.asarray(skipped), state


def test_max_consecutive_keeps_a_level_shift_from_stalling_the_run():
    tx = jstab.skip_on_spike(optax.sgd(1.0), z_thresh=3.0, warmup_steps=10)
    stalled, _ = _level_shift(tx)
    assert stalled[20:].all() and not stalled[:20].any()
    tx = jstab.skip_on_spike(
        optax.sgd(1.0), z_thresh=3.0, warmup_steps=10, max_consecutive=5
    )
    skipped, state = _level_shift(tx)
    # Five skips, one forced step, and again, until the statistics follow.
    assert skipped[20:25].all() and not skipped[25]
    assert not skipped[-10:].any()
    assert int(state.forced_count) >= 1 and int(state.consecutive) == 0
    assert int(state.skip_count) == int(skipped.sum())


def test_a_forced_step_is_never_a_non_finite_one():
    tx = jstab.skip_on_spike(optax.sgd(1.0), max_norm=1.0, max_consecutive=1)
    state = tx.init(grad_of_norm(0.0))
    for n, skip in [(5.0, True), (np.nan, True), (np.inf, True), (5.0, False)]:
        out, state = tx.update(grad_of_norm(n), state)
        assert bool(state.skipped) == skip
    assert float(out["a"][0]) == -5.0 and int(state.forced_count) == 1


def test_a_loss_spike_or_a_non_finite_loss_skips_a_normal_gradient():
    tx = jstab.skip_on_spike(optax.sgd(1.0), loss_z_thresh=4.0, warmup_steps=5)
    state = tx.init(grad_of_norm(0.0))
    step = jax.jit(_with(tx))
    for t, loss in enumerate([2.0, 2.1, 1.9, 2.05, 1.95, 2.0, 9.0, np.nan, 2.0]):
        out, state = step(grad_of_norm(1.0), state, jnp.float32(loss))
        assert bool(state.skipped) == (t in (6, 7)), t
        assert float(out["a"][0]) == (0.0 if t in (6, 7) else -1.0)
    assert int(state.samples) == 7
    np.testing.assert_allclose(float(state.loss_mean), 2.0, rtol=1e-6)


def _with(tx):
    """``(g, state, loss) -> tx.update(g, state, loss=loss)``."""

    def update(g, state, loss):
        return tx.update(g, state, loss=loss)

    return update


def test_the_loss_is_required_a_scalar_and_passed_on_to_inner():
    tx = jstab.skip_on_spike(optax.sgd(1.0), loss_z_thresh=3.0)
    state = tx.init(grad_of_norm(0.0))
    with pytest.raises(ValueError, match="needs the step's loss"):
        tx.update(grad_of_norm(1.0), state)
    with pytest.raises(ValueError, match="must be a scalar, got shape \\(2,\\)"):
        tx.update(grad_of_norm(1.0), state, loss=jnp.ones(2))
    seen = {}

    def update(updates, state, params=None, **extra):
        seen.update(extra)
        return updates, state

    inner = optax.GradientTransformationExtraArgs(lambda p: (), update)
    tx = jstab.skip_on_spike(inner, loss_z_thresh=3.0)
    tx.update(grad_of_norm(1.0), tx.init(grad_of_norm(0.0)), loss=jnp.float32(2))
    assert float(seen["loss"]) == 2.0
    # Without the loss test, a loss is accepted and ignored.
    tx = jstab.skip_on_spike(optax.sgd(1.0))
    out, _ = tx.update(grad_of_norm(3.0), tx.init(grad_of_norm(0.0)), loss=1.0)
    assert float(out["a"][0]) == -3.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_z_thresh=0.0), "`loss_z_thresh` must be > 0, got 0.0"),
        (dict(loss_z_thresh=float("nan")), "`loss_z_thresh`"),
        (dict(window=1), "`window` must be an int >= 2, got 1"),
        (dict(window=8.0), "`window` must be an int"),
        (dict(window=True), "`window` must be an int"),
        (dict(max_consecutive=0), "`max_consecutive` must be an int >= 1, got 0"),
    ],
)
def test_bad_options_are_named_when_built(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        jstab.skip_on_spike(optax.sgd(1.0), **kwargs)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan])
def test_a_run_time_loss_threshold_that_is_not_positive_counts_as_zero(bad):
    # Every loss above the mean is then a spike; nothing becomes NaN.
    tx = jstab.skip_on_spike(
        optax.sgd(1.0), loss_z_thresh=jnp.float32(bad), warmup_steps=2
    )
    state = tx.init(grad_of_norm(0.0))
    for t, loss in enumerate([2.0, 2.2, 1.0, 3.0]):
        out, state = tx.update(grad_of_norm(1.0), state, loss=jnp.float32(loss))
        assert bool(state.skipped) == (t == 3)
        assert np.isfinite(out["a"]).all() and np.isfinite(state.loss_mean)


def test_statistics_report_the_loss_and_forced_steps_only_when_asked():
    plain = jstab.skip_on_spike(optax.sgd(1.0))
    keys = set(jstab.statistics(plain.init(grad_of_norm(0.0))))
    assert keys == {f"skip_on_spike/{k}" for k in _PLAIN}
    tx = jstab.skip_on_spike(
        optax.sgd(1.0), loss_z_thresh=3.0, window=4, max_consecutive=2
    )
    state = tx.init(grad_of_norm(0.0))
    for loss in (2.0, 4.0):
        _, state = tx.update(grad_of_norm(1.0), state, loss=jnp.float32(loss))
    stats = jstab.statistics(state)
    assert set(stats) == {
        f"skip_on_spike/{k}"
        for k in (*_PLAIN, "loss", "loss_mean", "loss_std", "forced_count")
    }
    assert float(stats["skip_on_spike/loss_std"]) == 1.0  # of 2 and 4
    assert float(stats["skip_on_spike/loss_mean"]) == 3.0


_PLAIN = ("skipped", "skip_count", "norm", "mean", "std")


def test_the_window_state_is_the_last_window_accepted_values():
    tx = jstab.skip_on_spike(optax.sgd(1.0), window=4, loss_z_thresh=50.0)
    state = tx.init(grad_of_norm(0.0))
    for t in range(1, 11):
        _, state = tx.update(grad_of_norm(float(t)), state, loss=jnp.float32(-t))
    assert sorted(state.history.tolist()) == [7.0, 8.0, 9.0, 10.0]
    assert sorted(state.loss_history.tolist()) == [-10.0, -9.0, -8.0, -7.0]
    assert float(state.mean) == 8.5 and float(state.var) == 1.25
    assert float(state.loss_mean) == -8.5


def test_with_multisteps_and_in_an_nnx_optimizer():
    # Optax's MultiSteps is not written for strict promotion.
    with jax.numpy_dtype_promotion("standard"):
        _multisteps_in_nnx()


def _multisteps_in_nnx():
    from flax import nnx

    tx = jstab.skip_on_spike(
        optax.MultiSteps(optax.sgd(1.0), 2),
        loss_z_thresh=3.0,
        window=4,
        max_consecutive=2,
        warmup_steps=2,
    )
    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))

    @nnx.jit
    def step(model, opt, loss):
        opt.update(model, grads, loss=loss)

    before = model.kernel[...]
    for loss in (2.0, 2.0, 50.0, 2.0):
        step(model, opt, jnp.float32(loss))
    stats = jstab.statistics(opt.opt_state)
    assert int(stats["skip_on_spike/skip_count"]) == 1
    assert float(stats["skip_on_spike/loss_mean"]) == 2.0
    # Three accepted micro-batches: one update of -1 per weight so far.
    np.testing.assert_allclose(model.kernel[...], before - 1.0)
