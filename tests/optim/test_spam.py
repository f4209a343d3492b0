"""scale_by_spam and spam: step by step against a float64 NumPy port of SPAM.

The reference below is written from the rule as the authors' ``SPAM.py``
computes it (moment reset at t mod R = 0, spike clipping against the raw
second moment before the step's update once t mod R >= 20, Adam with a count
that is never reset, a cosine warm-up of the update after each reset), with
Optax's placement of eps.
"""

import doctest
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from jstab.optim import _spam
from jstab.optim._spam import GATE, ScaleBySpamState, scale_by_spam, spam, warmup_factor


@pytest.fixture(autouse=True)
def _strict_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


SHAPES = {"w": (4, 3), "b": (5,)}


class Reference:
    """SPAM in float64 NumPy: one ``step(g)`` per optimizer step."""

    def __init__(self, b1, b2, eps, theta, interval, warmup):
        self.__dict__.update(b1=b1, b2=b2, eps=eps, theta=theta)
        self.interval, self.warmup = interval, warmup
        self.m = {k: np.zeros(s) for k, s in SHAPES.items()}
        self.v = {k: np.zeros(s) for k, s in SHAPES.items()}
        self.t, self.resets = 0, 0

    def factor(self, t):
        j = t % self.interval
        if t >= self.interval and t > 1 and j < self.warmup:
            return 1 - 0.99 * (1 + math.cos(math.pi * j / (self.warmup + 1))) / 2
        return 1.0

    def step(self, g):
        self.t += 1
        t = self.t
        if t % self.interval == 0:
            self.m = {k: np.zeros_like(x) for k, x in self.m.items()}
            self.v = {k: np.zeros_like(x) for k, x in self.v.items()}
            self.resets += 1
        out, spikes, masks = {}, 0, {}
        for k in SHAPES:
            gk = np.asarray(g[k], np.float64).copy()
            mask = np.zeros(gk.shape, bool)
            if t % self.interval >= 20:
                mask = gk**2 > self.theta * self.v[k]
                gk[mask] = np.sign(gk[mask]) * np.sqrt(self.theta * self.v[k][mask])
            masks[k] = mask
            spikes += int(mask.sum())
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * gk
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * gk**2
            m_hat = self.m[k] / (1 - self.b1**t)
            v_hat = self.v[k] / (1 - self.b2**t)
            out[k] = self.factor(t) * m_hat / (np.sqrt(v_hat) + self.eps)
        return out, spikes, masks


