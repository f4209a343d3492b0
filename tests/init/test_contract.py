"""The contract every initializer keeps: dtypes, jit, eval_shape, keys, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jstab

ALL = {
    "small_normal": jstab.small_normal,
    "small_uniform": jstab.small_uniform,
    "truncated_normal": jstab.truncated_normal,
    "glorot_normal": jstab.glorot_normal,
    "glorot_uniform": jstab.glorot_uniform,
    "he_normal": jstab.he_normal,
    "he_uniform": jstab.he_uniform,
    "lecun_normal": jstab.lecun_normal,
    "lecun_uniform": jstab.lecun_uniform,
    "orthogonal": jstab.orthogonal,
    "delta_orthogonal": jstab.delta_orthogonal,
    "variance_scaling": functools.partial(
        jstab.variance_scaling, 2.0, "fan_out", "uniform"
    ),
}
FAN_BASED = ["glorot_normal", "glorot_uniform", "he_normal", "he_uniform"]
FAN_BASED += ["lecun_normal", "lecun_uniform", "variance_scaling"]
SHAPE = (3, 3, 8, 16)
HALF_AND_SINGLE = [jnp.bfloat16, jnp.float16, jnp.float32]


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
@pytest.mark.parametrize("name", list(ALL))
def test_dtype_requested_is_returned(name, dtype):
    key = jax.random.key(0)
    # Passed when called, and passed when built.
    assert ALL[name]()(key, SHAPE, dtype).dtype == dtype
    assert ALL[name](dtype=dtype)(key, SHAPE).dtype == dtype
    assert ALL[name]()(key, SHAPE).dtype == jnp.float32


@pytest.mark.parametrize("name", list(ALL))
def test_float64_under_x64(name):
    with jax.enable_x64(True):
        w = ALL[name]()(jax.random.key(0), SHAPE, jnp.float64)
        assert w.dtype == jnp.float64


@pytest.mark.parametrize("name", list(ALL))
def test_jit_and_eval_shape(name):
    init = ALL[name]()
    key = jax.random.key(1)
    eager = init(key, SHAPE, jnp.bfloat16)
    jitted = jax.jit(init, static_argnums=(1, 2))(key, SHAPE, jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(eager, np.float32), np.asarray(jitted, np.float32)
    )
    abstract = jax.eval_shape(
        functools.partial(init, shape=SHAPE, dtype=jnp.bfloat16), key
    )
    assert abstract.shape == SHAPE and abstract.dtype == jnp.bfloat16


@pytest.mark.parametrize("name", list(ALL))
def test_same_key_same_array_other_key_other_array(name):
    init = ALL[name]()
    a = init(jax.random.key(7), SHAPE)
    b = init(jax.random.key(7), SHAPE)
    c = init(jax.random.key(8), SHAPE)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("name", list(ALL))
def test_legacy_uint32_keys_work(name):
    w = ALL[name]()(jax.random.PRNGKey(0), SHAPE)
    assert w.shape == SHAPE and bool(jnp.all(jnp.isfinite(w)))


@pytest.mark.parametrize("name", list(ALL))
def test_zero_sized_shape_gives_an_empty_array(name):
    shape = (3, 3, 0, 16)
    w = ALL[name]()(jax.random.key(0), shape)
    assert w.shape == shape and w.dtype == jnp.float32


@pytest.mark.parametrize("name", FAN_BASED)
@pytest.mark.parametrize("shape", [(), (5,)])
def test_fan_based_rejects_rank_below_2(name, shape):
    init = ALL[name]()
    with pytest.raises(ValueError, match=r"`shape` \(=\(.*\)\) has rank [01]"):
        init(jax.random.key(0), shape)


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_, jnp.complex64, "x"])
def test_non_float_dtype_is_a_type_error(name, dtype):
    with pytest.raises(TypeError, match="`dtype` must be a floating-point dtype"):
        ALL[name](dtype=dtype)
    init = ALL[name]()
    with pytest.raises(TypeError, match="`dtype` must be a floating-point dtype"):
        init(jax.random.key(0), SHAPE, dtype)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: jstab.small_normal(-0.1), r"`stddev` must be >= 0, got -0.1"),
        (lambda: jstab.small_uniform(-1), r"`limit` must be >= 0, got -1"),
        (lambda: jstab.truncated_normal(-1.0), r"`stddev` must be >= 0"),
        (
            lambda: jstab.truncated_normal(1.0, 2.0, 1.0),
            r"`lower` \(=2.0\) must be less",
        ),
        (lambda: jstab.truncated_normal(1.0, 40.0, 41.0), r"no probability mass"),
        (lambda: jstab.glorot_normal(gain=-1.0), r"`gain` must be >= 0, got -1.0"),
        (lambda: jstab.glorot_uniform(scale=-2.0), r"`scale` must be >= 0"),
        (lambda: jstab.orthogonal(-1.0), r"`gain` must be >= 0"),
        (lambda: jstab.delta_orthogonal(-1.0), r"`gain` must be >= 0"),
        (lambda: jstab.small_normal(float("inf")), r"`stddev` must be finite"),
        (lambda: jstab.small_normal("0.1"), r"`stddev` must be a real number"),
        (lambda: jstab.he_normal("swish"), r"`nonlinearity` must be one of .*'swish'"),
        (
            lambda: jstab.he_uniform(mode="fan_avg"),
            r"`mode` must be one of .*'fan_avg'",
        ),
        (lambda: jstab.he_normal(negative_slope=0.1), r"`negative_slope` \(=0.1\)"),
        (
            lambda: jstab.he_normal(distribution="uniform"),
            r"`distribution` must be one of 'normal', 'truncated_normal'; "
            r"got 'uniform'",
        ),
        (
            lambda: jstab.variance_scaling(1.0, "fan", "normal"),
            r"`mode` must be one of .*got 'fan'",
        ),
        (
            lambda: jstab.variance_scaling(1.0, "fan_in", "cauchy"),
            r"`distribution` must be one of .*got 'cauchy'",
        ),
        (
            lambda: jstab.variance_scaling(-1.0, "fan_in", "normal"),
            r"`scale` must be >= 0",
        ),
        (lambda: jstab.orthogonal(column_axis=1.0), r"`column_axis` must be an int"),
    ],
)
def test_bad_arguments_fail_when_built(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_bad_shape_argument():
    with pytest.raises(
        TypeError, match="`shape` must be a sequence of non-negative ints"
    ):
        jstab.he_normal()(jax.random.key(0), (3, -1))


def test_zero_scale_gives_zeros():
    z = jstab.glorot_normal(gain=0.0)(jax.random.key(0), (4, 4))
    assert not np.asarray(z).any()


def test_public_api_is_flat_and_aliased():
    assert jstab.xavier_normal is jstab.glorot_normal
    assert jstab.xavier_uniform is jstab.glorot_uniform
    assert jstab.kaiming_normal is jstab.he_normal
    assert jstab.kaiming_uniform is jstab.he_uniform
    for name in jstab.__all__:
        assert hasattr(jstab, name), name
    assert set(jstab.init.__all__) <= set(jstab.__all__)


def test_scalar_arrays_are_accepted_as_constants():
    w = jstab.orthogonal(jnp.sqrt(2.0))(jax.random.key(0), (8, 8))
    np.testing.assert_allclose(
        np.asarray(w).T @ np.asarray(w), 2 * np.eye(8), atol=1e-5
    )
    assert jstab.small_normal(np.float32(0.5))(jax.random.key(0), (3,)).shape == (3,)
    with pytest.raises(TypeError, match=r"`gain` must be a scalar, got an array"):
        jstab.glorot_normal(gain=np.ones(2))
    with pytest.raises(TypeError, match=r"`gain` must be a concrete number"):
        jax.jit(lambda g: jstab.orthogonal(g)(jax.random.key(0), (2, 2)))(1.0)


@pytest.mark.parametrize("name", list(ALL))
def test_no_implicit_promotion(name):
    # Under strict promotion any mixing of dtypes inside a draw is an error.
    with jax.numpy_dtype_promotion("strict"):
        for dtype in [jnp.bfloat16, jnp.float32]:
            assert ALL[name]()(jax.random.key(0), SHAPE, dtype).dtype == dtype
