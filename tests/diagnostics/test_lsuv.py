"""lsuv: every layer's output variance on the batch within tol of 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import LinenCNN, LinenMLP, NnxMLP, activation, batch
from flax import linen as nn
from flax import nnx

import jstab


def _linen_variances(model, variables, x):
    """Each layer's output variance, from capture_intermediates directly."""
    _, state = model.apply(variables, x, capture_intermediates=True)
    inter = state["intermediates"]
    return {
        name: float(jnp.var(node["__call__"][0]))
        for name, node in inter.items()
        if name != "__call__"
    }


def _nnx_variances(model, x):
    """Each layer's output variance, by running the NNX model by hand."""
    out = {}
    for i, layer in enumerate(model.layers):
        x = layer(x)
        out[f"layers/{i}"] = float(jnp.var(x))
        x = activation(model.act)(x)
    out["head"] = float(jnp.var(model.head(x)))
    return out


def _copy(tree):
    def numpy(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.array(x)

    return jax.tree.map(numpy, tree)


@pytest.mark.parametrize(
    "model, x",
    [
        (LinenMLP(depth=8, width=32, act="tanh"), batch((128, 32))),
        (LinenMLP(depth=8, width=32, act="relu"), batch((128, 32))),
        (LinenCNN(), batch((16, 8, 8, 3))),
    ],
    ids=["mlp-tanh", "mlp-relu", "cnn"],
)
def test_linen_layers_reach_unit_variance(model, x):
    variables = model.init(jax.random.key(0), x)
    before = _copy(variables)
    tol = 0.05
    new = jstab.lsuv(model, variables, x, tol=tol)
    jax.tree.map(np.testing.assert_array_equal, variables, before)  # unchanged
    variances = _linen_variances(model, new, x)
    assert len(variances) == len(jax.tree.leaves(new)) // 2  # kernel and bias
    for name, var in variances.items():
        assert abs(var - 1.0) <= tol, (name, var)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(a.shape, b.shape), new, variables
    )
    biases = [v["bias"] for v in new["params"].values()]
    for b, b0 in zip(
        biases, [v["bias"] for v in variables["params"].values()], strict=True
    ):
        np.testing.assert_array_equal(b, b0)  # only kernels change


def test_nnx_layers_reach_unit_variance_and_the_model_is_new():
    x = batch((128, 16))
    model = NnxMLP(16, depth=6, width=32, act="tanh", rngs=nnx.Rngs(0))
    before = _copy(nnx.state(model))
    new = jstab.lsuv(model, x, tol=0.02)
    assert isinstance(new, NnxMLP) and new is not model
    assert new.layers[0] is not model.layers[0]
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)
    for name, var in _nnx_variances(new, x).items():
        assert abs(var - 1.0) <= 0.02, (name, var)
    assert type(new.head) is nnx.Linear


def test_kernels_are_scaled_orthogonal_matrices():
    x = batch((256, 32))
    model = LinenMLP(depth=3, width=32, act="tanh")
    new = jstab.lsuv(model, model.init(jax.random.key(0), x), x)
    for layer in new["params"].values():
        w = np.asarray(layer["kernel"], np.float64)
        gram = w.T @ w
        scale = gram[0, 0]
        np.testing.assert_allclose(gram, scale * np.eye(32), atol=1e-5 * scale)


def test_deterministic_given_the_key():
    x = batch((64, 16))
    model = LinenMLP(depth=3, width=16)
    variables = model.init(jax.random.key(0), x)
    a = jstab.lsuv(model, variables, x, key=jax.random.key(7))
    b = jstab.lsuv(model, variables, x, key=jax.random.key(7))
    c = jstab.lsuv(model, variables, x, key=jax.random.key(8))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(
        a["params"]["Dense_0"]["kernel"], c["params"]["Dense_0"]["kernel"]
    )
    default = jstab.lsuv(model, variables, x)
    explicit = jstab.lsuv(model, variables, x, key=jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, default, explicit)


