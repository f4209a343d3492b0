"""Properties of the norm rules over random trees (hypothesis).

Trees mix shapes, dtypes (float32, bfloat16, float16), zero leaves and
magnitudes from 1e-30 to 1e30 (float32) or the half-precision range.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jstab

DTYPES = {
    "float32": (jnp.float32, 30),
    "bfloat16": (jnp.bfloat16, 30),
    "float16": (jnp.float16, 4),
}
SHAPES = [(), (1,), (3,), (2, 3), (4, 1, 2), (2, 2, 2, 3)]


@st.composite
def trees(draw):
    n = draw(st.integers(1, 4))
    tree = {}
    for i in range(n):
        dtype, decades = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
        shape = draw(st.sampled_from(SHAPES))
        exponent = draw(st.integers(-decades, decades))
        kind = draw(st.sampled_from(["normal", "normal", "zeros", "constant"]))
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        base = {
            "normal": rng.normal(size=shape),
            "zeros": np.zeros(shape),
            "constant": np.full(shape, -1.5),
        }[kind]
        tree[f"leaf{i}"] = jnp.asarray(base * 10.0**exponent, dtype)
    return tree


def _f64(tree):
    return [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]


def _global(tree, ord=2):
    flat = np.concatenate(_f64(tree))
    return np.abs(flat).max() if ord == np.inf else np.linalg.norm(flat)


def _rounding(tree):
    """Relative rounding allowed: a few ulps of the coarsest dtype present."""
    return 4 * max(float(jnp.finfo(x.dtype).eps) for x in jax.tree.leaves(tree))


THRESHOLDS = st.sampled_from([1e-3, 0.5, 1.0, 7.0, 1e4])
SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(trees(), THRESHOLDS, st.sampled_from([2, np.inf]))
def test_global_norm_rule(tree, threshold, ord):
    tx = jstab.clip_by_global_norm(threshold, ord=ord)
    update = jax.jit(tx.update)
    out, state = update(tree, tx.init(tree))
    tol = _rounding(tree)
    before, after = _global(tree, ord), _global(out, ord)
    assert all(np.all(np.isfinite(x)) for x in _f64(out))
    np.testing.assert_allclose(float(state.norm), before, rtol=1e-5, atol=0)
    if before <= threshold:  # unchanged, bit for bit
        jax.tree.map(np.testing.assert_array_equal, out, tree)
        assert float(state.clipped) == 0
    else:
        assert after <= threshold * (1 + tol)
        assert float(state.clipped) == 1
        # direction preserved: out is a positive multiple of the input
        k = threshold / before
        for x, y in zip(_f64(tree), _f64(out), strict=True):
            np.testing.assert_allclose(y, k * x, rtol=tol, atol=threshold * tol)
    again, _ = update(out, tx.init(out))  # idempotent within rounding
    for x, y in zip(_f64(out), _f64(again), strict=True):
        np.testing.assert_allclose(y, x, rtol=tol, atol=0)


@SETTINGS
@given(trees(), THRESHOLDS, st.sampled_from(["leaf", "module"]))
def test_layer_norm_rule(tree, threshold, per):
    tx = jstab.clip_by_layer_norm(threshold, per=per)
    out, state = jax.jit(tx.update)(tree, tx.init(tree))
    tol = _rounding(tree)
    groups = [[k] for k in tree] if per == "leaf" else [list(tree)]
    for group in groups:
        before = _global({k: tree[k] for k in group})
        after = _global({k: out[k] for k in group})
        assert np.isfinite(after)
        if before <= threshold:
            for k in group:
                np.testing.assert_array_equal(out[k], tree[k])
        else:
            assert after <= threshold * (1 + tol)
            assert after >= threshold * (1 - tol)


@SETTINGS
@given(trees(), st.sampled_from([1e-3, 0.1, 1.0]))
def test_value_rule(tree, bound):
    tx = jstab.clip_by_value(bound)
    out, state = jax.jit(tx.update)(tree, tx.init(tree))
    for x, y in zip(_f64(tree), _f64(out), strict=True):
        assert np.all(np.abs(y) <= bound)
        inside = np.abs(x) <= bound
        np.testing.assert_array_equal(y[inside], x[inside])
        np.testing.assert_array_equal(np.sign(y[~inside]), np.sign(x[~inside]))
    flat = np.concatenate(_f64(tree))
    assert float(state.norm) == pytest.approx(np.abs(flat).max(), rel=1e-6)
    assert float(state.clipped) == pytest.approx(np.mean(np.abs(flat) > bound))


@SETTINGS
@given(trees(), st.sampled_from([1e-3, 0.01, 0.5]))
def test_agc_rule(tree, clipping):
    params = jax.tree.map(lambda x: jnp.ones_like(x) * 0.5, tree)
    tx = jstab.adaptive_grad_clip(clipping)
    out, state = jax.jit(tx.update)(tree, tx.init(params), params)
    tol = _rounding(tree)
    for k, x in tree.items():
        y = np.asarray(out[k], np.float64)
        assert np.all(np.isfinite(y))
        axes = tuple(range(x.ndim - 1)) if x.ndim >= 2 else None
        w = np.sqrt(np.sum(np.asarray(params[k], np.float64) ** 2, axis=axes))
        g_after = np.sqrt(np.sum(y**2, axis=axes))
        assert np.all(g_after <= clipping * np.maximum(w, 1e-3) * (1 + tol))


# ------------------------------------------------------------ adaptive rules

# (percentile, history) pairs; each compiles once for the module.
AUTOCLIP = [(10.0, 5), (37.3, 3), (50.0, 1), (90.0, 8), (100.0, 4)]
FACTORS = st.lists(
    st.sampled_from([1.0, 0.9, 0.5, 0.25, 0.01, 0.0]), min_size=1, max_size=6
)
# Each new tree compiles anew: fewer examples for the multi-step rules.
FEWER = settings(max_examples=20, deadline=None)


@functools.cache
def _autoclip(percentile, history):
    tx = jstab.autoclip(percentile, history)
    return tx, jax.jit(tx.update)


@SETTINGS
@given(
    # 0 or normal: XLA on CPU flushes subnormal results (an interpolation
    # between 0 and 1e-38) to zero.
    st.lists(
        st.floats(0.0, width=32, allow_infinity=False).filter(
            lambda x: x == 0 or x >= 1e-30
        ),
        min_size=1,
        max_size=20,
    ),
    st.sampled_from(AUTOCLIP),
)
def test_autoclip_threshold_is_the_percentile_of_the_last_norms(norms, setting):
    tx, update = _autoclip(*setting)
    percentile, history = setting
    state = tx.init({"w": jnp.zeros(1)})
    for t, n in enumerate(norms):
        out, state = update({"w": jnp.array([n], jnp.float32)}, state)
        held = np.asarray(norms[max(0, t + 1 - history) : t + 1], np.float32)
        want = np.percentile(held, percentile)
        np.testing.assert_array_max_ulp(np.float32(state.threshold), want, maxulp=1)
        assert abs(float(out["w"][0])) <= float(state.threshold) * (1 + 2**-22)


def _steps(tx, tree, factors):
    """Runs ``tx`` on ``tree`` scaled by each factor (never up: no overflow)."""
    state = tx.init(tree)
    update = jax.jit(tx.update)
    for f in factors:
        g = jax.tree.map(
            lambda x, f=f: (x.astype(jnp.float32) * f).astype(x.dtype), tree
        )
        out, state = update(g, state)
        yield g, out, state


@FEWER
@given(trees(), FACTORS, st.sampled_from(["autoclip", "zclip", "zclip_mean"]))
def test_adaptive_clip_output_is_finite_and_within_threshold(tree, factors, name):
    tx = {
        "autoclip": jstab.autoclip(10.0, history=4),
        "zclip": jstab.zclip(warmup_steps=2, z_thresh=0.5),
        "zclip_mean": jstab.zclip(warmup_steps=1, clip_option="mean", max_norm=1.0),
    }[name]
    for g, out, state in _steps(tx, tree, factors):
        tol = _rounding(g)
        # A result in the subnormal range is rounded to an absolute spacing
        # (6e-8 in float16), not a relative one.
        sub = max(
            float(jnp.finfo(x.dtype).smallest_subnormal) for x in jax.tree.leaves(g)
        )
        size = sum(x.size for x in jax.tree.leaves(g))
        # ZClip's ``threshold`` is the detection line; what it clipped to:
        limit = float(getattr(state, "applied_threshold", state.threshold))
        assert all(np.all(np.isfinite(x)) for x in _f64(out))
        assert np.isfinite(limit)
        assert _global(out) <= limit * (1 + tol) + sub * np.sqrt(size)
        if not float(state.clipped):
            jax.tree.map(np.testing.assert_array_equal, out, g)
        else:  # direction preserved
            k = limit / _global(g)
            for x, y in zip(_f64(g), _f64(out), strict=True):
                np.testing.assert_allclose(
                    y, k * x, rtol=tol, atol=k * tol * _global(g) + sub
                )


@FEWER
@given(trees(), FACTORS, st.sampled_from([None, 1.0]), st.sampled_from([None, 1.0]))
def test_skip_on_spike_outputs_inner_updates_or_zeros(tree, factors, max_norm, z):
    tx = jstab.skip_on_spike(
        optax.sgd(1.0), max_norm=max_norm, z_thresh=z, warmup_steps=2
    )
    for g, out, state in _steps(tx, tree, factors):
        assert all(np.all(np.isfinite(x)) for x in _f64(out))
        chex.assert_trees_all_equal_dtypes(out, g)
        if bool(state.skipped):
            assert all(np.all(x == 0) for x in _f64(out))
        else:
            jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, -b), out, g)
            if max_norm is not None:
                assert _global(g) <= max_norm * (1 + _rounding(g))