def _stream(n, spikes, seed=0):
    """Gradients of magnitude in [0.5, 1.5], random signs: no element of them
    is a spike against v (b2 = 0.9, theta = 10: theta*v > 8 > 1.5**2 once the
    gate opens). ``spikes`` maps a 1-based step to ``w``'s elements made 40x."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(1, n + 1):
        g = {
            k: rng.uniform(0.5, 1.5, s) * rng.choice([-1.0, 1.0], s)
            for k, s in SHAPES.items()
        }
        for index in spikes.get(t, ()):
            g["w"][index] *= 40.0
        out.append(g)
    return out


def _as(tree, dtype):
    return {k: jnp.asarray(v, dtype) for k, v in tree.items()}


def _traced_once(tx):
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(g, state):
        return tx.update(g, state)

    return step


# Spikes in ``w`` only: inside the 20-step gate (steps 5, 33, 49, 64:
# t mod 30 < 20, not clipped) and after it (steps 24, 52, 80, 85: t mod 30 >=
# 20, clipped); steps 49 and 80 are the gate's edges (19 and 20).
SPIKES = {5: [(0, 0)], 24: [(1, 2), (3, 0)], 33: [(2, 1)], 49: [(1, 0)],
          52: [(0, 1)], 64: [(3, 2)], 80: [(1, 1)], 85: [(2, 2), (0, 0)]}  # fmt: skip
CLIPPED = (24, 52, 80, 85)
SETTINGS = dict(b1=0.8, b2=0.9, eps=1e-8, theta=10.0, interval=30, warmup=5)


def _build(b1, b2, eps, theta, interval, warmup, **kwargs):
    return scale_by_spam(
        b1, b2, eps, spike_threshold=theta, reset_interval=interval,
        warmup_steps=warmup, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(
    "settings",
    [
        SETTINGS,
        # A warm-up longer than the period: cut short by each reset.
        dict(SETTINGS, interval=25, warmup=40),
        # A period of at most 20 steps: the gate never opens.
        dict(SETTINGS, interval=20),
        dict(SETTINGS, interval=1, warmup=3),
    ],
    ids=["R30-W5", "R25-W40", "R20", "R1"],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_matches_reference_step_by_step(settings, dtype):
    stream = _stream(95, SPIKES)
    ref = Reference(**settings)
    with jax.enable_x64(dtype == jnp.float64):
        tx = _build(**settings)
        state = tx.init(_as(stream[0], dtype))
        step = _traced_once(tx)
        # float32 against float64: a few roundings per step in moments that
        # forget (b1, b2 < 1), so ~1e-6 relative; atol for moments near 0.
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-12)
        clipped_at = []
        for t, g in enumerate(stream, 1):
            want, spikes, masks = ref.step(g)
            out, state = step(_as(g, dtype), state)
            for k in SHAPES:
                np.testing.assert_allclose(out[k], want[k], **tol)
                np.testing.assert_allclose(state.mu[k], ref.m[k], **tol)
                np.testing.assert_allclose(state.nu[k], ref.v[k], **tol)
                assert out[k].dtype == dtype
            assert not masks["b"].any()
            assert int(state.spikes) == spikes, t
            assert int(state.reset_count) == ref.resets == t // settings["interval"]
            assert int(state.count) == t
            if spikes:
                clipped_at.append(t)
    if settings["interval"] == 30:
        # Exactly the injected spikes after the gate, none inside it.
        assert clipped_at == list(CLIPPED)
    elif settings["interval"] <= GATE:
        assert clipped_at == []


def test_the_spike_test_is_strict_and_uses_v_before_the_update():
    # Step 21 of 30 (the gate is open), from a state with v = 1 (0 for the
    # last element), theta = 4: g**2 == 4 * v is no spike; above, g becomes
    # sign(g) * sqrt(4 * v) before the moments see it; with v = 0, 0.
    tx = scale_by_spam(0.5, 0.75, spike_threshold=4.0, reset_interval=30)
    state = tx.init({"w": jnp.zeros(4)})._replace(
        count=jnp.asarray(20, jnp.int32), nu={"w": jnp.array([1.0, 1.0, 1.0, 0.0])}
    )
    _, new = tx.update({"w": jnp.array([2.0, 2.5, -3.0, 1.0])}, state)
    clipped = np.array([2.0, 2.0, -2.0, 0.0])
    assert int(new.spikes) == 3
    np.testing.assert_allclose(new.mu["w"], 0.5 * clipped, rtol=1e-7)
    np.testing.assert_allclose(
        new.nu["w"], 0.75 * np.array([1, 1, 1, 0]) + 0.25 * clipped**2, rtol=1e-7
    )


def test_warmup_factors_after_a_reset():
    interval, warmup = 30, 5
    expected = {t: 1.0 for t in range(1, 30)}  # none before the first reset
    for j in range(interval):
        want = 1 - 0.99 * (1 + math.cos(math.pi * j / (warmup + 1))) / 2
        for t in (30 + j, 60 + j):
            expected[t] = want if j < warmup else 1.0
    assert expected[30] == pytest.approx(0.01, abs=1e-15)  # 1 - 0.99
    for t, want in expected.items():
        got = warmup_factor(t, interval, warmup)
        assert got.dtype == jnp.float32
        # float32's cos and arithmetic: within 2 ulp of the float64 value.
        np.testing.assert_allclose(got, want, rtol=2.5e-7, atol=0)
        if want == 1.0:
            assert float(got) == 1.0
        with jax.enable_x64(True):
            got = warmup_factor(t, interval, warmup, jnp.float64)
            np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)
    # reset_interval = 1: every step is a reset, but step 1 has no warm-up.
    assert float(warmup_factor(1, 1, 3)) == 1.0
    assert float(warmup_factor(2, 1, 3)) == pytest.approx(0.01, rel=1e-6)


def test_the_update_is_scaled_by_the_factor_and_only_by_it():
    # Same stream, warm-up 5 against none: the updates' ratio is the factor.
    stream = _stream(70, {})
    a, b = (_build(**dict(SETTINGS, theta=math.inf, warmup=w)) for w in (5, 0))
    sa, sb = a.init(_as(stream[0], jnp.float32)), b.init(_as(stream[0], jnp.float32))
    ref = Reference(**SETTINGS)
    for t, g in enumerate(stream, 1):
        ua, sa = a.update(_as(g, jnp.float32), sa)
        ub, sb = b.update(_as(g, jnp.float32), sb)
        for k in SHAPES:
            if ref.factor(t) == 1.0:
                np.testing.assert_array_equal(ua[k], ub[k])
            else:
                np.testing.assert_allclose(ua[k] / ub[k], ref.factor(t), rtol=5e-7)


def _unoptimized_xla() -> bool:
    """Whether XLA's CPU backend compiles at level 0 (tests/conftest.py)."""
    import os

    return "xla_backend_optimization_level=0" in os.environ.get("XLA_FLAGS", "")


