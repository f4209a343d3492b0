"""dynamic_loss_scale: the scale follows GradScaler's and jmp's rule, step by
step; a non-finite step changes nothing but the scale; the unscaled update is
the gradient of the unscaled loss; loss_scale finds the scale anywhere."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jstab

# ------------------------------------------------------------------ references


def reference(
    stream,
    *,
    init_scale=2.0**15,
    growth_interval=2000,
    growth_factor=2.0,
    backoff_factor=0.5,
    min_scale=1.0,
    max_scale=2.0**24,
):
    """The SPEC's rule in float64 Python: per step (scale, good_steps,
    skipped, skip_count), ``stream`` giving whether each step is finite."""
    scale, good, skips, out = float(init_scale), 0, 0, []
    for finite in stream:
        if finite:
            good += 1
            if good >= growth_interval:
                scale, good = min(scale * growth_factor, max_scale), 0
        else:
            scale, good, skips = max(scale * backoff_factor, min_scale), 0, skips + 1
        out.append((scale, good, not finite, skips))
    return out


def jmp_reference(stream, *, loss_scale, period, factor, min_loss_scale):
    """jmp.DynamicLossScale.adjust as documented: per step (scale, counter)."""
    counter, out = 0, []
    for finite in stream:
        if finite:
            if counter == period - 1:
                grown = loss_scale * factor
                loss_scale = grown if math.isfinite(grown) else loss_scale
                counter = 0
            else:
                counter += 1
        else:
            loss_scale, counter = max(min_loss_scale, loss_scale / factor), 0
        out.append((loss_scale, counter))
    return out


# --------------------------------------------------------------------- streams

_DTYPES = {"a": jnp.float32, "b": jnp.float16, "c": jnp.bfloat16}
_BAD = [("a", np.nan), ("b", np.inf), ("c", -np.inf)]


def _grads(t, finite, bad_so_far):
    """Step ``t``'s scaled gradient: finite, or with one NaN, +inf or -inf
    element (in turn, in leaf a, b or c)."""
    g = {k: np.linspace(0.5, 2.0, 3) * (1 + t % 5) * (-1) ** t for k in ("a", "b", "c")}
    if not finite:
        leaf, value = _BAD[bad_so_far % 3]
        g[leaf][1] = value
    return {k: jnp.asarray(v, _DTYPES[k]) for k, v in g.items()}


def _zeros():
    return {k: jnp.zeros(3, d) for k, d in _DTYPES.items()}


def _run(stream, **kwargs):
    """Runs jitted dynamic_loss_scale(sgd(1.0)) on the stream; checks each
    step's updates and returns the per-step states."""
    tx = jstab.dynamic_loss_scale(optax.sgd(1.0), **kwargs)
    state = tx.init(_zeros())
    step = jax.jit(tx.update)
    states, bad = [], 0
    for t, finite in enumerate(stream):
        g = _grads(t, finite, bad)
        bad += not finite
        before = np.float32(state.scale)
        out, state = step(g, state)
        for k, x in out.items():
            assert x.dtype == g[k].dtype
            if finite:
                # Times 1/S in float32, as GradScaler and jmp unscale.
                inverse = np.float32(1) / before
                want = -(np.asarray(g[k], np.float32) * inverse).astype(x.dtype)
                np.testing.assert_array_equal(x, want, err_msg=f"{t} {k}")
            else:
                np.testing.assert_array_equal(x, np.zeros(3, x.dtype))
        states.append(state)
    return states


def _stream(text):
    return [c == "G" for c in text]


# name: (stream, kwargs, what the reference must hit)
_SCRIPTS = {
    "growth up to the max_scale cap": (
        "G" * 16,
        dict(init_scale=16.0, growth_interval=3, max_scale=200.0),
        "max",
    ),
    "backoff down to the min_scale floor": (
        "GNNNNGNGG",
        dict(init_scale=16.0, growth_interval=2, min_scale=3.0),
        "min",
    ),
    "a non-finite step resets the good-step count": (
        "GGGNGGGGGGGGGGGNG",
        dict(init_scale=16.0, growth_interval=4),
        None,
    ),
    "growth_interval=1": (
        "GGGNGGNNGGG",
        dict(init_scale=4.0, growth_interval=1, max_scale=64.0),
        "max",
    ),
    "factor 3, backoff 0.3, both bounds": (
        "GGGGGGGGGGNNNNNNNGGGGGNGGGNG",
        dict(
            init_scale=10.0,
            growth_interval=2,
            growth_factor=3.0,
            backoff_factor=0.3,
            min_scale=0.7,
            max_scale=500.0,
        ),
        "both",
    ),
}