def test_max_iters_bounds_the_rescalings():
    # A bias keeps the variance away from 1 after one rescaling.
    x = batch((64, 16))
    model = LinenMLP(depth=1, width=16)
    variables = model.init(jax.random.key(0), x)
    bias = jnp.linspace(-1.0, 1.0, 16)
    variables = {
        "params": {"Dense_0": {**variables["params"]["Dense_0"], "bias": bias}}
    }
    once = jstab.lsuv(model, variables, x, max_iters=1, tol=1e-3)
    many = jstab.lsuv(model, variables, x, max_iters=50, tol=1e-3)
    assert abs(_linen_variances(model, once, x)["Dense_0"] - 1.0) > 1e-3
    assert abs(_linen_variances(model, many, x)["Dense_0"] - 1.0) <= 1e-3


def test_a_layer_without_variance_is_left_orthogonal_with_a_warning():
    x = jnp.zeros((8, 4))  # every layer outputs its zero bias
    model = LinenMLP(depth=2, width=4)
    variables = model.init(jax.random.key(0), x)
    with pytest.warns(RuntimeWarning) as record:
        new = jstab.lsuv(model, variables, x)
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert "'Dense_0'" in messages[0] and "'Dense_1'" in messages[1]
    assert np.all(np.isfinite(jax.tree.leaves(new)[0]))


def test_bfloat16_kernels_keep_their_dtype():
    x = batch((64, 16)).astype(jnp.bfloat16)
    model = LinenMLP(depth=3, width=16)
    variables = jax.tree.map(
        lambda v: v.astype(jnp.bfloat16), model.init(jax.random.key(0), x)
    )
    new = jstab.lsuv(model, variables, x, tol=0.1)
    for leaf in jax.tree.leaves(new):
        assert leaf.dtype == jnp.bfloat16
    for var in _linen_variances(model, new, x).values():
        assert abs(var - 1.0) <= 0.1


@pytest.mark.parametrize(
    "kwargs, error", [({"tol": 0.0}, "tol"), ({"max_iters": 0}, "max_iters")]
)
def test_bad_arguments_are_named(kwargs, error):
    x = batch((8, 4))
    model = LinenMLP(depth=1, width=4)
    with pytest.raises(ValueError, match=error):
        jstab.lsuv(model, model.init(jax.random.key(0), x), x, **kwargs)


class _Partitioned(nn.Module):
    """Kernels boxed with sharding metadata, as in a model-parallel setup."""

    @nn.compact
    def __call__(self, x):
        init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
        x = jnp.tanh(nn.Dense(16, kernel_init=init)(x))
        return nn.Dense(4, kernel_init=init)(x)


def test_boxed_kernels_stay_boxed_and_old_intermediates_are_ignored():
    x = batch((64, 8))
    model = _Partitioned()
    variables = model.init(jax.random.key(0), x)
    # Intermediates captured earlier, with a variance far from 1.
    variables["intermediates"] = {"Dense_0": {"__call__": (x * 100,)}}
    new = jstab.lsuv(model, variables, x, tol=0.01)
    kernel = new["params"]["Dense_0"]["kernel"]
    assert isinstance(kernel, nn.Partitioned) and kernel.names == (None, "model")
    assert new["intermediates"] is variables["intermediates"]
    report = jstab.signal_propagation(model, new, x, nonlinearity="tanh")
    np.testing.assert_allclose(report.activation_std**2, 1.0, atol=0.01)


class _NnxCNN(nnx.Module):
    """Convolutions, batch statistics and dropout (random state)."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.out = nnx.Linear(8 * 8 * 8, 4, rngs=rngs)

    def __call__(self, x):
        x = self.drop(jax.nn.relu(self.norm(self.conv(x))))
        return self.out(x.reshape(x.shape[0], -1))


def test_nnx_model_with_state_shares_nothing_with_the_result():
    x = batch((16, 8, 8, 3))
    model = _NnxCNN(nnx.Rngs(0))
    before = _copy(nnx.state(model))
    report = jstab.signal_propagation(model, x)  # training mode: stats move
    assert report.layers == ("conv", "out")
    new = jstab.lsuv(model, x, tol=0.02)
    jax.tree.map(np.testing.assert_array_equal, _copy(nnx.state(model)), before)
    assert abs(float(jnp.var(new.conv(x))) - 1.0) <= 0.02
    # New Variables: changing the result leaves the model as it was.
    new.norm.mean[...] = jnp.full((8,), 5.0)
    new.out.bias[...] = jnp.full((4,), 5.0)
    new(x)  # draws dropout masks: advances the random state
    jax.tree.map(np.testing.assert_array_equal, _copy(nnx.state(model)), before)