def _assert_same(a, b):
    # At XLA's optimization level 0 (this suite's setting) the two programs
    # round alike: bit for bit. Optimized, XLA fuses them differently (fused
    # multiply-adds), so float32 rounding: relative 1e-6, absolute 1e-6 for
    # moments that cancel to near 0.
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        if _unoptimized_xla():
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_without_spikes_or_resets_it_is_optax_adam():
    # float32 (with a bfloat16 mu_dtype Optax computes b1 * mu in bfloat16,
    # scale_by_spam in float32: they differ by bfloat16 rounding).
    stream = _stream(60, SPIKES)  # spikes pass through: the threshold is inf
    tx = scale_by_spam(spike_threshold=math.inf, reset_interval=10**6)
    adam = optax.scale_by_adam()
    params = _as(stream[0], jnp.float32)
    s1, s2 = tx.init(params), adam.init(params)
    f1, f2 = jax.jit(tx.update), jax.jit(adam.update)
    for g in stream:
        u1, s1 = f1(_as(g, jnp.float32), s1)
        with jax.numpy_dtype_promotion("standard"):  # Optax's Adam needs it
            u2, s2 = f2(_as(g, jnp.float32), s2)
        _assert_same((u1, s1.mu, s1.nu, s1.count), (u2, s2.mu, s2.nu, s2.count))
        assert int(s1.spikes) == 0 and int(s1.reset_count) == 0


def test_spam_is_optax_adamw_without_spikes_or_resets():
    stream = _stream(40, SPIKES)
    params = _as(_stream(1, {}, seed=3)[0], jnp.float32)
    schedule = optax.linear_schedule(1e-2, 1e-3, 30)
    off = dict(spike_threshold=math.inf, reset_interval=10**6)
    mask = {"w": True, "b": False}
    pairs = [
        (spam(1e-2, **off), optax.adam(1e-2)),
        (spam(schedule, 0.8, 0.95, 1e-6, weight_decay=0.1, **off),
         optax.adamw(schedule, 0.8, 0.95, 1e-6, weight_decay=0.1)),
        (spam(1e-2, weight_decay=0.1, mask=mask, **off),
         optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(0.1, mask),
                     optax.scale_by_learning_rate(1e-2))),
    ]  # fmt: skip
    for ours, theirs in pairs:
        p1, p2 = params, params
        s1, s2 = ours.init(params), theirs.init(params)
        f1, f2 = jax.jit(ours.update), jax.jit(theirs.update)
        for g in stream:
            u1, s1 = f1(_as(g, jnp.float32), s1, p1)
            with jax.numpy_dtype_promotion("standard"):
                u2, s2 = f2(_as(g, jnp.float32), s2, p2)
            _assert_same(u1, u2)
            p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
        _assert_same(p1, p2)