@pytest.mark.parametrize("name", list(_SCRIPTS))
def test_scripted_stream_matches_reference(name):
    text, kwargs, hits = _SCRIPTS[name]
    stream = _stream(text)
    want = reference(stream, **kwargs)
    scales = [s for s, *_ in want]
    if hits in ("max", "both"):
        assert max(scales) == kwargs["max_scale"]
    if hits in ("min", "both"):
        assert min(scales) == kwargs["min_scale"]
    states = _run(stream, **kwargs)
    for t, (state, (scale, good, skipped, skips)) in enumerate(
        zip(states, want, strict=True)
    ):
        np.testing.assert_allclose(state.scale, scale, rtol=1e-6, err_msg=str(t))
        assert int(state.good_steps) == good, t
        assert bool(state.skipped) == skipped, t
        assert int(state.skip_count) == skips, t
        stats = jstab.statistics(state)
        np.testing.assert_allclose(
            stats["dynamic_loss_scale/scale"], scale, rtol=1e-6, err_msg=str(t)
        )
        assert bool(stats["dynamic_loss_scale/skipped"]) == skipped, t
        assert int(stats["dynamic_loss_scale/skip_count"]) == skips, t
        np.testing.assert_array_equal(jstab.loss_scale(state), state.scale)


def test_reset_in_the_middle_of_a_run_delays_growth():
    # Spelled out for one stream: without the reset, step 4 would grow.
    states = _run(_stream("GGGNGGGG"), init_scale=16.0, growth_interval=4)
    assert [float(s.scale) for s in states] == [16, 16, 16, 8, 8, 8, 8, 16]
    assert [int(s.good_steps) for s in states] == [1, 2, 3, 0, 1, 2, 3, 0]


@pytest.mark.parametrize("period, factor", [(4, 2.0), (3, 4.0)])
def test_random_stream_matches_both_references(period, factor):
    rng = np.random.default_rng(1234)
    stream = list(rng.random(200) >= 0.1)
    assert 10 <= stream.count(False) <= 30
    kwargs = dict(
        init_scale=2.0**12,
        growth_interval=period,
        growth_factor=factor,
        backoff_factor=1 / factor,
        min_scale=1.0,
        max_scale=2.0**100,  # jmp has no cap
    )
    want = reference(stream, **kwargs)
    jmp = jmp_reference(
        stream, loss_scale=2.0**12, period=period, factor=factor, min_loss_scale=1.0
    )
    assert [(s, g) for s, g, *_ in want] == jmp
    assert max(s for s, _ in jmp) > 2.0**12  # the scale moves both ways
    states = _run(stream, **kwargs)
    for t, (state, (scale, good, skipped, skips)) in enumerate(
        zip(states, want, strict=True)
    ):
        assert float(state.scale) == scale, t  # powers of two: exact
        assert int(state.good_steps) == good, t
        assert bool(state.skipped) == skipped, t
        assert int(state.skip_count) == skips, t


# ------------------------------------------------------- skipped steps, exactly


def test_nonfinite_step_leaves_params_and_adam_state_bit_for_bit():
    tx = jstab.dynamic_loss_scale(optax.adam(1e-2), init_scale=16.0)
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    for _ in range(3):
        g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
        out, state = step(g, state, params)
        params = optax.apply_updates(params, out)
    assert not bool(state.skipped)
    mu = state.inner_state[0].mu
    assert all(np.all(np.asarray(x) != 0) for x in jax.tree.leaves(mu))
    for leaf, value in [("w", np.nan), ("b", np.inf), ("w", -np.inf)]:
        before_params, before_inner = params, state.inner_state
        g = jax.tree.map(lambda p: np.ones(p.shape, np.float32), params)
        g[leaf].flat[1] = value
        out, state = step(g, state, params)
        params = optax.apply_updates(params, out)
        assert bool(state.skipped)
        for x in jax.tree.leaves(out):
            np.testing.assert_array_equal(x, np.zeros_like(x))
        for a, b in zip(
            jax.tree.leaves(params), jax.tree.leaves(before_params), strict=True
        ):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(state.inner_state),
            jax.tree.leaves(before_inner),
            strict=True,
        ):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    assert int(state.skip_count) == 3
    np.testing.assert_array_equal(state.scale, 2.0)


