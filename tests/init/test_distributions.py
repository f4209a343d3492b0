"""Each initializer's empirical mean, std and bound match its formula.

Tolerances come from the sample size: the sample standard deviation of n
i.i.d. draws with standard deviation σ and kurtosis κ has standard error
σ·√((κ − 1)/(4n)), the mean σ/√n. A check allows Z = 5 standard errors
(a false alarm once in about 1.7 million checks); keys are fixed, so a run
is reproducible. A uniform draw's largest |w| is within b·(1 − δ) of its
bound b with probability 1 − (1 − δ)^n; δ = 14/n makes a miss < 1e-6.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jstab

Z = 5.0
KURTOSIS = {"normal": 3.0, "truncated": 3.0, "uniform": 1.8}  # truncated: κ < 3
DENSE = (256, 512)
CONV = (3, 3, 64, 128)


def fans(shape):
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def check_moments(w, std, kind):
    """Asserts mean ≈ 0 and std ≈ ``std`` within Z standard errors."""
    x = np.asarray(w, dtype=np.float64).ravel()
    n = x.size
    se_std = std * math.sqrt((KURTOSIS[kind] - 1.0) / (4.0 * n))
    assert abs(x.mean()) <= Z * std / math.sqrt(n)
    assert abs(x.std() - std) <= Z * se_std, (x.std(), std, Z * se_std)


def check_bound(w, bound):
    """Asserts max |w| ≤ bound and max |w| ≥ bound·(1 − 14/n)."""
    x = np.abs(np.asarray(w, dtype=np.float64))
    assert x.max() <= bound * (1 + 1e-6)
    assert x.max() >= bound * (1.0 - 14.0 / x.size)


# (initializer, kind, std as a function of (fan_in, fan_out))
RELU = math.sqrt(2.0)
CASES = {
    "glorot_normal": (
        jstab.glorot_normal(),
        "normal",
        lambda i, o: math.sqrt(2 / (i + o)),
    ),
    "glorot_normal_gain": (
        jstab.glorot_normal(gain=5 / 3),
        "normal",
        lambda i, o: 5 / 3 * math.sqrt(2 / (i + o)),
    ),
    "glorot_normal_seed_variant": (
        jstab.glorot_normal(scale=0.5),
        "normal",
        lambda i, o: math.sqrt(1 / (i + o)),
    ),
    "glorot_uniform": (
        jstab.glorot_uniform(),
        "uniform",
        lambda i, o: math.sqrt(2 / (i + o)),
    ),
    "he_normal": (jstab.he_normal(), "normal", lambda i, o: math.sqrt(2 / i)),
    "he_normal_fan_out": (
        jstab.he_normal(mode="fan_out"),
        "normal",
        lambda i, o: math.sqrt(2 / o),
    ),
    "he_normal_leaky": (
        jstab.he_normal("leaky_relu", negative_slope=0.2),
        "normal",
        lambda i, o: math.sqrt(2 / (1 + 0.2**2) / i),
    ),
    "he_normal_tanh_truncated": (
        jstab.he_normal("tanh", distribution="truncated_normal"),
        "truncated",
        lambda i, o: 5 / 3 / math.sqrt(i),
    ),
    "he_uniform": (jstab.he_uniform(), "uniform", lambda i, o: math.sqrt(2 / i)),
    "he_uniform_fan_out": (
        jstab.he_uniform(mode="fan_out"),
        "uniform",
        lambda i, o: math.sqrt(2 / o),
    ),
    "lecun_normal": (jstab.lecun_normal(), "normal", lambda i, o: math.sqrt(1 / i)),
    "lecun_uniform": (jstab.lecun_uniform(), "uniform", lambda i, o: math.sqrt(1 / i)),
    "variance_scaling_geo": (
        jstab.variance_scaling(3.0, "fan_geo_avg", "normal"),
        "normal",
        lambda i, o: math.sqrt(3 / math.sqrt(i * o)),
    ),
    "small_normal": (jstab.small_normal(0.02), "normal", lambda i, o: 0.02),
    "small_uniform": (
        jstab.small_uniform(0.05),
        "uniform",
        lambda i, o: 0.05 / math.sqrt(3),
    ),
    "truncated_normal": (jstab.truncated_normal(0.3), "truncated", lambda i, o: 0.3),
}


@pytest.mark.parametrize("shape", [DENSE, CONV], ids=["dense", "conv"])
@pytest.mark.parametrize("name", list(CASES))
def test_std_and_bound_match_the_formula(name, shape):
    init, kind, std_of = CASES[name]
    std = std_of(*fans(shape))
    w = init(jax.random.key(0), shape, jnp.float32)
    assert w.shape == shape and w.dtype == jnp.float32
    check_moments(w, std, kind)
    if kind == "uniform":
        check_bound(w, math.sqrt(3.0) * std)


def test_he_normal_relu_is_sqrt_2_over_fan_in():
    w = jstab.he_normal()(jax.random.key(1), (3, 3, 64, 128))
    check_moments(w, math.sqrt(2.0 / (3 * 3 * 64)), "normal")
    check_bound(jstab.he_uniform()(jax.random.key(1), DENSE), math.sqrt(6.0 / 256))


def test_glorot_uniform_bound_is_sqrt_6_over_fan_sum():
    w = jstab.glorot_uniform(gain=2.0)(jax.random.key(2), DENSE)
    check_bound(w, 2.0 * math.sqrt(6.0 / (256 + 512)))


@pytest.mark.parametrize(
    "lower, upper", [(-2.0, 2.0), (-1.0, 1.0), (-3.0, 0.5), (0.5, 4.0)]
)
def test_truncated_normal_has_the_asked_std_and_bounds(lower, upper):
    stddev = 0.5
    w = np.asarray(
        jstab.truncated_normal(stddev, lower, upper)(jax.random.key(3), (200_000,))
    )
    underlying = stddev / jstab.init._small.truncated_std(lower, upper)
    assert w.min() >= lower * underlying and w.max() <= upper * underlying
    se_std = stddev * math.sqrt(2.0 / (4.0 * w.size))  # κ − 1 ≤ 2
    assert abs(w.std() - stddev) <= Z * se_std


def simpson_truncated_std(lower, upper, n=200_001):
    """The truncated std by Simpson's rule on the density, shifted against underflow."""
    t = np.linspace(lower, upper, n)
    peak = 0.0 if lower <= 0.0 <= upper else min(abs(lower), abs(upper))
    weights = np.ones(n)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    density = weights * np.exp(-(t * t - peak * peak) / 2)
    mean = (density * t).sum() / density.sum()
    return math.sqrt((density * (t - mean) ** 2).sum() / density.sum())


