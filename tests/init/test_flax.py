"""jstab initializers as Flax `kernel_init`: Linen and NNX, sharding metadata."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jstab


def assert_std(w, std):
    # n draws: the sample std's standard error is std/√(2n); allow 5 of them.
    x = np.asarray(w, dtype=np.float64).ravel()
    assert abs(x.std() - std) <= 5 * std / math.sqrt(2 * x.size) + 1e-2 * std


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_linen_dense_and_conv(param_dtype):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(
                64, (3, 3), kernel_init=jstab.he_normal(), param_dtype=param_dtype
            )(x)
            x = nn.Conv(
                64,
                (3, 3),
                kernel_init=jstab.delta_orthogonal(),
                param_dtype=param_dtype,
            )(x)
            x = x.reshape(x.shape[0], -1)
            return nn.Dense(
                256, kernel_init=jstab.glorot_uniform(), param_dtype=param_dtype
            )(x)

    x = jnp.ones((2, 8, 8, 32))
    variables = jax.jit(Net().init)(jax.random.key(0), x)
    params = variables["params"]
    k0, k1 = params["Conv_0"]["kernel"], params["Conv_1"]["kernel"]
    dense = params["Dense_0"]["kernel"]
    assert k0.shape == (3, 3, 32, 64) and k0.dtype == param_dtype
    assert dense.shape == (8 * 8 * 64, 256) and dense.dtype == param_dtype
    assert_std(k0, math.sqrt(2 / (9 * 32)))
    tap = np.asarray(k1[1, 1], np.float64)
    np.testing.assert_allclose(tap.T @ tap, np.eye(64), atol=2e-2)
    assert not np.asarray(k1[0]).any()
    bound = math.sqrt(6 / (8 * 8 * 64 + 256))
    assert np.abs(np.asarray(dense, np.float64)).max() <= bound * 1.004  # bf16 rounding

    abstract = jax.eval_shape(Net().init, jax.random.key(0), x)
    assert abstract["params"]["Conv_0"]["kernel"].dtype == param_dtype


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_nnx_linear_and_conv(param_dtype):
    rngs = nnx.Rngs(0)
    linear = nnx.Linear(
        512,
        256,
        kernel_init=jstab.he_normal(mode="fan_out"),
        param_dtype=param_dtype,
        rngs=rngs,
    )
    conv = nnx.Conv(
        16,
        32,
        (3, 3),
        kernel_init=jstab.orthogonal(),
        param_dtype=param_dtype,
        rngs=rngs,
    )
    assert linear.kernel.shape == (512, 256) and linear.kernel.dtype == param_dtype
    assert_std(linear.kernel[...], math.sqrt(2 / 256))
    w = np.asarray(conv.kernel[...], np.float64).reshape(-1, 32)
    np.testing.assert_allclose(w.T @ w, np.eye(32), atol=2e-2)
    y = linear(jnp.ones((4, 512), param_dtype))
    assert y.shape == (4, 256)

    abstract = nnx.eval_shape(
        lambda: nnx.Linear(8, 4, kernel_init=jstab.lecun_normal(), rngs=nnx.Rngs(0))
    )
    assert abstract.kernel.shape == (8, 4)


def test_nnx_with_partitioning_on_a_mesh():
    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Explicit,))
    # Flax 0.12 shards a variable when it is created: it needs a mesh.
    init = nnx.with_partitioning(jstab.he_normal(), (None, "model"))
    with jax.set_mesh(mesh):
        linear = nnx.Linear(64, 128, kernel_init=init, rngs=nnx.Rngs(0))
    spec = jax.sharding.PartitionSpec(None, "model")
    assert linear.kernel[...].sharding.spec == spec
    assert nnx.get_partition_spec(nnx.state(linear))["kernel"].get_value() == spec
    assert_std(linear.kernel[...], math.sqrt(2 / 64))


def test_linen_with_partitioning():
    init = nn.with_partitioning(jstab.he_uniform(), (None, "model"))
    variables = nn.Dense(32, kernel_init=init).init(
        jax.random.key(0), jnp.ones((1, 16))
    )
    boxed = variables["params"]["kernel"]
    assert isinstance(boxed, nn.Partitioned) and boxed.names == (None, "model")
    assert boxed.value.shape == (16, 32)


def test_flax_kernel_equals_a_direct_call_with_the_same_key():
    # NNX draws the kernel with rngs.params(): the same key gives the same array.
    init = jstab.he_normal()
    linear = nnx.Linear(8, 4, kernel_init=init, use_bias=False, rngs=nnx.Rngs(params=3))
    key = nnx.Rngs(params=3).params()
    np.testing.assert_array_equal(linear.kernel[...], init(key, (8, 4), jnp.float32))