# ------------------------------------------------ unscaled update == gradient


def _mlp_params(dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "w1": jax.random.normal(k1, (4, 8)) * 0.5,
        "b1": jnp.linspace(-0.1, 0.1, 8),
        "w2": jax.random.normal(k2, (8, 1)) * 0.5,
        "b2": jnp.zeros(1),
    }
    x = jax.random.normal(k3, (16, 4))
    y = jnp.sin(x[:, :1])
    return jax.tree.map(lambda p: p.astype(dtype), params), x.astype(dtype), y


def _mlp_loss(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    out = (h @ p["w2"] + p["b2"]).astype(jnp.float32)
    return jnp.mean(jnp.square(out - y))


def _scaled_update(params, x, y, **kwargs):
    tx = jstab.dynamic_loss_scale(optax.sgd(1.0), **kwargs)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: jstab.scale_loss(_mlp_loss(p, x, y), state))(params)
        return tx.update(grads, state, params)

    out, state = step(params, state)
    assert not bool(state.skipped)
    return out


def test_unscaled_update_is_minus_the_unscaled_gradient_float32():
    params, x, y = _mlp_params()
    grads = jax.jit(jax.grad(_mlp_loss))(params, x, y)
    out = _scaled_update(params, x, y)  # 2**15: unscaling is exact
    for k in params:
        np.testing.assert_array_equal(out[k], -grads[k], err_msg=k)
    out = _scaled_update(params, x, y, init_scale=1000.0)
    for k in params:
        np.testing.assert_allclose(out[k], -grads[k], rtol=1e-6, atol=1e-9, err_msg=k)


def test_unscaled_update_float16_params_loss_in_float32():
    params, x, y = _mlp_params(jnp.float16)
    wide = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    grads = jax.jit(jax.grad(_mlp_loss))(wide, x.astype(jnp.float32), y)
    out = _scaled_update(params, x, y, init_scale=2.0**8)
    for k in params:
        assert out[k].dtype == jnp.float16
        np.testing.assert_allclose(
            np.asarray(out[k], np.float32),
            -grads[k],
            rtol=2e-2,
            atol=2e-3 * float(jnp.max(jnp.abs(grads[k]))),
            err_msg=k,
        )


def _tiny_loss(w, v, x, c):
    # d/dw = c * v * x = 1e-4 in float32, but the backward pass computes the
    # cotangent c * v = 1e-8 first, below float16's smallest subnormal.
    return c * jnp.sum(v * (w * x))


def test_scaling_rescues_a_float16_gradient_that_flushes_to_zero():
    # The brief's L = 1e-4 * sum(w * x), x ~ 1e-4 has a 1e-8 gradient, which
    # float16 cannot hold at all; here the flushed value is an intermediate
    # cotangent and the gradient itself, 1e-4, is representable. The inputs
    # are arguments so that XLA cannot fold c * v into a constant.
    f16 = jnp.float16
    w, v, x = (jnp.full(8, a, f16) for a in (1.0, 1e-4, 1e4))
    c = jnp.asarray(1e-4, f16)
    exact = jax.grad(_tiny_loss)(*(a.astype(jnp.float32) for a in (w, v, x, c)))
    np.testing.assert_allclose(exact, 1e-4, rtol=1e-3)

    plain = jax.jit(jax.grad(_tiny_loss))
    np.testing.assert_array_equal(plain(w, v, x, c), np.zeros(8, f16))

    tx = jstab.dynamic_loss_scale(optax.sgd(1.0))
    state = tx.init({"w": w})

    @jax.jit
    def step(w, v, x, c, state):
        grads = jax.grad(
            lambda p: jstab.scale_loss(_tiny_loss(p["w"], v, x, c), state)
        )({"w": w})
        return grads, tx.update(grads, state)

    grads, (out, state) = step(w, v, x, c, state)
    assert not bool(state.skipped)
    assert np.all(np.asarray(grads["w"]) != 0)
    assert out["w"].dtype == f16
    assert np.all(np.asarray(out["w"]) != 0)
    np.testing.assert_allclose(
        np.asarray(out["w"], np.float32), -np.asarray(exact), rtol=2e-3
    )


