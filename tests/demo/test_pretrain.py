"""Greedy layer-wise pretraining: stacked RBMs and denoising autoencoders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jstab
from jstab.demo import data, models, pretrain

DEPTH, WIDTH = 20, 64  # the demo's deep sigmoid MLP: 19 layers to pretrain


@pytest.fixture(scope="module")
def x():
    return data.digits().x_train


# One fixture per method: under xdist, a worker computes only those it needs.
@pytest.fixture(scope="module")
def rbm_stack(x):
    """Stacked RBMs, the defaults, over all the MLP's hidden layers."""
    return pretrain.rbm(x, jax.random.key(0), [WIDTH] * (DEPTH - 1))


@pytest.fixture(scope="module")
def dae_stack(x):
    """Stacked denoising autoencoders, the defaults, over the same layers."""
    return pretrain.denoising_autoencoder(x, jax.random.key(0), [WIDTH] * (DEPTH - 1))


def _check_finite(result: pretrain.Pretrained, layers: int, epochs: int) -> None:
    assert len(result.layers) == layers
    assert result.history.shape == result.reconstruction.shape == (layers, epochs)
    leaves = [result.history, result.reconstruction, *jax.tree.leaves(result.layers)]
    for leaf in jax.device_get(leaves):
        assert leaf.dtype == np.float32 and np.all(np.isfinite(leaf))


def test_rbm_free_energy_and_reconstruction_error_fall_over_the_epochs(rbm_stack):
    _check_finite(rbm_stack, DEPTH - 1, 10)
    free_energy = np.asarray(rbm_stack.history)
    # The Gaussian-Bernoulli first layer, and the first Bernoulli one above
    # it (about -4.6 -> -10.6 and -15.1 -> -16.4 with this key).
    assert free_energy[0, -1] < free_energy[0, 0] - 3.0
    assert free_energy[1, -1] < free_energy[1, 0] - 0.5
    error = np.asarray(rbm_stack.reconstruction)
    np.testing.assert_array_less(error[:, -1], 0.5 * error[:, 0])  # every layer


def test_denoising_autoencoder_reconstruction_loss_falls_over_the_epochs(dae_stack):
    _check_finite(dae_stack, DEPTH - 1, 10)
    loss, error = np.asarray(dae_stack.history), np.asarray(dae_stack.reconstruction)
    # The cross-entropy of the upper layers cannot fall below the entropy of
    # their inputs (about 0.78 of the first epoch's at most, with this key).
    assert loss[0, -1] < 0.5 * loss[0, 0]
    np.testing.assert_array_less(loss[:, -1], 0.9 * loss[:, 0])  # every layer
    np.testing.assert_array_less(error[:, -1], 0.5 * error[:, 0])
    # The first layer's loss is half its mean squared error (linear decoder).
    np.testing.assert_allclose(loss[0], 0.5 * error[0], rtol=1e-5)


def test_pretrained_layers_let_the_gradient_reach_the_first_layer(
    x, rbm_stack, dae_stack
):
    model = models.MLP(DEPTH, WIDTH, 10, nn.sigmoid, jstab.small_normal(0.01))
    params = model.init(jax.random.key(0), x[:1])["params"]

    def ratio(params):
        report = jstab.signal_propagation(
            model, {"params": params}, x[:256], nonlinearity="sigmoid"
        )
        return report.grad_norm[0] / report.grad_norm[-1]

    small = ratio(params)
    rbm = ratio(pretrain.load(params, rbm_stack.layers))
    dae = ratio(pretrain.load(params, dae_stack.layers))
    # Measured: about 3e-34 small, 1e-3 after either pretraining.
    assert small < 1e-20
    assert rbm > 1e-5 and dae > 1e-5


