"""adagc: step by step against a float64 NumPy port of the rule, and its edges."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _streams import traced_once
from jax.test_util import check_grads

from jstab.clipping._adagc import AdaGCState, adagc

NAMES = ("w", "b", "v")
SHAPES = {"w": (4, 3), "b": (3,), "v": (5,)}


class _Reference:
    """The rule in float64 NumPy, written from the paper's Algorithm 1.

    With this library's documented choices: a norm at or below ``eps`` never
    enters γ's minimum nor becomes γ, a γ at or below ``eps`` (or +inf)
    counts as none (no clip; the next norm above ``eps`` becomes γ), and a
    non-finite norm leaves γ unchanged (in the warm-up: every γ).
    """

    def __init__(self, clipping=1.0, relative=1.05, beta=0.98, warmup_steps=100,
                 eps=1e-12):  # fmt: skip
        self.__dict__.update(locals())
        self.gamma = np.full(len(NAMES), np.inf)
        self.count = self.clip_count = 0

    def step(self, grads):
        """``(outputs, norms, per-tensor clipped?, clipped fraction)``."""
        g = [np.asarray(grads[k], np.float64) for k in NAMES]
        norms = np.array([np.sqrt(np.sum(x * x)) for x in g])
        if self.count < self.warmup_steps:
            total = np.sqrt(np.sum(norms**2))
            h = self.clipping / total if total > self.clipping else 1.0
            outs = [x * h for x in g]
            if np.isfinite(total):
                for i, n in enumerate(norms * h):
                    if n > self.eps:
                        self.gamma[i] = min(self.gamma[i], n)
            over = [bool(total > self.clipping)] * len(g)
            fraction = float(total > self.clipping)
        else:
            outs, over = [], []
            for i, (x, n) in enumerate(zip(g, norms, strict=True)):
                gamma = self.gamma[i]
                known = np.isfinite(gamma) and gamma > self.eps
                limit = self.relative * gamma if known else np.inf
                over.append(bool(n > limit))
                outs.append(x * (limit / n) if n > limit else x)
                clipped = min(n, limit)
                if np.isfinite(n):
                    if known:
                        self.gamma[i] = self.beta * gamma + (1 - self.beta) * clipped
                    elif clipped > self.eps:
                        self.gamma[i] = clipped
            fraction = sum(over) / len(g)
        self.count += 1
        self.clip_count += fraction > 0
        return dict(zip(NAMES, outs, strict=True)), norms, over, fraction


def _grads(norms, rng, dtype=jnp.float32):
    """A gradient whose tensors have (about) the given norms, random directions."""
    out = {}
    for name, n in zip(NAMES, norms, strict=True):
        d = rng.normal(size=SHAPES[name])
        out[name] = jnp.asarray(d / np.linalg.norm(d) * n, dtype)
    return out


def _stream(kwargs, steps=40, spikes=None, seed=0):
    """Gradients: a scripted warm-up, then norms set against the reference's γ.

    Warm-up (4 steps): calm, a step clipped globally by ``b``'s spike, calm,
    quiet. Afterwards each tensor's norm is 0.8 to 1.0 times its γ (below
    the threshold λ_rel·γ by 5 % or more, far beyond float32 rounding),
    except ``b`` at the steps of ``spikes``: then that many times its γ.
    """
    spikes = {6: 8.0, 9: 30.0, 15: 1.3, 22: 3.0} if spikes is None else spikes
    rng = np.random.default_rng(seed)
    ref = _Reference(**kwargs)
    warm = [(0.5, 0.3, 0.4), (0.45, 1.2, 0.35), (0.42, 0.28, 0.37), (0.4, 0.3, 0.33)]
    stream = []
    for t in range(steps):
        if t < len(warm):
            norms = warm[t]
        else:
            norms = ref.gamma * rng.uniform(0.8, 1.0, 3)
            if t in spikes:
                norms[1] = ref.gamma[1] * spikes[t]
        g = _grads(norms, rng)
        ref.step(g)
        stream.append(g)
    return stream


CONFIGS = [
    dict(warmup_steps=4),  # the paper's λ_rel and β
    dict(warmup_steps=4, relative=1.04, beta=0.99),  # the authors' code's
    dict(warmup_steps=4, clipping=0.8, relative=1.2, beta=0.5),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=["paper", "authors", "other"])
def test_matches_reference_step_by_step_in_one_trace(kwargs):
    stream = _stream(kwargs)
    ref = _Reference(**kwargs)
    tx = adagc(**kwargs)
    state = tx.init(stream[0])
    assert isinstance(state, AdaGCState)
    for x in jax.tree.leaves(state.gamma):  # +inf: no reference yet
        assert x.dtype == jnp.float32 and x.shape == () and np.isposinf(x)
    step = traced_once(tx)
    spiked, warm_clips = [], 0
    for t, g in enumerate(stream):
        out, state = step(g, state)
        want, norms, over, fraction = ref.step(g)
        # float32 against float64: a norm of a few elements is within a few
        # ulps (1e-7); γ's moving average carries each step's rounding with
        # weight β, so up to about 1/(1 - β) = 100 of them: 1e-5 covers it.
        for i, k in enumerate(NAMES):
            if over[i]:
                np.testing.assert_allclose(out[k], want[k], rtol=1e-5, atol=0)
            else:
                np.testing.assert_array_equal(out[k], g[k])  # bit for bit
            np.testing.assert_allclose(state.norm[k], norms[i], rtol=1e-6)
            np.testing.assert_allclose(state.gamma[k], ref.gamma[i], rtol=1e-5)
            assert state.gamma[k].dtype == jnp.float32
        assert float(state.clipped) == np.float32(fraction), t
        assert int(state.clip_count) == ref.clip_count, t
        assert int(state.count) == t + 1
        if t < 4 and over[0]:
            warm_clips += 1
            # The warm-up's global clip scales every tensor by one factor.
            ratios = [float(out[k].ravel()[0] / g[k].ravel()[0]) for k in NAMES]
            np.testing.assert_allclose(ratios, ratios[0], rtol=1e-6)
            assert float(state.clipped) == 1.0
        if t >= 4:
            spiked.append([k for k, o in zip(NAMES, over, strict=True) if o])
    assert warm_clips == 1
    # After the warm-up only b, at its spikes, is clipped.
    want = [["b"] if t in (6, 9, 15, 22) else [] for t in range(4, len(stream))]
    assert spiked == want
    assert int(state.clip_count) == 1 + 4


def test_gamma_is_the_running_minimum_of_the_clipped_norms_in_warmup():
    tx = adagc(clipping=1.0, warmup_steps=3)
    rng = np.random.default_rng(1)
    stream = [(0.3, 0.2, 0.4), (0.9, 0.1, 0.5), (0.2, 0.3, 0.2)]
    state = tx.init(_grads(stream[0], rng))
    low = np.full(3, np.inf)
    step = traced_once(tx)
    for norms in stream:
        g = _grads(norms, rng)
        _, state = step(g, state)
        n = np.array([np.linalg.norm(np.asarray(g[k], np.float64)) for k in NAMES])
        total = np.linalg.norm(n)
        low = np.minimum(low, n * min(1.0, 1.0 / total))
        got = [float(state.gamma[k]) for k in NAMES]
        np.testing.assert_allclose(got, low, rtol=1e-6)
    # The second step (global norm 1.04) was clipped: all three together.
    assert int(state.clip_count) == 1


def test_non_finite_tensor_leaves_its_gamma_unchanged():
    rng = np.random.default_rng(2)
    tx = adagc(warmup_steps=2)
    state = tx.init(_grads((1, 1, 1), rng))
    for _ in range(2):
        _, state = tx.update(_grads((0.5, 0.3, 0.4), rng), state)
    before = dict(state.gamma)
    for bad in (np.inf, np.nan):
        g = _grads((0.45, 0.3, 0.38), rng)
        g["b"] = g["b"].at[0].set(bad)
        out, state = tx.update(g, state)
        assert float(state.gamma["b"]) == float(before["b"])
        for k in ("w", "v"):  # the others moved on
            assert float(state.gamma[k]) != float(before[k])
            assert np.isfinite(state.gamma[k])
            before[k] = state.gamma[k]
        np.testing.assert_array_equal(out["w"], g["w"])
    # In the warm-up a non-finite global norm leaves every γ unchanged.
    state = tx.init(g)
    _, state = tx.update(_grads((0.5, 0.3, 0.4), rng), state)
    before = [float(x) for x in jax.tree.leaves(state.gamma)]
    g = _grads((0.2, 0.1, 0.1), rng)
    g["v"] = g["v"].at[1].set(np.nan)
    _, state = tx.update(g, state)
    assert [float(x) for x in jax.tree.leaves(state.gamma)] == before


def test_zero_gradient_in_warmup_never_freezes_a_tensor():
    # In the paper a tensor with a zero gradient at a warm-up step gets γ = 0
    # and is zeroed at every later step; here it has no γ until it has a
    # norm, and that norm (unclipped) becomes γ.
    rng = np.random.default_rng(3)
    tx = adagc(warmup_steps=2)
    ref = _Reference(warmup_steps=2)
    stream = [(0.5, 0.0, 0.4), (0.5, 0.0, 0.4), (0.5, 2.0, 0.4), (0.5, 2.5, 0.4)]
    state = tx.init(_grads(stream[0], rng))
    for t, norms in enumerate(stream):
        g = _grads(norms, rng)
        out, state = tx.update(g, state)
        want, _, over, _ = ref.step(g)
        if t == 1:
            assert np.isposinf(state.gamma["b"])
        if t == 2:  # b's first norm: not clipped, it becomes γ
            np.testing.assert_array_equal(out["b"], g["b"])
            np.testing.assert_allclose(state.gamma["b"], 2.0, rtol=1e-6)
        if t == 3:  # then clipped to 1.05 γ
            assert over[1]
            np.testing.assert_allclose(out["b"], want["b"], rtol=1e-6)
            np.testing.assert_allclose(jnp.linalg.norm(out["b"]), 2.1, rtol=1e-6)


def test_gamma_decayed_to_eps_counts_as_none():
    tx = adagc(warmup_steps=1, beta=0.5, eps=1e-3)
    step = traced_once(tx)
    g = {"a": jnp.ones(4)}
    state = tx.init(g)
    _, state = step(g, state)  # global clip to 1: γ = 1
    for _ in range(10):  # zero gradients: γ halves, to 1/1024 < eps
        _, state = step({"a": jnp.zeros(4)}, state)
    assert float(state.gamma["a"]) <= 1e-3
    out, state = step({"a": jnp.full(4, 3.0, jnp.float32)}, state)
    np.testing.assert_array_equal(out["a"], jnp.full(4, 3.0))  # not clipped
    np.testing.assert_allclose(state.gamma["a"], 6.0, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_keeps_dtypes_and_clips_half_precision_in_float32(dtype):
    rng = np.random.default_rng(4)
    tx = adagc(warmup_steps=2)
    state = None
    for norms in [(0.5, 0.3, 0.4), (0.5, 0.3, 0.4), (0.5, 30.0, 0.4)]:
        g = _grads(norms, rng, dtype)
        g["v"] = g["v"].astype(jnp.float32)  # a mixed tree
        state = tx.init(g) if state is None else state
        out, state = jax.jit(tx.update)(g, state)
        chex.assert_trees_all_equal_dtypes(out, g)
        for x in jax.tree.leaves((state.norm, state.gamma, state.clipped)):
            assert x.dtype == jnp.float32
    # b's spike of 30 was clipped to 1.05 γ, γ from its half-precision norms.
    b = np.asarray(g["b"], np.float64)
    want = b * 1.05 * 0.3 / np.linalg.norm(b)
    np.testing.assert_allclose(np.asarray(out["b"], np.float64), want, rtol=5e-3)
    np.testing.assert_array_equal(out["w"], g["w"])
    assert float(state.clipped) == pytest.approx(1 / 3)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan], ids=["zero", "neg", "nan"])
@pytest.mark.parametrize("key", ["clipping", "relative"])
def test_injected_bad_threshold_zeroes_the_step_and_gamma_stays_finite(key, bad):
    rng = np.random.default_rng(5)
    tx = optax.inject_hyperparams(adagc)(warmup_steps=2)
    stream = [_grads((0.5, 0.3, 0.4), rng) for _ in range(4)]
    state = tx.init(stream[0])
    step = jax.jit(tx.update)
    for t, g in enumerate(stream):
        # clipping acts in the warm-up (t < 2), relative afterwards.
        active = t < 2 if key == "clipping" else t >= 2
        if active:
            state.hyperparams[key] = jnp.asarray(bad, jnp.float32)
        out, new = step(g, state)
        eager, eager_state = tx.update(g, state)
        chex.assert_trees_all_equal((out, new), (eager, eager_state))
        state = new
        if active:
            assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(out))
            assert float(optax.tree.get(state, "clipped")) == 1.0
        gamma = optax.tree.get(state, "gamma")
        assert not any(bool(jnp.isnan(x)) for x in jax.tree.leaves(gamma))
        state.hyperparams[key] = jnp.asarray(1.0 if key == "clipping" else 1.05)


def test_schedules_through_zero_never_reverse_the_update():
    rng = np.random.default_rng(6)
    relative = optax.linear_schedule(1.5, -1.5, transition_steps=6)
    clipping = optax.linear_schedule(1.0, -1.0, transition_steps=2)
    tx = adagc(clipping, relative=relative, warmup_steps=3)
    state = tx.init(_grads((1, 1, 1), rng))
    for _ in range(8):
        g = _grads((0.8, 0.6, 0.7), rng)
        out, state = jax.jit(tx.update)(g, state)
        for k in NAMES:  # each tensor scaled by a factor in [0, 1]
            ratio = np.asarray(out[k]) / np.asarray(g[k])
            assert np.all((ratio >= 0) & (ratio <= 1))
        assert all(np.isfinite(x) for x in jax.tree.leaves(state.gamma))
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(out))


def test_inject_hyperparams_matches_the_plain_transform():
    kwargs = CONFIGS[0]
    stream = _stream(kwargs, steps=12)
    plain, injected = adagc(**kwargs), optax.inject_hyperparams(adagc)(**kwargs)
    a, b = plain.init(stream[0]), injected.init(stream[0])
    step = traced_once(injected)
    for g in stream:
        want, a = plain.update(g, a)
        got, b = step(g, b)
        chex.assert_trees_all_close(got, want, rtol=1e-6)
        chex.assert_trees_all_close(b.inner_state, a, rtol=1e-6)
    assert int(a.clip_count) >= 2


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(clipping=0.0), ValueError, "`clipping` must be > 0, got 0.0"),
        (dict(clipping=-1.0), ValueError, "`clipping` must be > 0"),
        (dict(clipping=np.inf), ValueError, "`clipping` must be finite"),
        (dict(relative=0.0), ValueError, "`relative` must be > 0, got 0.0"),
        (dict(relative="1"), TypeError, "`relative` must be a real number"),
        (dict(beta=1.0), ValueError, r"`beta` must be in \[0, 1\), got 1.0"),
        (dict(beta=-0.1), ValueError, r"`beta` must be in \[0, 1\)"),
        (dict(beta=lambda c: 0.9), TypeError, "`beta` must be a real number"),
        (dict(eps=-1e-9), ValueError, "`eps` must be >= 0, got -1e-09"),
        (dict(warmup_steps=0), ValueError, "`warmup_steps` must be an int >= 1"),
        (dict(warmup_steps=2.0), TypeError, "`warmup_steps` must be an int"),
        (dict(warmup_steps=True), TypeError, "`warmup_steps` must be an int"),
    ],
)
def test_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        adagc(**kwargs)


def test_beta_zero_and_eps_zero_are_allowed():
    tx = adagc(beta=0.0, eps=0.0, warmup_steps=1)
    g = {"a": jnp.ones(3)}
    state = tx.init(g)
    for _ in range(3):
        _, state = tx.update(g, state)
    # γ = the last clipped norm: 1 (warm-up), then 1.05, then 1.05**2.
    np.testing.assert_allclose(state.gamma["a"], 1.05**2, rtol=1e-6)


def test_rejects_another_tree():
    tx = adagc()
    state = tx.init({"a": jnp.zeros(2), "b": jnp.zeros(3)})
    with pytest.raises(ValueError, match="`adagc` was initialized for another tree"):
        tx.update({"a": jnp.zeros(2)}, state)


def test_empty_tree():
    tx = adagc()
    out, state = tx.update({}, tx.init({}))
    assert out == {} and int(state.count) == 1 and float(state.clipped) == 0


def _tree(seed, scale):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=s) * scale) for k, s in SHAPES.items()}


@pytest.mark.parametrize(
    ("before", "spike", "fraction"),
    [(0, 1.0, 1.0), (2, 10.0, 1 / 3), (2, 1.0, 0.0), (2, None, 1.0)],
    ids=["warmup", "b-clipped", "none-clipped", "all-clipped"],
)
def test_grad_and_jvp_match_finite_differences(before, spike, fraction):
    # The warm-up (global norm about 4.5, clipped to 1) or, after two
    # warm-up steps with the gradient at a tenth of its size (γ = its
    # norms, unclipped), the gradient itself with b scaled by ``spike``, or
    # ten times it (None). No tensor is within 5 % of its threshold.
    with jax.enable_x64(True):
        tx = adagc(warmup_steps=2)
        state = tx.init(_tree(0, 1.0))
        for _ in range(before):
            _, state = tx.update(_tree(2, 0.1), state)
        weights = _tree(1, 1.0)
        g = _tree(2, 1.0 if spike is None or not before else 0.1)
        if spike is not None:
            g["b"] = g["b"] * spike

        def f(g):
            out, _ = tx.update(g, state)
            return sum(jnp.sum(weights[k] * out[k]) for k in out)

        out, new = tx.update(g, state)
        assert out["w"].dtype == jnp.float64
        assert float(new.clipped) == pytest.approx(fraction)
        # Under jit: the same rule, compiled once instead of op by op.
        check_grads(jax.jit(f), (g,), order=1, modes=("fwd", "rev"))
        grads = jax.jit(jax.grad(f))(g)
        assert any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(grads))


@pytest.mark.parametrize("before", [0, 2], ids=["warmup", "after"])
def test_gradient_at_a_zero_gradient_is_finite(before):
    tx = adagc(warmup_steps=2)
    zeros = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    state = tx.init(zeros)
    for i in range(before):
        _, state = tx.update(_tree(10 + i, 0.1), state)

    def f(g):
        out, _ = tx.update(g, state)
        return sum(jnp.sum(out[k]) for k in out)

    jvp = jax.jit(lambda g, t: jax.jvp(f, (g,), (t,)))
    for grads in (jax.jit(jax.grad(f))(zeros), jvp(zeros, _tree(3, 1.0))):
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(grads))


def test_in_a_chain_with_adam_under_jit():
    stream = _stream(CONFIGS[0], steps=10)
    params = jax.tree.map(jnp.zeros_like, stream[0])
    with jax.numpy_dtype_promotion("standard"):  # Optax's adam mixes dtypes
        tx = optax.chain(adagc(warmup_steps=4), optax.adam(1e-3))
        alone, adam = adagc(warmup_steps=4), optax.adam(1e-3)
        state = tx.init(params)
        s1, s2 = alone.init(params), adam.init(params)
        step = jax.jit(tx.update)
        for g in stream:
            out, state = step(g, state, params)
            clipped, s1 = alone.update(g, s1)
            want, s2 = adam.update(clipped, s2, params)
            chex.assert_trees_all_close(out, want, rtol=1e-5, atol=1e-9)
    chex.assert_trees_all_close(optax.tree.get(state, "gamma"), s1.gamma)
    assert int(optax.tree.get(state, "clip_count")) == int(s1.clip_count) > 0