# ------------------------------------------------------------ dtypes, tracing


def test_dtypes_stable_and_one_trace_over_steps():
    params = {
        "h": jnp.ones(3, jnp.float16),
        "b": jnp.ones(3, jnp.bfloat16),
        "f": jnp.ones(3, jnp.float32),
    }
    tx = jstab.dynamic_loss_scale(optax.adam(1e-3), init_scale=4.0, growth_interval=2)
    state = tx.init(params)
    state_dtypes = jax.tree.map(lambda x: x.dtype, state)
    assert state.scale.dtype == jnp.float32
    assert state.good_steps.dtype == jnp.int32
    assert state.skipped.dtype == jnp.bool_
    assert state.skip_count.dtype == jnp.int32
    traces = []

    @jax.jit
    def step(g, state, params):
        traces.append(None)
        return tx.update(g, state, params)

    for t, finite in enumerate([True, False, True, True, True]):
        g = _grads(t, finite, t)
        g = {"h": g["b"].astype(jnp.float16), "b": g["c"], "f": g["a"]}
        out, state = step(g, state, params)
        assert bool(state.skipped) == (not finite)
        assert jax.tree.map(lambda x: x.dtype, out) == {
            k: p.dtype for k, p in params.items()
        }
        assert jax.tree.map(lambda x: x.dtype, state) == state_dtypes
        assert not any(getattr(x, "weak_type", False) for x in jax.tree.leaves(state))
    assert len(traces) == 1
    assert float(state.scale) == 4.0  # backed off to 2, grown back after 2 steps


# ------------------------------------------------ finding the scale in a state


def _p():
    return {"w": jnp.ones(3), "b": jnp.zeros(2)}


_WHERE = {
    "bare": lambda: jstab.dynamic_loss_scale(optax.sgd(0.1), init_scale=8.0),
    "chain": lambda: optax.chain(
        jstab.dynamic_loss_scale(optax.sgd(0.1), init_scale=8.0)
    ),
    "chain after clip": lambda: optax.chain(
        optax.clip_by_global_norm(1.0),
        jstab.dynamic_loss_scale(optax.adam(1e-3), init_scale=8.0),
    ),
    "named_chain": lambda: optax.named_chain(
        ("clip", optax.clip(1.0)),
        ("opt", jstab.dynamic_loss_scale(optax.sgd(0.1), init_scale=8.0)),
    ),
    "around MultiSteps": lambda: jstab.dynamic_loss_scale(
        optax.MultiSteps(optax.adam(1e-3), 2), init_scale=8.0
    ),
    "inside MultiSteps": lambda: optax.MultiSteps(
        jstab.dynamic_loss_scale(optax.adam(1e-3), init_scale=8.0), 2
    ).gradient_transformation(),
    "inject_hyperparams": lambda: optax.inject_hyperparams(jstab.dynamic_loss_scale)(
        optax.sgd(0.1), init_scale=8.0
    ),
}


@pytest.mark.parametrize("where", list(_WHERE))
def test_loss_scale_found_in_nested_states(where):
    tx = _WHERE[where]()
    state = tx.init(_p())
    scale = jstab.loss_scale(state)
    assert scale.dtype == jnp.float32 and scale.shape == ()
    assert float(scale) == 8.0
    # Two non-finite steps later, found again (and under jit). Inside
    # MultiSteps, the loss scale sees one (accumulated) update of the two.
    g = {"w": jnp.array([1.0, jnp.nan, 0.0]), "b": jnp.zeros(2)}
    step = jax.jit(tx.update)
    for _ in range(2):
        _, state = step(g, state, _p())
    want = 4.0 if where == "inside MultiSteps" else 2.0
    assert float(jax.jit(jstab.loss_scale)(state)) == want
    loss = jstab.scale_loss(jnp.float32(3.0), state)
    assert float(loss) == 3.0 * want


