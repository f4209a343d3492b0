"""compute_fans on every layout the issue names, and the gain table."""

import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jstab


@pytest.mark.parametrize(
    "shape, axes, expected",
    [
        ((256, 512), {}, (256, 512)),  # dense (in, out)
        ((5, 16, 32), {}, (5 * 16, 5 * 32)),  # conv 1-D (k, c_in, c_out)
        ((3, 3, 64, 128), {}, (9 * 64, 9 * 128)),  # conv 2-D
        ((3, 5, 7, 4, 8), {}, (105 * 4, 105 * 8)),  # conv 3-D
        # attention query kernel (d_model, heads, head_dim)
        ((512, 8, 64), {"in_axis": 0, "out_axis": (1, 2)}, (512, 512)),
        # attention output kernel (heads, head_dim, d_model)
        ((8, 64, 512), {"in_axis": (0, 1), "out_axis": -1}, (512, 512)),
        # embedding (vocab, features), as Flax's Embed: out_axis=0
        ((1000, 64), {"in_axis": 1, "out_axis": 0}, (64, 1000)),
        # a stack of 12 dense kernels: the batch axis counts in neither fan
        ((12, 256, 512), {"batch_axis": 0}, (256, 512)),
        ((12, 3, 3, 16, 32), {"batch_axis": 0}, (9 * 16, 9 * 32)),
        # Equinox-style (out, in)
        ((512, 256), {"in_axis": -1, "out_axis": -2}, (256, 512)),
    ],
)
def test_compute_fans(shape, axes, expected):
    fans = jstab.compute_fans(shape, **axes)
    assert fans == expected
    assert all(isinstance(f, int) for f in fans)


def test_compute_fans_matches_jax_where_both_apply():
    from jax._src.nn.initializers import _compute_fans

    for shape in [(7, 9), (3, 3, 4, 8), (2, 3, 4, 5, 6)]:
        assert jstab.compute_fans(shape) == tuple(int(f) for f in _compute_fans(shape))


def test_batch_axis_leaves_the_variance_of_each_member():
    init = jstab.he_normal(batch_axis=0)
    w = np.asarray(init(jax.random.key(0), (16, 128, 256)))
    assert w.std() == pytest.approx(math.sqrt(2 / 128), rel=0.01)


@pytest.mark.parametrize("shape", [(), (5,)])
def test_compute_fans_rejects_rank_below_2(shape):
    with pytest.raises(ValueError, match=r"`shape` \(=\(.*\)\) has rank"):
        jstab.compute_fans(shape)


@pytest.mark.parametrize(
    "axes, match",
    [
        ({"in_axis": 2}, "`in_axis` \\(=2\\) is out of range"),
        ({"out_axis": -3}, "`out_axis` \\(=-3\\) is out of range"),
        ({"in_axis": 0, "out_axis": 0}, "must name distinct axes"),
        ({"batch_axis": -1}, "must name distinct axes"),
        ({"in_axis": 0.5}, "`in_axis` must be an int"),
    ],
)
def test_compute_fans_rejects_bad_axes(axes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        jstab.compute_fans((4, 5), **axes)


@pytest.mark.parametrize(
    "nonlinearity, param, gain",
    [
        ("linear", None, 1.0),
        ("identity", None, 1.0),
        ("conv1d", None, 1.0),
        ("conv2d", None, 1.0),
        ("conv3d", None, 1.0),
        ("conv_transpose2d", None, 1.0),
        ("sigmoid", None, 1.0),
        ("tanh", None, 5.0 / 3.0),
        ("relu", None, math.sqrt(2.0)),
        ("leaky_relu", None, math.sqrt(2.0 / (1.0 + 0.01**2))),
        ("leaky_relu", 0.2, math.sqrt(2.0 / (1.0 + 0.2**2))),
        ("leaky_relu", 0, math.sqrt(2.0)),
        ("selu", None, 0.75),
    ],
)
def test_calculate_gain_table(nonlinearity, param, gain):
    assert jstab.calculate_gain(nonlinearity, param) == gain


def test_calculate_gain_matches_pytorch_formulas():
    # torch.nn.init.calculate_gain, written out: leaky_relu's default slope
    # is 0.01, and tanh/selu are the exact fractions.
    assert jstab.calculate_gain("leaky_relu") == math.sqrt(2.0 / 1.0001)
    assert jstab.calculate_gain("tanh") == 5.0 / 3
    assert jstab.calculate_gain("selu") == 3.0 / 4


def test_he_variance_is_the_exact_squared_gain():
    from jstab.init._gain import gain_squared

    assert gain_squared("relu") == 2.0  # not math.sqrt(2) ** 2
    for name in ["tanh", "selu", "relu", "sigmoid"]:
        assert gain_squared(name) == pytest.approx(jstab.calculate_gain(name) ** 2)


@pytest.mark.parametrize("slope", [0.0, 0.01, 0.2, 1.0])
def test_he_uses_the_leaky_relu_gain(slope):
    init = jstab.he_normal("leaky_relu", negative_slope=slope)
    w = np.asarray(init(jax.random.key(1), (1024, 1024)))
    gain = jstab.calculate_gain("leaky_relu", slope)
    # 1e6 draws: the std's standard error is 0.07 %; 5 of them is 0.35 %.
    assert w.std() == pytest.approx(gain / math.sqrt(1024), rel=0.0035)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: jstab.calculate_gain("gelu"),
            "`nonlinearity` must be one of .*'gelu'",
        ),
        (lambda: jstab.calculate_gain("relu", 0.1), "`param` \\(=0.1\\) is only used"),
        (lambda: jstab.calculate_gain("leaky_relu", "a"), "`param` must be a real"),
        (lambda: jstab.calculate_gain("leaky_relu", True), "`param` must be a real"),
        (
            lambda: jstab.calculate_gain("leaky_relu", float("nan")),
            "`param` must be finite",
        ),
    ],
)
def test_calculate_gain_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@st.composite
def shapes_and_axes(draw):
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=2, max_size=5)))
    axes = draw(st.permutations(range(len(shape))))
    n_in = draw(st.integers(1, len(shape) - 1))
    n_out = draw(st.integers(1, len(shape) - n_in))
    n_batch = draw(st.integers(0, len(shape) - n_in - n_out))
    ins, outs = axes[:n_in], axes[n_in : n_in + n_out]
    batch = axes[n_in + n_out : n_in + n_out + n_batch]
    return shape, tuple(ins), tuple(outs), tuple(batch)


@settings(max_examples=200, deadline=None)
@given(shapes_and_axes())
def test_compute_fans_property(case):
    from jax._src.nn.initializers import _compute_fans

    shape, ins, outs, batch = case
    fan_in, fan_out = jstab.compute_fans(shape, ins, outs, batch)
    in_size = math.prod(shape[a] for a in ins)
    out_size = math.prod(shape[a] for a in outs)
    batch_size = math.prod(shape[a] for a in batch)
    receptive = math.prod(shape) // (in_size * out_size * batch_size)
    assert (fan_in, fan_out) == (in_size * receptive, out_size * receptive)
    # JAX agrees (it returns floats).
    assert (fan_in, fan_out) == _compute_fans(shape, ins, outs, batch)
