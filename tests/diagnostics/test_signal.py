"""signal_propagation: vanishing and exploding seen at initialization."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import LinenMLP, NnxMLP, batch
from flax import linen as nn
from flax import nnx

import jstab

DEPTH = 24


def _linen(act, kernel, width=64, depth=DEPTH, x=None):
    x = batch((256, width)) if x is None else x
    model = LinenMLP(depth=depth, width=width, act=act, kernel=kernel)
    return model, model.init(jax.random.key(0), x), x


def test_sigmoid_mlp_with_small_weights_vanishes():
    model, variables, x = _linen("sigmoid", jstab.small_normal(0.01))
    report = jstab.signal_propagation(model, variables, x, nonlinearity="sigmoid")
    assert report.layers == tuple(f"Dense_{i}" for i in range(DEPTH))  # not sorted
    assert report.grad_norm[0] < 1e-3 * report.grad_norm[-1]
    assert report.vanishing and not report.exploding
    assert report.verdict == "vanishing"


def test_relu_mlp_with_unit_normal_weights_explodes():
    kernel = jax.nn.initializers.normal(1.0)
    model, variables, x = _linen("relu", kernel)
    report = jstab.signal_propagation(model, variables, x)
    assert report.exploding and not report.vanishing
    assert report.activation_std[-1] > 1e3 * report.activation_std[0]


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_relu_mlp_with_he_init_keeps_its_scale(kind):
    x = batch((512, 256))
    if kind == "linen":
        model, variables, _ = _linen("relu", jstab.he_normal(), width=256, x=x)
        report = jstab.signal_propagation(model, variables, x)
    else:
        model = NnxMLP(256, DEPTH, 256, "relu", jstab.he_normal(), rngs=nnx.Rngs(0))
        report = jstab.signal_propagation(model, x)
    assert len(report.layers) == DEPTH
    ratio = report.activation_std / float(jnp.std(x))
    assert np.all((ratio > 0.5) & (ratio < 2.0)), ratio
    assert not report.vanishing and not report.exploding
    assert report.verdict == "ok"


def test_nnx_sigmoid_mlp_vanishes_and_layers_are_in_call_order():
    x = batch((256, 64))
    model = NnxMLP(64, DEPTH, 64, "sigmoid", jstab.small_normal(0.01), rngs=nnx.Rngs(0))
    report = jstab.signal_propagation(model, x, nonlinearity="sigmoid")
    want = tuple(f"layers/{i}" for i in range(DEPTH - 1)) + ("head",)
    assert report.layers == want  # call order, not attribute or path order
    assert report.vanishing
    assert type(model.head) is nnx.Linear  # the model was not touched


def _reference(model, variables, x, loss_fn):
    """Each Dense layer's outputs and kernel gradients, computed directly."""
    _, state = model.apply(variables, x, capture_intermediates=True)
    outs = state["intermediates"]

    def loss(params):
        return loss_fn(model.apply({"params": params}, x))

    grads = jax.grad(loss)(variables["params"])
    return outs, grads


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_statistics_equal_a_direct_computation(act):
    model, variables, x = _linen(act, None, width=16, depth=5, x=batch((64, 16)))
    report = jstab.signal_propagation(model, variables, x, nonlinearity=act)
    outs, grads = _reference(model, variables, x, lambda y: 0.5 * jnp.mean(y**2))
    for i, name in enumerate(report.layers):
        y = np.asarray(outs[name]["__call__"][0], np.float64)
        np.testing.assert_allclose(report.activation_mean[i], y.mean(), atol=1e-6)
        np.testing.assert_allclose(report.activation_std[i], y.std(), rtol=1e-5)
        dead = (y <= 0).all(0) if act == "relu" else (np.abs(y) > 3).all(0)
        assert report.dead_fraction[i] == pytest.approx(dead.mean())
        g = np.asarray(grads[name]["kernel"], np.float64)
        np.testing.assert_allclose(report.grad_norm[i], np.linalg.norm(g), rtol=1e-5)


def test_loss_fn_is_used():
    model, variables, x = _linen("relu", None, width=8, depth=3, x=batch((32, 8)))
    loss_fn = lambda y: jnp.sum(jnp.abs(y))  # noqa: E731
    report = jstab.signal_propagation(model, variables, x, loss_fn=loss_fn)
    _, grads = _reference(model, variables, x, loss_fn)
    for i, name in enumerate(report.layers):
        want = np.linalg.norm(np.asarray(grads[name]["kernel"], np.float64))
        np.testing.assert_allclose(report.grad_norm[i], want, rtol=1e-5)