def test_loss_scale_found_in_nnx_optimizer_and_under_nnx_jit():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    tx = jstab.dynamic_loss_scale(optax.adam(1e-3), init_scale=8.0, growth_interval=1)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    for where in (optimizer, optimizer.opt_state):
        scale = jstab.loss_scale(where)
        assert scale.dtype == jnp.float32 and float(scale) == 8.0
    x = jnp.ones((4, 3))

    @nnx.jit
    def train_step(model, optimizer):
        def loss(m):
            return jstab.scale_loss(jnp.mean(m(x) ** 2), optimizer)

        value = jnp.mean(model(x) ** 2)
        both = (
            jstab.scale_loss(value, optimizer),
            jstab.scale_loss(value, optimizer.opt_state),
        )
        optimizer.update(model, nnx.grad(loss)(model))
        after = jstab.loss_scale(optimizer), jstab.loss_scale(optimizer.opt_state)
        return value, both, after

    value, both, after = train_step(model, optimizer)
    np.testing.assert_array_equal(both, [8 * value, 8 * value])
    np.testing.assert_array_equal(after, [16.0, 16.0])
    assert float(jstab.loss_scale(optimizer)) == 16.0
    stats = jstab.statistics(optimizer.opt_state)
    assert float(stats["dynamic_loss_scale/scale"]) == 16.0


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_scale_loss_keeps_the_loss_dtype(dtype):
    tx = jstab.dynamic_loss_scale(optax.sgd(0.1), init_scale=1024.0)
    state = tx.init(_p())
    loss = jnp.asarray([0.5, 1.5], dtype)
    scaled = jstab.scale_loss(loss, state)
    assert scaled.dtype == dtype and scaled.shape == (2,)
    np.testing.assert_array_equal(np.asarray(scaled, np.float32), [512.0, 1536.0])
    assert jstab.scale_loss(dtype(2.0), state).dtype == dtype


def test_scale_loss_carries_no_gradient_into_the_scale():
    tx = jstab.dynamic_loss_scale(optax.sgd(0.1), init_scale=1024.0)
    state = tx.init(_p())

    def f(scale, loss):
        return jstab.scale_loss(loss, state._replace(scale=scale))

    d_scale, d_loss = jax.grad(f, argnums=(0, 1))(state.scale, jnp.float32(3.0))
    assert float(d_scale) == 0.0
    assert float(d_loss) == 1024.0


@pytest.mark.parametrize(
    "build",
    [
        lambda: optax.sgd(0.1),
        lambda: jstab.upcast(optax.adam(1e-3)),
        lambda: optax.chain(
            jstab.dynamic_loss_scale(optax.sgd(0.1)),
            jstab.dynamic_loss_scale(optax.sgd(0.1)),
        ),
    ],
    ids=["none", "upcast only", "two"],
)
def test_loss_scale_raises_without_exactly_one_state(build):
    state = build().init(_p())
    with pytest.raises(ValueError, match="dynamic_loss_scale"):
        jstab.loss_scale(state)
    with pytest.raises(ValueError, match="dynamic_loss_scale"):
        jstab.scale_loss(jnp.float32(1.0), state)


# ----------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(growth_factor=1.0), ValueError, "growth_factor"),
        (dict(growth_factor=0.5), ValueError, "growth_factor"),
        (dict(growth_factor=-2.0), ValueError, "growth_factor"),
        (dict(backoff_factor=0.0), ValueError, "backoff_factor"),
        (dict(backoff_factor=1.0), ValueError, "backoff_factor"),
        (dict(backoff_factor=1.5), ValueError, "backoff_factor"),
        (dict(backoff_factor=-0.5), ValueError, "backoff_factor"),
        (dict(min_scale=10.0, max_scale=5.0, init_scale=8.0), ValueError, "min_scale"),
        (dict(init_scale=0.5), ValueError, "init_scale"),
        (dict(init_scale=2.0**25), ValueError, "init_scale"),
        (dict(init_scale=16.0, min_scale=32.0), ValueError, "init_scale"),
        (dict(init_scale=0.0), ValueError, "init_scale"),
        (dict(init_scale=-4.0), ValueError, "init_scale"),
        (dict(min_scale=0.0), ValueError, "min_scale"),
        (dict(growth_interval=0), ValueError, "growth_interval"),
        (dict(growth_interval=-1), ValueError, "growth_interval"),
        (dict(growth_interval=1.5), TypeError, "growth_interval"),
        (dict(growth_interval=True), TypeError, "growth_interval"),
        (dict(init_scale=float("nan")), ValueError, "init_scale"),
        (dict(growth_factor=float("nan")), ValueError, "growth_factor"),
        (dict(backoff_factor=float("nan")), ValueError, "backoff_factor"),
        (dict(min_scale=float("nan")), ValueError, "min_scale"),
        (dict(max_scale=float("nan")), ValueError, "max_scale"),
        (dict(max_scale=float("inf")), ValueError, "max_scale"),
        (dict(growth_interval=float("nan")), TypeError, "growth_interval"),
    ],
)
def test_bad_arguments_raise_at_build_time(kwargs, error, name):
    with pytest.raises(error, match=name):
        jstab.dynamic_loss_scale(optax.sgd(0.1), **kwargs)


