"""The shared norms: float32 accumulation, rescue at both ends, groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jstab import _numerics


def _ref(leaves):
    flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])
    return np.linalg.norm(flat)


def test_groups_each_take_their_own_path():
    rng = np.random.default_rng(0)
    partly = np.full((10_000,), 1e-20)  # squares flush to zero in float32
    partly[0] = 2e-19  # but this one's does not: the fast sum is 26x too small
    leaves = [
        jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),  # ordinary
        jnp.zeros((4,), jnp.float32),  # exactly zero
        jnp.asarray(partly, jnp.float32),  # underflows in part
        jnp.asarray(rng.normal(size=(7,)) * 1e30, jnp.float32),  # overflows
        jnp.full((3,), 300.0, jnp.float16),  # would overflow in float16
    ]
    groups = [[0], [1], [2], [3], [4], [0, 2], [1, 3, 4]]
    got = jax.jit(lambda xs: _numerics.group_norms(xs, groups))(leaves)
    assert all(n.dtype == jnp.float32 and n.shape == () for n in got)
    want = [_ref([leaves[i] for i in g]) for g in groups]
    np.testing.assert_allclose(got, want, rtol=2e-6)


def test_the_underflow_limit_and_the_global_norm_beyond_it():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(50,)) * 1e-30, jnp.float32)
    (per_layer,) = _numerics.group_norms([x], [[0]])
    assert float(per_layer) == 0.0  # documented: every square underflows
    np.testing.assert_allclose(_numerics.global_norm([x]), _ref([x]), rtol=2e-6)


def test_layers_of_one_size_are_reduced_together_and_rescued_each():
    # 150 one-leaf groups of 8 elements (stacked 64 to a reduction, across
    # groups), interleaved with groups the stacking leaves out: a leaf of
    # another size, and groups of several leaves.
    rng = np.random.default_rng(2)
    scales = [1.0, 1e30, 3e-19, 0.0, 1e-3]  # 3e-19: squares partly underflow
    leaves = [
        jnp.asarray(rng.normal(size=8) * scales[i % 5], jnp.float32) for i in range(150)
    ]
    leaves.append(jnp.asarray(rng.normal(size=(3, 3)), jnp.float32))
    groups = [[i] for i in range(150)]
    groups[70:70] = [[150], [0, 150], [1, 2]]
    got = jax.jit(lambda xs: _numerics.group_norms(xs, groups))(leaves)
    assert got.shape == (len(groups),) and got.dtype == jnp.float32
    want = [_ref([leaves[i] for i in g]) for g in groups]
    np.testing.assert_allclose(got, want, rtol=2e-6)
    top = _numerics.group_norms(leaves, groups, jnp.inf)
    want = [max(np.max(np.abs(leaves[i])) for i in g) for g in groups]
    np.testing.assert_array_equal(top, np.asarray(want, np.float32))


def test_unstack_is_exact():
    x = jnp.asarray([-0.0, 0.0, np.nan, -np.inf, 3e-45, -1.5] * 25, jnp.float32)
    flags = x > 0
    counts = jnp.arange(150, dtype=jnp.int32)
    halves = jnp.asarray([-0.0, 1e-39, np.nan, 2.0, -np.inf] * 30, jnp.bfloat16)
    got = jax.jit(_numerics.unstack)(x, flags, counts, halves)
    each_x, each_flag, each_count, each_half = got
    assert len(each_x) == 150 and all(v.shape == () for v in each_x)
    got = np.asarray(jnp.stack(each_x))
    np.testing.assert_array_equal(got, np.asarray(x))  # NaN where NaN
    np.testing.assert_array_equal(np.signbit(got), np.signbit(np.asarray(x)))
    np.testing.assert_array_equal(jnp.stack(each_flag), flags)
    np.testing.assert_array_equal(jnp.stack(each_count), counts)
    bits = np.asarray(jnp.stack(each_half)).view(np.uint16)
    np.testing.assert_array_equal(bits, np.asarray(halves).view(np.uint16))
    assert _numerics.unstack() == [] and _numerics.unstack(jnp.zeros(0)) == [[]]


def test_infinity_norm_and_traced_ord():
    leaves = [jnp.array([1.0, -7.0]), jnp.array([[3.0, 4.0]])]
    groups = [[0], [1], [0, 1]]
    np.testing.assert_array_equal(
        jnp.stack(_numerics.group_norms(leaves, groups, jnp.inf)), [7.0, 4.0, 7.0]
    )
    traced = jax.jit(lambda o: jnp.stack(_numerics.group_norms(leaves, groups, o)))
    np.testing.assert_array_equal(traced(jnp.inf), [7.0, 4.0, 7.0])
    np.testing.assert_allclose(traced(2.0), [np.sqrt(50), 5.0, np.sqrt(75)])


def test_global_norm_of_nothing_and_of_nonfinite():
    assert float(_numerics.global_norm([])) == 0.0
    assert float(_numerics.global_norm([jnp.array([1.0, jnp.inf])])) == np.inf
    assert np.isnan(float(_numerics.global_norm([jnp.array([1.0, jnp.nan])])))


def test_unit_norms_are_plain_float32_sums():
    x = jnp.asarray([[3e-19, 3.0, 0.0, 1e25], [4e-19, 4.0, 0.0, 1e25]], jnp.bfloat16)
    (got,) = jax.jit(lambda x: _numerics.unit_norms([x], [(0,)]))(x)
    assert got.shape == (1, 4) and got.dtype == jnp.float32
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(got[0, :3], np.sqrt(np.sum(x64**2, 0))[:3], rtol=2e-6)
    assert np.isinf(got[0, 3])  # documented: no rescue for units


def test_float64_accumulates_in_float64():
    with jax.enable_x64(True):
        x = jnp.full((4,), 1e-200, jnp.float64)
        got = _numerics.global_norm([x, jnp.ones((2,), jnp.float32)])
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(float(got), np.sqrt(2), rtol=1e-15)


def test_scale_is_exact_for_a_factor_of_one():
    x = jnp.asarray(np.random.default_rng(1).normal(size=100), jnp.bfloat16)
    y = _numerics.scale(x, jnp.float32(1.0))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_factor_and_counter():
    f = _numerics.factor(jnp.array([0.0, 1.0, 4.0, np.inf]), jnp.float32(2.0))
    np.testing.assert_array_equal(f, [1.0, 1.0, 0.5, 0.0])
    big = jnp.int32(np.iinfo(np.int32).max)
    assert int(_numerics.safe_increment(big)) == np.iinfo(np.int32).max
    assert int(_numerics.safe_increment(jnp.int32(5))) == 6


@pytest.mark.parametrize("ord", [1, 0, "2", None, -np.inf])
def test_bad_ord(ord):
    with pytest.raises(ValueError, match="ord"):
        _numerics.static_ord(ord)
