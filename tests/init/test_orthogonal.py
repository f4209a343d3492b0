"""orthogonal: WᵀW = gain²·I; delta_orthogonal: an orthogonal centre tap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jstab

# Orthogonality of a float32 QR holds to a few ulps times the size.
ATOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-3}


def as_matrix(w, column_axis=-1):
    w = np.moveaxis(
        np.asarray(w.astype(jnp.float32), dtype=np.float64), column_axis, -1
    )
    return w.reshape(-1, w.shape[-1])


def gram(m):
    """MᵀM for a tall matrix, MMᵀ for a wide one: the square, identity-like side."""
    return m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(
    "shape", [(64, 64), (128, 32), (32, 128), (3, 3, 16, 32), (3, 3, 64, 8)]
)
@pytest.mark.parametrize("gain", [1.0, np.sqrt(2.0)])
def test_orthogonal_gram_is_gain_squared_identity(shape, dtype, gain):
    w = jstab.orthogonal(gain)(jax.random.key(0), shape, dtype)
    assert w.shape == shape and w.dtype == dtype
    g = gram(as_matrix(w))
    np.testing.assert_allclose(g, gain**2 * np.eye(len(g)), atol=ATOL[dtype] * gain**2)


def test_orthogonal_column_axis():
    # Equinox-style (out, in) kernel: the columns live on axis 0.
    w = jstab.orthogonal(column_axis=0)(jax.random.key(1), (16, 64))
    m = as_matrix(w, column_axis=0)
    np.testing.assert_allclose(m.T @ m, np.eye(16), atol=1e-5)


def test_orthogonal_is_not_a_fixed_matrix():
    # Haar-distributed: entries of a 256×256 draw have variance 1/256.
    w = np.asarray(jstab.orthogonal()(jax.random.key(2), (256, 256)))
    assert w.var() == pytest.approx(1 / 256, rel=0.02)
    assert np.abs(np.diag(w)).mean() < 0.2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "shape", [(3, 8, 8), (3, 3, 16, 32), (5, 5, 4, 4), (3, 3, 3, 2, 6)]
)
def test_delta_orthogonal_centre_tap(shape, dtype):
    gain = 2.0
    w = np.asarray(
        jstab.delta_orthogonal(gain)(jax.random.key(3), shape, dtype).astype(
            jnp.float32
        )
    )
    centre = tuple((k - 1) // 2 for k in shape[:-2])
    tap = w[centre].astype(np.float64)
    np.testing.assert_allclose(
        gram(tap), gain**2 * np.eye(min(tap.shape)), atol=ATOL[dtype] * 4
    )
    rest = w.copy()
    rest[centre] = 0.0
    assert not rest.any()


@pytest.mark.parametrize(
    "shape, match",
    [
        ((8, 8), "has rank 2; `delta_orthogonal` needs a convolution kernel"),
        ((2, 2, 2, 2, 2, 2), "has rank 6"),
        ((3, 3, 32, 16), "c_in=32 > c_out=16"),
    ],
)
def test_delta_orthogonal_rejects_bad_shapes(shape, match):
    init = jstab.delta_orthogonal()
    with pytest.raises(ValueError, match=match):
        init(jax.random.key(0), shape)


@pytest.mark.parametrize("shape", [(), (7,)])
def test_orthogonal_rejects_rank_below_2(shape):
    with pytest.raises(ValueError, match="`orthogonal` needs a weight of rank >= 2"):
        jstab.orthogonal()(jax.random.key(0), shape)


def test_orthogonal_rejects_column_axis_out_of_range():
    with pytest.raises(ValueError, match=r"`column_axis` \(=2\) is out of range"):
        jstab.orthogonal(column_axis=2)(jax.random.key(0), (4, 4))