def test_inner_that_is_not_a_transformation_raises():
    with pytest.raises(TypeError, match="inner"):
        jstab.dynamic_loss_scale(lambda g: g)


# ------------------------------------------------- run-time hyperparameters


def _injected(**kwargs):
    tx = optax.inject_hyperparams(jstab.dynamic_loss_scale)(
        optax.sgd(1.0), init_scale=8.0, growth_interval=1, **kwargs
    )
    return tx, jax.jit(tx.update)


def test_inject_hyperparams_wraps_it():
    tx, step = _injected(growth_factor=2.0, backoff_factor=0.5)
    state = tx.init(_p())
    good = {"w": jnp.ones(3), "b": jnp.ones(2)}
    _, state = step(good, state)
    assert float(jstab.loss_scale(state)) == 16.0
    state.hyperparams["growth_factor"] = jnp.asarray(4.0)
    _, state = step(good, state)
    assert float(jstab.loss_scale(state)) == 64.0
    state.hyperparams["backoff_factor"] = jnp.asarray(0.25)
    _, state = step({"w": jnp.ones(3), "b": jnp.array([1.0, jnp.nan])}, state)
    assert float(jstab.loss_scale(state)) == 16.0


@pytest.mark.parametrize(
    "field, value, finite",
    [
        ("growth_factor", np.nan, True),
        ("growth_factor", -2.0, True),
        ("backoff_factor", np.nan, False),
        ("backoff_factor", -0.5, False),
    ],
)
def test_injected_bad_factor_leaves_scale_unchanged(field, value, finite):
    # The docstring: a run-time hyperparameter that would make the new scale
    # NaN, infinite or not positive leaves the scale as it was.
    tx, step = _injected()
    state = tx.init(_p())
    state.hyperparams[field] = jnp.asarray(value, jnp.float32)
    g = {"w": jnp.ones(3), "b": jnp.array([1.0, 1.0 if finite else jnp.nan])}
    _, state = step(g, state)
    assert bool(state.inner_state.skipped) == (not finite)
    scale = float(jstab.loss_scale(state))
    assert math.isfinite(scale) and scale > 0
    assert scale == 8.0


# ---------------------------------------------------------------- MultiSteps


def test_multisteps_drops_a_nonfinite_micro_batch():
    tx = jstab.dynamic_loss_scale(
        optax.MultiSteps(optax.sgd(1.0), every_k_schedule=3), init_scale=8.0
    )
    params = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    rng = np.random.default_rng(3)
    accepted, nan = [], {"w": jnp.array([jnp.nan, 0.0, 0.0]), "b": jnp.zeros(2)}
    for t, finite in enumerate([True, False, True, True, True]):
        scale = jstab.loss_scale(state)
        if finite:
            g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
            accepted.append(g)
            scaled = jax.tree.map(lambda x, s=scale: x * s, g)
        else:
            scaled, mini_before = nan, state.inner_state.mini_step
        out, state = step(scaled, state, params)
        assert bool(state.skipped) == (not finite), t
        if not finite:
            assert int(state.inner_state.mini_step) == int(mini_before)
        if t == 3:  # the third accepted micro-batch
            mean = jax.tree.map(lambda *gs: np.mean(gs, axis=0), *accepted[:3])
            for k in params:
                np.testing.assert_allclose(out[k], -mean[k], rtol=1e-6, atol=1e-7)
            assert int(state.inner_state.gradient_step) == 1
        else:
            for x in jax.tree.leaves(out):
                np.testing.assert_array_equal(x, np.zeros_like(x))
            assert int(state.inner_state.gradient_step) == (t > 3)
    assert int(state.skip_count) == 1