def test_spam_decays_the_weights_and_scales_by_the_learning_rate():
    params = {"w": jnp.full((3,), 2.0), "b": jnp.full((2,), -1.0)}
    g = {"w": jnp.ones(3), "b": jnp.zeros(2)}
    tx = spam(0.1, weight_decay=0.5)
    updates, _ = tx.update(g, tx.init(params), params)
    # Step 1: Adam's update is g / (|g| + eps): 1 for w, 0 for b; within
    # float32's rounding of 1 - b2**1 = 1 - 0.999 (relative 6.7e-6).
    np.testing.assert_allclose(updates["w"], -0.1 * (1 + 0.5 * 2.0), rtol=1e-5)
    np.testing.assert_allclose(updates["b"], -0.1 * (0.5 * -1.0), rtol=1e-6)


@pytest.mark.parametrize("mu_dtype", [None, jnp.float32])
def test_half_precision_keeps_dtypes(mu_dtype):
    dtypes = {"w": jnp.float16, "b": jnp.bfloat16}
    stream = _stream(30, {24: [(1, 1)]})
    tx = _build(**SETTINGS, mu_dtype=mu_dtype)
    params = {k: jnp.asarray(stream[0][k], d) for k, d in dtypes.items()}
    state = tx.init(params)
    want = optax.scale_by_adam(mu_dtype=mu_dtype).init(params)
    for k, d in dtypes.items():
        assert state.mu[k].dtype == want.mu[k].dtype == (mu_dtype or d)
        assert state.nu[k].dtype == want.nu[k].dtype == d
    step = _traced_once(tx)
    ref = Reference(**SETTINGS)
    counts = []
    for g in stream:
        g = {k: jnp.asarray(g[k], d) for k, d in dtypes.items()}
        want, spikes, _ = ref.step({k: np.asarray(x, np.float64) for k, x in g.items()})
        out, state = step(g, state)
        for k, d in dtypes.items():
            assert out[k].dtype == d and state.nu[k].dtype == d
            assert state.mu[k].dtype == (mu_dtype or d)
            # Moments stored in half precision: their rounding (2**-8 for
            # bfloat16) accumulates over the steps.
            np.testing.assert_allclose(
                np.asarray(out[k], np.float32), want[k], rtol=0.05, atol=0.05
            )
        assert int(state.spikes) == spikes
        counts.append(spikes)
    assert counts[23] == 1 == sum(counts)  # step 24's spike, clipped in float16


def test_one_trace_over_resets_and_warmup():
    tx = _build(**SETTINGS)
    step = _traced_once(tx)
    stream = _stream(65, SPIKES)
    state = tx.init(_as(stream[0], jnp.float32))
    for g in stream:
        _, state = step(_as(g, jnp.float32), state)
    assert int(state.reset_count) == 2


def test_inject_hyperparams_matches_the_static_transform():
    stream = _stream(65, SPIKES)
    kwargs = dict(b1=0.8, b2=0.9, spike_threshold=10.0, reset_interval=30,
                  warmup_steps=5)  # fmt: skip
    injected = optax.inject_hyperparams(scale_by_spam)(**kwargs)
    plain = scale_by_spam(**kwargs)
    s1, s2 = injected.init(_as(stream[0], jnp.float32)), plain.init(stream[0])
    step = _traced_once(injected)
    for g in stream:
        u1, s1 = step(_as(g, jnp.float32), s1)
        u2, s2 = plain.update(_as(g, jnp.float32), s2)
        # Injected betas are float32 arrays: 1 - b1 rounds otherwise.
        for x, y in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        assert int(s1.inner_state.spikes) == int(s2.spikes)
        assert int(s1.inner_state.reset_count) == int(s2.reset_count)


