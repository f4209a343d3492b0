"""depth_scaled and deepnorm_constants: exact factors, DeepNet's table, misuse."""

import doctest
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jstab
from jstab.init import _depth

KEY = jax.random.key(3)
SHAPE = (64, 32)


def expected_factor(scheme, num_layers, branch_layers=2):
    # The formulas as the papers write them, independently of the module.
    if scheme == "gpt2":
        return 1 / np.sqrt(2.0 * num_layers)
    if scheme == "fixup":
        return float(num_layers) ** (-1 / (2 * branch_layers - 2))
    return (8.0 * num_layers) ** (-1 / 4)


@pytest.mark.parametrize("scheme", ["gpt2", "fixup", "deepnorm"])
@pytest.mark.parametrize("num_layers", [1, 12, 1000])
@pytest.mark.parametrize(
    "init",
    [
        jstab.he_normal(),
        jstab.glorot_uniform(),
        jax.nn.initializers.lecun_normal(),
        nn.initializers.normal(0.02),
    ],
    ids=["he_normal", "glorot_uniform", "jax_lecun", "flax_normal"],
)
def test_same_key_gives_the_draw_times_the_factor(scheme, num_layers, init):
    scaled = jstab.depth_scaled(init, num_layers, scheme=scheme)
    factor = np.float32(expected_factor(scheme, num_layers))
    np.testing.assert_array_equal(scaled(KEY, SHAPE), init(KEY, SHAPE) * factor)


@pytest.mark.parametrize(
    ("scheme", "num_layers", "branch_layers", "factor"),
    [
        ("gpt2", 12, 2, 1 / math.sqrt(24)),
        ("gpt2", 8, 3, 0.25),  # branch_layers does not enter gpt2's factor
        ("fixup", 16, 2, 0.25),
        ("fixup", 16, 3, 0.5),
        ("fixup", 64, 4, 0.5),
        ("deepnorm", 2, 2, 0.5),
        ("deepnorm", 32, 2, 0.25),
    ],
)
def test_factors_at_known_depths(scheme, num_layers, branch_layers, factor):
    ones = lambda key, shape, dtype=jnp.float32: jnp.ones(shape, dtype)  # noqa: E731
    scaled = jstab.depth_scaled(
        ones, num_layers, scheme=scheme, branch_layers=branch_layers
    )
    np.testing.assert_allclose(scaled(KEY, (3,)), factor, rtol=1e-7)


def test_deepnorm_factor_is_the_tables_beta():
    for layers in (6, 24, 100):
        _, beta = jstab.deepnorm_constants(decoder_layers=layers)["decoder"]
        scaled = jstab.depth_scaled(
            lambda key, shape, dtype=jnp.float32: jnp.ones(shape, dtype),
            layers,
            scheme="deepnorm",
        )
        np.testing.assert_allclose(scaled(KEY, ()), beta, rtol=1e-7)


def test_the_scaled_std_over_many_draws():
    shape, layers = (512, 512), 48
    w = np.asarray(jstab.depth_scaled(jstab.he_normal(), layers)(KEY, shape))
    std = math.sqrt(2 / 512) / math.sqrt(2 * layers)
    # n draws: the sample std's standard error is std/sqrt(2n); allow 5 of them.
    assert abs(w.std() - std) <= 5 * std / math.sqrt(2 * w.size)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtypes_are_kept_and_rounded_once(dtype):
    init = jstab.he_normal()
    scaled = jstab.depth_scaled(init, 24, scheme="gpt2")
    out = scaled(KEY, SHAPE, dtype)
    assert out.dtype == dtype
    wide = init(KEY, SHAPE, dtype).astype(jnp.float32) * np.float32(1 / np.sqrt(48))
    np.testing.assert_array_equal(out, wide.astype(dtype))


def test_default_dtype_is_inits_own():
    init = jstab.he_normal(dtype=jnp.bfloat16)
    assert jstab.depth_scaled(init, 4)(KEY, SHAPE).dtype == jnp.bfloat16
    assert jstab.depth_scaled(jstab.he_normal(), 4)(KEY, SHAPE).dtype == jnp.float32


def test_under_jit_with_a_traced_key():
    scaled = jstab.depth_scaled(jstab.he_normal(), 10, scheme="fixup")
    traced = jax.jit(lambda key: scaled(key, SHAPE))(KEY)
    np.testing.assert_allclose(traced, scaled(KEY, SHAPE), rtol=1e-6, atol=1e-7)


