"""signal_propagation through scanned layers: one row per iteration.

Each scanned model is compared with the same network unrolled in a Python
loop, with the same parameters: a row ``blocks/<layer>[i]`` of the scan
must equal the unrolled block ``i``'s row.
"""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import (
    LinenBlock,
    LinenResidual,
    NnxResidual,
    batch,
    unstack_linen,
    unstack_nnx,
)
from flax import linen as nn
from flax import nnx

import jstab

DEPTH = 6
FIELDS = ("activation_mean", "activation_std", "dead_fraction", "grad_norm")


def _no_warning(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


def _assert_rows_equal(scanned, unrolled, rename):
    """``scanned``'s rows, renamed, are ``unrolled``'s rows (in any order)."""
    assert sorted(map(rename, scanned.layers)) == sorted(unrolled.layers)
    at = {name: i for i, name in enumerate(unrolled.layers)}
    for i, name in enumerate(scanned.layers):
        j = at[rename(name)]
        for field in FIELDS:
            np.testing.assert_allclose(
                getattr(scanned, field)[i],
                getattr(unrolled, field)[j],
                rtol=2e-5,
                atol=1e-6,
                err_msg=f"{field} of {name}",
            )


def _linen_name(name):  # blocks/Dense_0[3] -> blocks_3/Dense_0
    return re.sub(r"^blocks/(.+)\[(\d+)\]$", r"blocks_\2/\1", name)


def _nnx_name(name):  # blocks/linear1[3] -> blocks/3/linear1
    return re.sub(r"^blocks/(.+)\[(\d+)\]$", r"blocks/\2/\1", name)


def _expected(first, second):
    rows = [f"blocks/{layer}[{i}]" for i in range(DEPTH) for layer in (first, second)]
    return ("proj", *rows, "head")


def _linen_pair(x, **kw):
    """A scanned LinenResidual and the unrolled one, with the same params."""
    scanned = LinenResidual(depth=DEPTH, **kw)
    variables = scanned.init(jax.random.key(0), x)
    unrolled = LinenResidual(depth=DEPTH, unroll=True, **kw)
    params = unstack_linen(variables["params"], DEPTH)
    return (scanned, variables), (unrolled, {"params": params})


def test_linen_scanned_blocks_equal_the_unrolled_network():
    x = batch((64, 5))
    (scanned, v), (unrolled, u) = _linen_pair(x)
    assert v["params"]["blocks"]["Dense_0"]["kernel"].shape == (DEPTH, 16, 16)
    report = _no_warning(jstab.signal_propagation, scanned, v, x)
    # Forward order: the input projection, then per iteration both layers
    # of the body, then the head.
    assert report.layers == _expected("Dense_0", "Dense_1")
    want = jstab.signal_propagation(unrolled, u, x)
    assert tuple(map(_linen_name, report.layers)) == want.layers
    _assert_rows_equal(report, want, _linen_name)
    assert (report.vanishing, report.exploding) == (want.vanishing, want.exploding)
    assert len(set(report.grad_norm[1:-1].tolist())) == 2 * DEPTH  # slices differ


def test_nnx_scanned_blocks_equal_the_unrolled_network():
    x = batch((64, 5))
    scanned = NnxResidual(5, depth=DEPTH, rngs=nnx.Rngs(0))
    assert scanned.blocks.linear1.kernel.shape == (DEPTH, 16, 16)
    unrolled = NnxResidual(5, depth=DEPTH, unroll=True, rngs=nnx.Rngs(1))
    unstack_nnx(scanned, unrolled)
    report = _no_warning(jstab.signal_propagation, scanned, x)
    assert report.layers == _expected("linear1", "linear2")
    want = jstab.signal_propagation(unrolled, x)
    assert tuple(map(_nnx_name, report.layers)) == want.layers
    _assert_rows_equal(report, want, _nnx_name)
    # The scan's function is defined once (JAX keeps its traced body):
    # a second report sees the scanned layers all the same.
    again = jstab.signal_propagation(scanned, x)
    assert again.layers == report.layers
    _assert_rows_equal(again, want, _nnx_name)
    assert type(scanned.blocks.linear1) is nnx.Linear  # the model was not touched


class _SigmoidBlock(nn.Module):
    width: int = 16

    @nn.compact
    def __call__(self, x, _=None):
        kernel_init = jstab.small_normal(0.01)
        return jax.nn.sigmoid(nn.Dense(self.width, kernel_init=kernel_init)(x)), None


class _SigmoidStack(nn.Module):
    """Only scanned layers: the first and last rows are iterations."""

    @nn.compact
    def __call__(self, x):
        blocks = nn.scan(
            _SigmoidBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=12,
        )
        return blocks(name="blocks")(x, None)[0]


def test_verdicts_read_the_first_and_last_iterations():
    x = batch((64, 16))
    model = _SigmoidStack()
    report = jstab.signal_propagation(
        model, model.init(jax.random.key(0), x), x, nonlinearity="sigmoid"
    )
    assert report.layers == tuple(f"blocks/Dense_0[{i}]" for i in range(12))
    assert report.grad_norm[0] < 1e-3 * report.grad_norm[-1]
    assert report.verdict == "vanishing"


class _SharedBlock(nn.Module):
    """One Dense layer called twice per iteration."""

    width: int = 16

    @nn.compact
    def __call__(self, x, _=None):
        dense = nn.Dense(self.width)
        return x + dense(jax.nn.relu(dense(x))), None


def test_a_layer_called_twice_per_iteration_is_measured_over_both_calls():
    x = batch((64, 5))
    (scanned, v), (unrolled, u) = _linen_pair(x, block=_SharedBlock)
    report = jstab.signal_propagation(scanned, v, x)
    rows = tuple(f"blocks/Dense_0[{i}]" for i in range(DEPTH))
    assert report.layers == ("proj", *rows, "head")
    _assert_rows_equal(report, jstab.signal_propagation(unrolled, u, x), _linen_name)


def test_each_row_is_the_iteration_that_uses_its_slice():
    # A reversed scan runs slice 5 first: rows stay in slice order, each
    # with its own slice's statistics.
    x = batch((64, 5))
    (scanned, v), (unrolled, u) = _linen_pair(x, reverse=True)
    report = jstab.signal_propagation(scanned, v, x)
    assert report.layers == _expected("Dense_0", "Dense_1")
    want = jstab.signal_propagation(unrolled, u, x)
    assert want.layers[1] == "blocks_5/Dense_0"
    _assert_rows_equal(report, want, _linen_name)


def test_a_rematerialized_body_is_measured_once():
    # Under the gradient the forward pass of a remat body runs twice.
    x = batch((64, 5))
    (scanned, v), _ = _linen_pair(x)
    want = jstab.signal_propagation(scanned, v, x)
    remat = LinenResidual(depth=DEPTH, block=nn.remat(LinenBlock))
    report = jstab.signal_propagation(remat, v, x)
    assert report.layers == want.layers
    _assert_rows_equal(report, want, lambda name: name)


class _SquareBlocks(nn.Module):
    """Kernels stacked on axis 1 of (4, 4, 4): any axis could be the scan's."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4, name="proj")(x)
        blocks = nn.scan(
            LinenBlock,
            variable_axes={"params": 1},
            split_rngs={"params": True},
            length=4,
        )
        return blocks(4, name="blocks")(x, None)[0]


class _SquareLoop(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4, name="proj")(x)
        for i in range(4):
            x, _ = LinenBlock(4, name=f"blocks_{i}")(x)
        return x


def test_a_kernel_stacked_on_another_axis_is_sliced_on_it():
    x = batch((64, 5))
    model = _SquareBlocks()
    variables = model.init(jax.random.key(0), x)
    stacked = variables["params"]["blocks"]
    assert stacked["Dense_0"]["kernel"].shape == (4, 4, 4)
    params = {"proj": variables["params"]["proj"]}
    for i in range(4):
        params[f"blocks_{i}"] = jax.tree.map(lambda a, i=i: a[:, i], stacked)
    report = jstab.signal_propagation(model, variables, x)
    want = jstab.signal_propagation(_SquareLoop(), {"params": params}, x)
    assert tuple(map(_linen_name, report.layers)) == want.layers
    _assert_rows_equal(report, want, _linen_name)


def test_lsuv_leaves_scanned_layers_as_they_were_with_a_warning():
    x = batch((64, 5))
    (scanned, v), _ = _linen_pair(x)
    with pytest.warns(RuntimeWarning, match="lsuv: .* blocks/Dense_0, blocks/Dense_1"):
        new = jstab.lsuv(scanned, v, x)
    jax.tree.map(
        np.testing.assert_array_equal, new["params"]["blocks"], v["params"]["blocks"]
    )
    _, state = scanned.apply(new, x, capture_intermediates=True)
    proj = state["intermediates"]["proj"]["__call__"][0]
    assert float(jnp.var(proj)) == pytest.approx(1.0, abs=0.1)