def test_truncated_std_matches_the_known_constant():
    # The constant JAX uses for a standard normal truncated to (-2, 2).
    assert jstab.init._small.truncated_std(-2.0, 2.0) == pytest.approx(
        0.87962566103423978, rel=1e-14
    )


@pytest.mark.parametrize(
    "lower, upper", [(-2.0, 2.0), (-3.0, 0.5), (0.5, 4.0), (8.0, 9.0), (-9.0, -8.0)]
)
def test_truncated_std_matches_quadrature(lower, upper):
    # Tail intervals too: Z is computed with erfc there, without cancellation.
    expected = simpson_truncated_std(lower, upper)
    assert jstab.init._small.truncated_std(lower, upper) == pytest.approx(
        expected, rel=1e-9
    )


def test_plain_normal_reaches_beyond_two_sigma():
    # The default draw is a plain normal, not JAX's truncated one: about 4.6 %
    # of the draws lie beyond two standard deviations.
    w = np.asarray(jstab.he_normal()(jax.random.key(4), DENSE))
    std = math.sqrt(2.0 / 256)
    frac = np.mean(np.abs(w) > 2 * std)
    p = math.erfc(2 / math.sqrt(2))
    assert abs(frac - p) <= Z * math.sqrt(p * (1 - p) / w.size)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_keeps_the_distribution(dtype):
    # Drawn in float32 and rounded once: the std is right to the rounding
    # error of the dtype, and the tails are not cut at a coarse grid.
    w = jstab.he_normal()(jax.random.key(5), (512, 512), dtype)
    assert w.dtype == dtype
    x = np.asarray(w.astype(jnp.float32), dtype=np.float64)
    std = math.sqrt(2.0 / 512)
    eps = float(jnp.finfo(dtype).eps)
    assert abs(x.std() - std) <= Z * std / math.sqrt(2 * x.size) + eps * std
    assert np.abs(x).max() > 4.0 * std
