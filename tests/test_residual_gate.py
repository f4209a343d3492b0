"""ResidualGate in Linen and NNX: identity at zero, alpha's gradient, dtypes."""

import doctest

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jstab

KEYS = jax.random.split(jax.random.key(7), 3)
X = jax.random.normal(KEYS[0], (4, 6))
F = jax.random.normal(KEYS[1], (4, 6))
W = jax.random.normal(KEYS[2], (4, 6))  # weights of a loss that is not a sum


def formula_loss(alpha, x, f):
    return jnp.sum(W * jnp.tanh(x + alpha * f))


def linen_loss(params, x, f):
    return jnp.sum(W * jnp.tanh(jstab.nn.ResidualGate().apply(params, x, f)))


def nnx_loss(gate, x, f):
    return jnp.sum(W * jnp.tanh(gate(x, f)))


def test_linen_alpha_is_a_float32_scalar_named_alpha():
    params = jstab.nn.ResidualGate(init_value=0.25).init(KEYS[0], X, F)
    alpha = params["params"]["alpha"]
    assert alpha.shape == () and alpha.dtype == jnp.float32 and alpha == 0.25


def test_nnx_alpha_is_a_float32_scalar_param():
    gate = jstab.nnx.ResidualGate(init_value=0.25)
    assert isinstance(gate.alpha, nnx.Param)
    assert gate.alpha[...].shape == () and gate.alpha[...].dtype == jnp.float32
    assert float(gate.alpha[...]) == 0.25
    assert list(nnx.state(gate, nnx.Param).keys()) == ["alpha"]


def test_both_start_as_the_identity():
    params = jstab.nn.ResidualGate().init(KEYS[0], X, F)
    np.testing.assert_array_equal(jstab.nn.ResidualGate().apply(params, X, F), X)
    np.testing.assert_array_equal(jstab.nnx.ResidualGate()(X, F), X)
    # Even a branch that has exploded, as long as it is finite.
    np.testing.assert_array_equal(jstab.nnx.ResidualGate()(X, 1e30 * F), X)


@pytest.mark.parametrize("alpha", [0.0, 0.5, -1.5])
def test_linen_gradients_are_those_of_the_formula(alpha):
    params = {"params": {"alpha": jnp.float32(alpha)}}
    got = jax.grad(linen_loss, argnums=(0, 1, 2))(params, X, F)
    want = jax.grad(formula_loss, argnums=(0, 1, 2))(jnp.float32(alpha), X, F)
    np.testing.assert_allclose(got[0]["params"]["alpha"], want[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-6, atol=1e-7)
    assert got[0]["params"]["alpha"] != 0  # the gate at zero still learns


@pytest.mark.parametrize("alpha", [0.0, 0.5, -1.5])
def test_nnx_gradients_are_those_of_the_formula(alpha):
    gate = jstab.nnx.ResidualGate(init_value=alpha)
    grads = nnx.grad(nnx_loss)(gate, X, F)
    want = jax.grad(formula_loss)(jnp.float32(alpha), X, F)
    np.testing.assert_allclose(grads.alpha[...], want, rtol=1e-6)
    assert grads.alpha[...] != 0


def test_jvp_through_the_gate():
    params = {"params": {"alpha": jnp.float32(0.3)}}
    tangent = {"params": {"alpha": jnp.float32(1.0)}}
    _, out = jax.jvp(lambda p: linen_loss(p, X, F), (params,), (tangent,))
    _, want = jax.jvp(lambda a: formula_loss(a, X, F), (jnp.float32(0.3),), (1.0,))
    np.testing.assert_allclose(out, want, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_the_output_keeps_xs_dtype(dtype):
    x, f = X.astype(dtype), F.astype(dtype)
    params = jstab.nn.ResidualGate(init_value=0.5).init(KEYS[0], x, f)
    assert params["params"]["alpha"].dtype == jnp.float32
    out = jstab.nn.ResidualGate(init_value=0.5).apply(params, x, f)
    wide = x.astype(jnp.float32) + 0.5 * f.astype(jnp.float32)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, wide.astype(dtype))
    out = jstab.nnx.ResidualGate(init_value=0.5)(x, f)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, wide.astype(dtype))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "a", None])
def test_bad_init_value_fails_at_construction(value):
    with pytest.raises((TypeError, ValueError), match="`init_value`"):
        jstab.nn.ResidualGate(init_value=value)
    with pytest.raises((TypeError, ValueError), match="`init_value`"):
        jstab.nnx.ResidualGate(init_value=value)


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="same shape"):
        jstab.nnx.ResidualGate()(X, F[:, :3])
    with pytest.raises(ValueError, match="same shape"):
        jstab.nn.ResidualGate().init(KEYS[0], X, F[:2])


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        branch = nn.Dense(6)(nn.relu(nn.Dense(6)(h)))
        return jstab.nn.ResidualGate(init_value=0.1)(h, branch), None


def test_linen_gates_stacked_by_nn_scan():
    blocks = nn.scan(
        LinenBlock,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=5,
    )()
    params = blocks.init(KEYS[0], X, None)
    assert params["params"]["ResidualGate_0"]["alpha"].shape == (5,)
    out, _ = blocks.apply(params, X, None)
    h = X
    for i in range(5):
        layer = jax.tree.map(lambda p, i=i: p[i], params)
        h, _ = LinenBlock().apply(layer, h, None)
    np.testing.assert_allclose(out, h, rtol=1e-5, atol=1e-6)


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(6, 6, rngs=rngs)
        self.down = nnx.Linear(6, 6, rngs=rngs)
        self.gate = jstab.nnx.ResidualGate(init_value=0.1)

    def __call__(self, h):
        return self.gate(h, self.down(nnx.relu(self.up(h))))


def test_nnx_gates_created_by_vmap_and_run_by_scan():
    @nnx.split_rngs(splits=5)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return NNXBlock(rngs)

    blocks = create(nnx.Rngs(0))
    assert blocks.gate.alpha[...].shape == (5,)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(h, block):
        return block(h)

    out = forward(X, blocks)
    graphdef, state = nnx.split(blocks)
    h = X
    for i in range(5):
        block = nnx.merge(graphdef, jax.tree.map(lambda p, i=i: p[i], state))
        h = block(h)
    np.testing.assert_allclose(out, h, rtol=1e-5, atol=1e-6)


def test_the_examples_in_the_docstrings():
    for module in (jstab.nn, jstab.nnx):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted >= 4 and result.failed == 0, module.__name__