def test_as_kernel_init_in_linen_and_nnx_with_partitioning():
    init = jstab.depth_scaled(jstab.he_normal(), 12, scheme="gpt2")
    factor = np.float32(1 / np.sqrt(24))

    dense = nn.Dense(16, kernel_init=nn.with_partitioning(init, (None, "model")))
    boxed = dense.init(KEY, jnp.ones((1, 8)))["params"]["kernel"]
    assert boxed.names == (None, "model")

    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):  # Flax shards a variable when it is created
        linear = nnx.Linear(
            8,
            16,
            kernel_init=nnx.with_partitioning(init, (None, "model")),
            rngs=nnx.Rngs(0),
        )
    spec = jax.sharding.PartitionSpec(None, "model")
    assert linear.kernel[...].sharding.spec == spec
    plain = nnx.Linear(8, 16, kernel_init=jstab.he_normal(), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(linear.kernel[...], plain.kernel[...] * factor)


def test_the_name_says_what_it_scales():
    scaled = jstab.depth_scaled(jstab.he_normal(), 12, scheme="fixup")
    assert scaled.__name__.startswith("depth_scaled(variance_scaling(2.0")
    assert "12" in scaled.__name__ and "fixup" in scaled.__name__


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"init": 0.5, "num_layers": 4}, TypeError, "`init`"),
        ({"num_layers": 0}, ValueError, "`num_layers`"),
        ({"num_layers": -3}, ValueError, "`num_layers`"),
        ({"num_layers": 2.5}, TypeError, "`num_layers`"),
        ({"num_layers": True}, TypeError, "`num_layers`"),
        ({"num_layers": 4, "scheme": "gpt3"}, ValueError, "'gpt2', 'fixup'"),
        ({"num_layers": 4, "branch_layers": 0}, ValueError, "`branch_layers`"),
        (
            {"num_layers": 4, "scheme": "fixup", "branch_layers": 1},
            ValueError,
            'branch_layers` must be an int >= 2 for scheme="fixup"',
        ),
    ],
)
def test_bad_arguments_fail_at_build_time(kwargs, error, words):
    kwargs = {"init": jstab.he_normal(), **kwargs}
    with pytest.raises(error, match=words.replace("(", r"\(")):
        jstab.depth_scaled(**kwargs)


def test_a_builder_passed_without_parentheses_is_named_at_the_first_draw():
    scaled = jstab.depth_scaled(jstab.he_normal, 4)
    with pytest.raises(TypeError, match=r"kernel_init=jstab.he_normal\(\)"):
        scaled(KEY, SHAPE)


def test_a_bad_dtype_is_named():
    with pytest.raises(TypeError, match="`dtype`"):
        jstab.depth_scaled(jstab.he_normal(), 4)(KEY, SHAPE, jnp.int32)


@pytest.mark.parametrize(
    ("n", "m", "expected"),
    [
        (6, 0, {"encoder": (12**0.25, 48**-0.25)}),
        (0, 6, {"decoder": (12**0.25, 48**-0.25)}),
        (0, 250, {"decoder": (500**0.25, 2000**-0.25)}),
        (
            6,
            6,
            {
                "encoder": (0.81 * (6**5) ** (1 / 16), 0.87 * (6**5) ** (-1 / 16)),
                "decoder": (18**0.25, 72**-0.25),
            },
        ),
        (
            100,
            2,
            {
                "encoder": (0.81 * (1e8 * 2) ** (1 / 16), 0.87 * (2e8) ** (-1 / 16)),
                "decoder": (6**0.25, 24**-0.25),
            },
        ),
    ],
)
def test_deepnorm_table(n, m, expected):
    got = jstab.deepnorm_constants(encoder_layers=n, decoder_layers=m)
    assert got.keys() == expected.keys()
    for stack, (alpha, beta) in expected.items():
        np.testing.assert_allclose(got[stack], (alpha, beta), rtol=1e-12)
        assert all(isinstance(v, float) for v in got[stack])


def test_deepnorm_at_1000_layers_a_decoder_is_damped():
    # DeepNet's 1000-layer decoder: alpha grows, beta shrinks, with depth.
    alpha, beta = jstab.deepnorm_constants(decoder_layers=1000)["decoder"]
    assert alpha == pytest.approx(2000**0.25) and alpha > 6.6
    assert beta == pytest.approx(8000**-0.25) and beta < 0.106


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({}, ValueError, "both 0"),
        ({"encoder_layers": 0, "decoder_layers": 0}, ValueError, "both 0"),
        ({"encoder_layers": -1, "decoder_layers": 4}, ValueError, "encoder_layers"),
        ({"decoder_layers": 4.0}, TypeError, "decoder_layers"),
        ({"encoder_layers": True}, TypeError, "encoder_layers"),
    ],
)
def test_deepnorm_bad_arguments(kwargs, error, words):
    with pytest.raises(error, match=words):
        jstab.deepnorm_constants(**kwargs)


def test_examples_in_the_docstrings():
    result = doctest.testmod(_depth, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4 and result.failed == 0


@pytest.mark.parametrize("scheme", ["gpt2", "fixup", "deepnorm"])
def test_the_initializer_contract(scheme):
    # What every jstab initializer keeps: jit with a static shape and dtype,
    # eval_shape, legacy keys, zero-sized shapes.
    init = jstab.depth_scaled(jstab.he_normal(), 8, scheme=scheme)
    eager = init(KEY, SHAPE, jnp.bfloat16)
    jitted = jax.jit(init, static_argnums=(1, 2))(KEY, SHAPE, jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(eager, np.float32), np.asarray(jitted, np.float32)
    )
    abstract = jax.eval_shape(lambda key: init(key, SHAPE, jnp.float16), KEY)
    assert abstract.shape == SHAPE and abstract.dtype == jnp.float16
    legacy = init(jax.random.PRNGKey(0), SHAPE)
    assert legacy.shape == SHAPE and bool(jnp.all(jnp.isfinite(legacy)))
    assert init(KEY, (0, 4)).shape == (0, 4)