def test_dead_and_saturated_units_are_counted():
    x = batch((64, 8))
    dense = nn.Dense(4, bias_init=nn.initializers.constant(-100.0))
    variables = dense.init(jax.random.key(0), x)
    # A bare Dense is a root module, not a layer: wrap it.
    model = nn.Sequential([dense])
    variables = {"params": {"layers_0": variables["params"]}}
    report = jstab.signal_propagation(model, variables, x)
    assert report.layers == ("layers_0",)
    assert report.dead_fraction[0] == 1.0
    report = jstab.signal_propagation(model, variables, x, nonlinearity="tanh")
    assert report.dead_fraction[0] == 1.0
    report = jstab.signal_propagation(model, variables, -x * 0, nonlinearity="relu")
    assert report.dead_fraction[0] == 1.0


class Shared(nn.Module):
    """One Dense layer called three times, and one called once."""

    @nn.compact
    def __call__(self, x):
        cell = nn.Dense(8, name="cell")
        for _ in range(3):
            x = jnp.tanh(cell(x))
        return nn.Dense(2, name="out")(x)


def test_a_layer_called_several_times_is_measured_over_all_calls():
    x = batch((16, 8))
    model = Shared()
    variables = model.init(jax.random.key(0), x)
    report = jstab.signal_propagation(model, variables, x, nonlinearity="tanh")
    assert report.layers == ("cell", "out")
    _, state = model.apply(variables, x, capture_intermediates=True)
    calls = np.concatenate(
        [np.ravel(y) for y in state["intermediates"]["cell"]["__call__"]]
    )
    assert calls.size == 3 * 16 * 8
    np.testing.assert_allclose(report.activation_std[0], calls.std(), rtol=1e-5)


class WithState(nn.Module):
    """Batch statistics and dropout: needs `train` and a dropout key."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(16)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dropout(0.5, deterministic=not train)(jax.nn.relu(x))
        return nn.Dense(4)(x)


def test_model_kwargs_reach_the_call():
    x = batch((32, 8))
    model = WithState()
    variables = model.init(jax.random.key(0), x, train=False)
    kwargs = {"train": True, "rngs": {"dropout": jax.random.key(1)}}
    report = jstab.signal_propagation(model, variables, x, model_kwargs=kwargs)
    assert report.layers == ("Dense_0", "Dense_1")
    # In training mode the batch norm standardises Dense_0's output.
    evaluated = jstab.signal_propagation(
        model, variables, x, model_kwargs={"train": False}
    )
    assert report.grad_norm[0] != evaluated.grad_norm[0]


def test_report_prints_as_a_table():
    model, variables, x = _linen("relu", None, width=8, depth=3, x=batch((16, 8)))
    text = str(jstab.signal_propagation(model, variables, x))
    assert "Dense_2" in text and "grad norm" in text and "verdict: ok" in text


def test_bad_calls_are_explained():
    model, variables, x = _linen("relu", None, width=8, depth=2, x=batch((16, 8)))
    with pytest.raises(TypeError, match="variables, batch"):
        jstab.signal_propagation(model, x)
    nnx_model = NnxMLP(8, 2, 8, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="module, batch"):
        jstab.signal_propagation(nnx_model, variables, x)
    with pytest.raises(TypeError, match="module"):
        jstab.signal_propagation(lambda v: v, variables, x)
    with pytest.raises(TypeError, match="no layer"):
        jstab.signal_propagation(_NoKernel(), {"params": {}}, x)
    with pytest.raises(ValueError, match="nonlinearity"):
        jstab.signal_propagation(model, variables, x, nonlinearity="gelu")
    with pytest.raises(ValueError, match="vanishing_ratio"):
        jstab.signal_propagation(model, variables, x, vanishing_ratio=0.0)
    with pytest.raises(TypeError, match="loss_fn"):
        jstab.signal_propagation(_Pair(), _Pair().init(jax.random.key(0), x), x)


class _NoKernel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jax.nn.relu(x)


class _Pair(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.Dense(3)(x)
        return y, y


class _Unused(nn.Module):
    """Owns a layer its forward pass never calls."""

    def setup(self):
        self.dense = nn.Dense(3)

    def __call__(self, x):
        return x * 2.0


def test_a_model_that_calls_no_layer_is_refused():
    x = batch((4, 3))
    variables = {
        "params": {"dense": {"kernel": jnp.ones((3, 3)), "bias": jnp.zeros(3)}}
    }
    with pytest.raises(TypeError, match="called none of its layers"):
        jstab.signal_propagation(_Unused(), variables, x)
    with pytest.raises(TypeError, match="called none of its layers"):
        jstab.lsuv(_Unused(), variables, x)


class _Scanned(nn.Module):
    """A recurrent cell run by nn.RNN (a scan), its kernels shared by the steps."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.RNN(nn.SimpleCell(8))(x)[:, -1])