def test_inject_hyperparams_of_spam():
    stream = _stream(35, SPIKES)
    kwargs = dict(learning_rate=0.1, b2=0.9, spike_threshold=10.0, reset_interval=30,
                  warmup_steps=5, weight_decay=0.01)  # fmt: skip
    injected, plain = optax.inject_hyperparams(spam)(**kwargs), spam(**kwargs)
    params = _as(_stream(1, {}, seed=3)[0], jnp.float32)
    s1, s2 = injected.init(params), plain.init(params)
    step = jax.jit(injected.update)
    for g in stream:
        u1, s1 = step(_as(g, jnp.float32), s1, params)
        u2, s2 = plain.update(_as(g, jnp.float32), s2, params)
        for x, y in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [0.0, -1.0, -math.inf, math.nan])
def test_runtime_threshold_at_or_below_zero_or_nan_clips_to_zero(bad):
    # Steps 1-25 with threshold 10 (the gate opens at step 20); step 26 with
    # ``bad``: every nonzero element is clipped to 0, so the moments see a
    # zero gradient: never NaN, never the reversed gradient.
    stream = _stream(26, {})
    injected = optax.inject_hyperparams(scale_by_spam)(
        b2=0.9, spike_threshold=10.0, reset_interval=30, warmup_steps=5
    )
    state = injected.init(_as(stream[0], jnp.float32))
    step = jax.jit(injected.update)
    for g in stream[:-1]:
        _, state = step(_as(g, jnp.float32), state)
    before = state
    hyper = dict(state.hyperparams, spike_threshold=jnp.asarray(bad, jnp.float32))
    state = state._replace(hyperparams=hyper)
    g = _as(stream[-1], jnp.float32)
    out, state = step(g, state)
    zero, _ = step(jax.tree.map(jnp.zeros_like, g), before)
    _assert_same(out, zero)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
    for k in SHAPES:  # the direction of the moments, not -g
        want = jnp.sign(before.inner_state.mu[k])
        np.testing.assert_array_equal(jnp.sign(out[k]), want)
    assert int(state.inner_state.spikes) == sum(x.size for x in g.values())
    # Inside the gate a bad threshold changes nothing.
    fresh = injected.init(g)
    hyper = dict(fresh.hyperparams, spike_threshold=jnp.asarray(bad, jnp.float32))
    out, s = step(g, fresh._replace(hyperparams=hyper))
    ok, _ = step(g, fresh)
    _assert_same(out, ok)
    assert int(s.inner_state.spikes) == 0


def test_a_threshold_schedule_going_negative():
    stream = _stream(40, {})
    tx = scale_by_spam(
        b2=0.9, spike_threshold=lambda n: 30 - n.astype(jnp.float32), reset_interval=100
    )
    state = tx.init(stream[0])
    step = jax.jit(tx.update)
    counts = []
    for g in stream:
        out, state = step(_as(g, jnp.float32), state)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
        counts.append(int(state.spikes))
    total = sum(math.prod(s) for s in SHAPES.values())
    # The schedule is evaluated at the count before the step (0 at step 1):
    # from step 31 it is <= 0 and clips everything.
    assert counts[:19] == [0] * 19 and counts[30:] == [total] * 10


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(b1=1.0), ValueError, r"`b1` must be in \[0, 1\), got 1.0"),
        (dict(b1=-0.1), ValueError, r"`b1` must be in \[0, 1\)"),
        (dict(b2=1.5), ValueError, r"`b2` must be in \[0, 1\), got 1.5"),
        (dict(b2=math.nan), ValueError, "`b2` must be finite"),
        (dict(eps=-1e-8), ValueError, "`eps` must be >= 0, got -1e-08"),
        (dict(spike_threshold=0.0), ValueError, "`spike_threshold` must be > 0"),
        (dict(spike_threshold=-5.0), ValueError, "`spike_threshold` must be > 0"),
        (dict(spike_threshold=math.nan), ValueError, "`spike_threshold` must be fin"),
        (dict(spike_threshold=-math.inf), ValueError, "`spike_threshold` must be f"),
        (dict(reset_interval=0), ValueError, "`reset_interval` must be an int >= 1"),
        (dict(reset_interval=2.5), TypeError, "`reset_interval` must be an int"),
        (dict(reset_interval=True), TypeError, "`reset_interval` must be an int"),
        (dict(warmup_steps=-1), ValueError, "`warmup_steps` must be an int >= 0"),
        (dict(warmup_steps=3.0), TypeError, "`warmup_steps` must be an int"),
        (dict(mu_dtype=jnp.int32), TypeError, "`mu_dtype` must be a floating"),
    ],
)
def test_bad_arguments_raise_at_build_time(kwargs, error, match):
    with pytest.raises(error, match=match):
        scale_by_spam(**kwargs)
    with pytest.raises(error, match=match):
        spam(1e-3, **kwargs)