def test_load_replaces_the_pretrained_layers_and_keeps_the_rest():
    model = models.MLP(4, 16, 10, nn.sigmoid)
    params = model.init(jax.random.key(0), jnp.ones((1, 64)))["params"]
    layers = [
        pretrain.Layer(jnp.full((64, 16), 0.5), jnp.full((16,), -1.0)),
        pretrain.Layer(jnp.full((16, 16), 0.25), jnp.full((16,), 2.0)),
    ]
    loaded = pretrain.load(params, layers)
    for i, layer in enumerate(layers):
        np.testing.assert_array_equal(loaded[f"Dense_{i}"]["kernel"], layer.kernel)
        np.testing.assert_array_equal(loaded[f"Dense_{i}"]["bias"], layer.bias)
    for name in ("Dense_2", "Dense_3"):  # a hidden layer not given, the head
        assert loaded[name] is params[name]
    assert not np.array_equal(params["Dense_0"]["kernel"], layers[0].kernel)
    assert model.apply({"params": loaded}, jnp.ones((2, 64))).shape == (2, 10)


def test_load_rejects_mismatched_shapes_and_missing_layers():
    params = models.MLP(4, 16, 10, nn.sigmoid).init(
        jax.random.key(0), jnp.ones((1, 64))
    )["params"]
    first = pretrain.Layer(jnp.zeros((64, 16)), jnp.zeros((16,)))
    with pytest.raises(ValueError, match=r"layer 1's kernel has shape \(16, 32\)"):
        pretrain.load(params, [first, pretrain.Layer(jnp.zeros((16, 32)), first.bias)])
    with pytest.raises(ValueError, match=r"layer 0's bias has shape \(8,\)"):
        pretrain.load(params, [first._replace(bias=jnp.zeros((8,)))])
    hidden = pretrain.Layer(jnp.zeros((16, 16)), jnp.zeros((16,)))
    with pytest.raises(ValueError, match=r"has shape \(16, 10\)"):  # the head
        pretrain.load(params, [first, hidden, hidden, hidden])
    with pytest.raises(ValueError, match="'Dense_1'"):
        pretrain.load({"Dense_0": params["Dense_0"]}, [first, hidden])
    with pytest.raises(ValueError, match=r"variables\['params'\]"):
        pretrain.load({"params": params}, [first])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"widths": []}, "widths"),
        ({"widths": 64}, "widths"),
        ({"widths": [64, 0]}, r"widths\[1\]"),
        ({"epochs": 0}, "epochs"),
        ({"batch": 0}, "batch"),
        ({"batch": 101}, "batch.*100 examples"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"x": np.zeros((100,))}, "x"),
        ({"x": np.full((100, 64), np.inf)}, "`x` must be finite"),
        ({"noise": 1.0}, "noise"),
        ({"noise": -0.1}, "noise"),
    ],
)
def test_arguments_are_checked(kwargs, match):
    kwargs = {"x": np.zeros((100, 64)), "widths": [64], **kwargs}
    methods = [pretrain.denoising_autoencoder]
    if "noise" not in kwargs:
        methods.append(pretrain.rbm)
    for method in methods:
        with pytest.raises(ValueError, match=match):
            method(key=jax.random.key(0), **kwargs)


def test_layers_of_one_shape_share_one_compilation(x):
    # The same arguments as the next test: whichever runs first compiles.
    for method, trainer in [
        (pretrain.rbm, pretrain._train_rbm),
        (pretrain.denoising_autoencoder, pretrain._train_autoencoder),
    ]:
        before = trainer._cache_size()
        method(x[:256], jax.random.key(1), [16] * 2, epochs=2, batch=50)
        compiled = trainer._cache_size()
        assert compiled - before <= 2  # the first layer, and the others
        result = method(x[:256], jax.random.key(1), [16] * 5, epochs=2, batch=50)
        assert trainer._cache_size() == compiled  # three more layers, no more
        _check_finite(result, 5, 2)


def test_huge_finite_inputs_give_finite_layers_and_histories(x):
    huge = x[:256] * 1e4  # far from standardized: the sigmoids saturate
    for method in (pretrain.rbm, pretrain.denoising_autoencoder):
        result = method(huge, jax.random.key(2), [16] * 2, epochs=2, batch=50)
        _check_finite(result, 2, 2)