class _Unrolled(nn.Module):
    """The same cell called in a Python loop over time: every call is seen."""

    @nn.compact
    def __call__(self, x):
        cell = nn.SimpleCell(8)
        carry = cell.initialize_carry(jax.random.key(0), x[:, 0].shape)
        for t in range(x.shape[1]):
            carry, y = cell(carry, x[:, t])
        return nn.Dense(1)(y)


class _NnxScanned(nnx.Module):
    def __init__(self, rngs):
        self.rnn = nnx.RNN(nnx.SimpleCell(3, 8, rngs=rngs))
        self.out = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(self.rnn(x)[:, -1])


class _NnxUnrolled(nnx.Module):
    """``_NnxScanned``'s cell and head, the cell called in a Python loop."""

    def __init__(self, scanned):
        self.cell, self.out = scanned.rnn.cell, scanned.out

    def __call__(self, x):
        carry = jnp.zeros((x.shape[0], 8))  # nnx.RNN's carry: zeros
        for t in range(x.shape[1]):
            carry, y = self.cell(carry, x[:, t])
        return self.out(y)


def _assert_same_rows(got, want):
    for field in ("activation_mean", "activation_std", "dead_fraction", "grad_norm"):
        np.testing.assert_allclose(
            getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-6
        )


def test_a_recurrent_cell_inside_a_scan_is_measured_over_all_steps():
    x = batch((4, 6, 3))
    model = _Scanned()
    variables = model.init(jax.random.key(0), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = jstab.signal_propagation(model, variables, x, nonlinearity="tanh")
    # One row per layer, as for the cell called in a Python loop.
    assert report.layers == ("SimpleCell_0/i", "SimpleCell_0/h", "Dense_0")
    unrolled = jstab.signal_propagation(_Unrolled(), variables, x, nonlinearity="tanh")
    _assert_same_rows(report, unrolled)
    # LSUV still leaves them out.
    with pytest.warns(RuntimeWarning, match="lsuv: .* SimpleCell_0/i"):
        jstab.lsuv(model, variables, x)


def test_an_nnx_recurrent_cell_inside_a_scan_is_measured_over_all_steps():
    x = batch((4, 6, 3))
    model = _NnxScanned(nnx.Rngs(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = jstab.signal_propagation(model, x, nonlinearity="tanh")
    cell = ("rnn/cell/dense_i", "rnn/cell/dense_h")
    assert report.layers == (*cell, "out")
    unrolled = jstab.signal_propagation(_NnxUnrolled(model), x, nonlinearity="tanh")
    assert unrolled.layers == ("cell/dense_i", "cell/dense_h", "out")
    _assert_same_rows(report, unrolled)
    with pytest.warns(RuntimeWarning, match="lsuv: .* rnn/cell/dense_i"):
        jstab.lsuv(model, x)


def test_an_unrolled_recurrent_cell_is_measured_over_all_steps():
    x = batch((4, 6, 3))
    model = _Unrolled()
    variables = model.init(jax.random.key(0), x)
    report = jstab.signal_propagation(model, variables, x, nonlinearity="tanh")
    assert report.layers == ("SimpleCell_0/i", "SimpleCell_0/h", "Dense_0")
    _, state = model.apply(variables, x, capture_intermediates=True)
    calls = state["intermediates"]["SimpleCell_0"]["h"]["__call__"]
    assert len(calls) == 6
    want = np.concatenate([np.ravel(c) for c in calls]).std()
    np.testing.assert_allclose(report.activation_std[1], want, rtol=1e-5)