def test_bad_spam_arguments_raise():
    with pytest.raises(ValueError, match="`weight_decay` must be >= 0, got -0.1"):
        spam(1e-3, weight_decay=-0.1)
    with pytest.raises(ValueError, match="`learning_rate` must be >= 0"):
        spam(-1e-3)
    # Accepted: no clipping, a warm-up longer than the period, no warm-up.
    scale_by_spam(spike_threshold=math.inf, reset_interval=10, warmup_steps=50)
    scale_by_spam(reset_interval=1, warmup_steps=0)


def test_another_tree_is_rejected():
    tx = scale_by_spam()
    state = tx.init({"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match="`scale_by_spam` was initialized"):
        tx.update({"v": jnp.zeros(3)}, state)
    assert isinstance(state, ScaleBySpamState)


def _tree(seed, scale):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=s) * scale) for k, s in SHAPES.items()}


@pytest.mark.parametrize(
    "name, build, before",
    [
        # Step 22: the gate is open and the differentiated gradient (std 1)
        # has spikes against v, built by b2 = 0.5 from the last steps.
        (
            "clipping",
            lambda: scale_by_spam(b2=0.5, spike_threshold=4.0, reset_interval=30),
            [1.0] * 21,
        ),
        (
            "reset and warm-up",
            lambda: scale_by_spam(reset_interval=4, warmup_steps=3),
            [1.0] * 4,
        ),
        (
            "spam",
            lambda: spam(
                0.1, b2=0.5, spike_threshold=4.0, reset_interval=30, weight_decay=0.1
            ),
            [1.0] * 21,
        ),
    ],
)
def test_grad_and_jvp_match_finite_differences(name, build, before):
    with jax.enable_x64(True):
        tx = build()
        params = _tree(1, 1.0)
        state = tx.init(params)
        for i, s in enumerate(before):
            _, state = tx.update(_tree(10 + i, s), state, params)
        g, weights = _tree(3, 1.0), _tree(2, 1.0)

        def f(g, p):
            out, _ = tx.update(g, state, p)
            terms = jax.tree.map(lambda w, u: jnp.sum(w * u), weights, out)
            return sum(jax.tree.leaves(terms))

        check_grads(f, (g, params), order=1, modes=("fwd", "rev"))
        spikes = optax.tree.get(tx.update(g, state, params)[1], "spikes")
        if name != "reset and warm-up":
            total = sum(math.prod(s) for s in SHAPES.values())
            assert 0 < int(spikes) < total  # clipping acts, not everywhere
        grads = jax.jit(jax.grad(f))(g, params)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(grads))
        assert any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(grads))
        # At a zero gradient (v = 0 after a reset included) too.
        zeros = jax.tree.map(jnp.zeros_like, g)
        grads = jax.grad(f, argnums=(0, 1))(zeros, params)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(grads))


def test_docstring_examples():
    result = doctest.testmod(_spam, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
