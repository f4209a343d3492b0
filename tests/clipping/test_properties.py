"""Properties of the norm rules over random trees (hypothesis).

Trees mix shapes, dtypes (float32, bfloat16, float16), zero leaves and
magnitudes from 1e-30 to 1e30 (float32) or the half-precision range.
"""

import jax
import jax.numpy as jnp
import numpy as np
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
