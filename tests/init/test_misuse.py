"""Misuse that is named: a builder passed as an initializer, a bad gain param."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jstab

BUILDERS = [
    "small_normal",
    "small_uniform",
    "truncated_normal",
    "variance_scaling",
    "glorot_normal",
    "glorot_uniform",
    "he_normal",
    "he_uniform",
    "lecun_normal",
    "lecun_uniform",
    "orthogonal",
    "delta_orthogonal",
]


@pytest.mark.parametrize("name", BUILDERS)
@pytest.mark.parametrize(
    "key", [jax.random.key(0), jax.random.PRNGKey(0)], ids=["typed", "legacy"]
)
def test_a_builder_called_with_a_key_says_to_call_it(name, key):
    build = getattr(jstab, name)
    with pytest.raises(TypeError, match=rf"`{name}` builds an initializer.*{name}\(\)"):
        build(key, (3, 4), jnp.float32)


def test_aliases_name_the_builder_they_are():
    with pytest.raises(TypeError, match=r"`he_normal` builds an initializer"):
        jstab.kaiming_normal(jax.random.key(0), (3, 4))


def test_linen_kernel_init_without_parentheses():
    layer = nn.Dense(4, kernel_init=jstab.he_normal)
    with pytest.raises(TypeError, match=r"kernel_init=jstab\.he_normal\(\)"):
        layer.init(jax.random.key(0), jnp.ones((1, 3)))


def test_linen_under_jit_too():
    layer = nn.Dense(4, kernel_init=jstab.glorot_uniform)
    with pytest.raises(TypeError, match=r"`glorot_uniform` builds an initializer"):
        jax.jit(layer.init)(jax.random.key(0), jnp.ones((1, 3)))


def test_nnx_kernel_init_without_parentheses():
    with pytest.raises(TypeError, match=r"kernel_init=jstab\.orthogonal\(\)"):
        nnx.Linear(3, 4, kernel_init=jstab.orthogonal, rngs=nnx.Rngs(0))


def test_builders_still_take_their_arguments_positionally():
    init = jstab.he_normal("leaky_relu", 0.1, "fan_out")
    assert init(jax.random.key(0), (3, 4)).shape == (3, 4)
    assert jstab.small_normal(jnp.asarray(0.1))(jax.random.key(0), (2,)).shape == (2,)


@pytest.mark.parametrize("param", [True, "0.2", jnp.ones(2), float("nan"), 1j])
def test_calculate_gain_rejects_a_bad_param_with_a_value_error(param):
    with pytest.raises(ValueError, match="param"):
        jstab.calculate_gain("leaky_relu", param)


def test_calculate_gain_param_for_another_nonlinearity_is_a_value_error():
    with pytest.raises(ValueError, match="only used with"):
        jstab.calculate_gain("relu", 0.2)
