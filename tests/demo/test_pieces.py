"""The demo's data, models and training loop."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import jstab
from jstab.demo import data, experiments, models, train


def test_adding_problem_marks_one_step_in_each_half_and_sums_them():
    x, y = data.adding_problem(jax.random.key(0), 500, 50)
    assert x.shape == (500, 50, 2) and y.shape == (500,)
    marks = np.asarray(x[..., 1])
    assert set(np.unique(marks)) == {0.0, 1.0}
    assert np.all(marks[:, :25].sum(1) == 1) and np.all(marks[:, 25:].sum(1) == 1)
    np.testing.assert_allclose(y, np.sum(x[..., 0] * marks, axis=1), rtol=1e-6)


def test_adding_problem_baseline_mse_of_predicting_one_is_one_sixth():
    n = 20_000
    _, y = data.adding_problem(jax.random.key(1), n, 50)
    # (u + v - 1)^2 with u, v ~ U(0, 1): mean 1/6, variance 1/15 - 1/36.
    se = math.sqrt((1 / 15 - 1 / 36) / n)
    mse = float(jnp.mean((y - 1.0) ** 2))
    assert abs(mse - data.ADDING_BASELINE) < 5 * se


def test_digits_split_is_stratified_standardized_and_deterministic():
    split = data.digits(seed=3)
    assert split.x_train.shape == (1347, 64) and split.x_test.shape == (450, 64)
    assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int32
    assert set(split.y_test) == set(range(10))
    np.testing.assert_allclose(split.x_train.mean(0), 0.0, atol=1e-5)
    std = split.x_train.std(0)
    assert np.all((np.abs(std - 1) < 1e-4) | (std == 0))
    again = data.digits(seed=3)
    np.testing.assert_array_equal(split.x_test, again.x_test)
    assert not np.array_equal(split.x_test, data.digits(seed=4).x_test)


@pytest.mark.parametrize(
    ("residual", "batch_norm"), [(False, False), (True, False), (False, True)]
)
def test_mlp_has_depth_dense_layers_seen_by_signal_propagation(residual, batch_norm):
    model = models.MLP(depth=6, width=16, residual=residual, batch_norm=batch_norm)
    x = jax.random.normal(jax.random.key(0), (32, 64))
    variables = model.init(jax.random.key(1), x)
    report = jstab.signal_propagation(model, variables, x, model_kwargs={"train": True})
    assert len(report.layers) == 6
    assert model.apply(variables, x).shape == (32, 10)


def test_residual_branches_keep_the_output_scale_bounded_over_depth():
    x = jax.random.normal(jax.random.key(0), (256, 64))

    def output_std(residual: bool) -> float:
        model = models.MLP(depth=40, width=128, residual=residual)
        return float(jnp.std(model.apply(model.init(jax.random.key(1), x), x)))

    # Unscaled, 38 blocks would multiply the variance by 2^38; scaled, by ≤ e.
    assert output_std(True) < 3 * output_std(False)


@pytest.mark.parametrize(
    "cell",
    [nn.SimpleCell(8), nn.LSTMCell(8), nn.GRUCell(8)],
    ids=lambda c: type(c).__name__,
)
def test_recurrent_regressor_scanned_and_unrolled_are_the_same_function(cell):
    x, _ = data.adding_problem(jax.random.key(0), 4, 7)
    scanned = models.RecurrentRegressor(cell)
    unrolled = models.RecurrentRegressor(cell, unroll=True)
    variables = scanned.init(jax.random.key(1), x)
    other = unrolled.init(jax.random.key(1), x)
    assert jax.tree.structure(variables) == jax.tree.structure(other)
    assert scanned.apply(variables, x).shape == (4,)
    np.testing.assert_allclose(
        scanned.apply(variables, x), unrolled.apply(variables, x), rtol=1e-5, atol=1e-6
    )


def test_signal_propagation_sees_the_cell_scanned_or_unrolled():
    x, _ = data.adding_problem(jax.random.key(0), 16, 10)
    cell = nn.SimpleCell(8)
    variables = models.RecurrentRegressor(cell).init(jax.random.key(1), x)
    unrolled = models.RecurrentRegressor(cell, unroll=True)
    report = jstab.signal_propagation(unrolled, variables, x, nonlinearity="tanh")
    assert report.layers == ("cell/i", "cell/h", "head")
    # Run by nn.RNN (a scan), the cell is measured over all its calls too.
    scanned = jstab.signal_propagation(
        models.RecurrentRegressor(cell), variables, x, nonlinearity="tanh"
    )
    assert scanned.layers == report.layers
    for field in ("activation_mean", "activation_std", "dead_fraction", "grad_norm"):
        np.testing.assert_allclose(
            getattr(scanned, field), getattr(report, field), rtol=1e-4, atol=1e-6
        )


def _linear_regression():
    w_true = jnp.array([1.0, -2.0, 0.5])

    def sample(key):
        x = jax.random.normal(key, (32, 3))
        return x, x @ w_true

    def loss_fn(params, state, batch):
        return jnp.mean((batch[0] @ params["w"] - batch[1]) ** 2), state

    return sample, loss_fn


def test_fit_trains_each_seed_and_is_deterministic():
    sample, loss_fn = _linear_regression()
    params = {"w": jnp.tile(jnp.arange(3.0)[:, None], (1, 3))}  # 3 seeds
    keys = jax.random.split(jax.random.key(0), 3)
    seen = []
    tx = optax.chain(jstab.clip_by_global_norm(1.0), optax.sgd(0.1))
    run = train.fit(
        loss_fn, tx, params, {}, sample, keys, steps=50, chunk=20, progress=seen.append
    )
    assert seen == [20, 40, 50]
    assert run.loss.shape == run.grad_norm.shape == (3, 50)
    assert np.all(run.loss[:, -1] < 1e-2 * run.loss[:, 0])
    stats = jstab.statistics(run.opt_state)
    assert stats["clip_by_global_norm/clip_count"].shape == (3,)
    again = train.fit(loss_fn, tx, params, {}, sample, keys, steps=50, chunk=20)
    np.testing.assert_array_equal(run.loss, again.loss)
    np.testing.assert_array_equal(run.params["w"], again.params["w"])


def test_time_gradients_vanish_for_a_small_recurrent_init():
    x, y = data.adding_problem(jax.random.key(0), 64, 30)
    small = nn.SimpleCell(16, recurrent_kernel_init=jstab.small_normal(0.01))
    model = models.RecurrentRegressor(small)
    profile = experiments.time_gradients(
        model, model.init(jax.random.key(1), x)["params"], x, y
    )
    assert profile.shape == (30,)
    assert profile[0] < 1e-6 * profile[-1]


_TINY = dataclasses.replace(experiments.QUICK, seeds=2, steps=20, depth=4, length=8)


@pytest.mark.parametrize(
    "name",
    [
        "ReLU + He + batch norm",
        "ReLU + LSUV",
        "tanh RNN, N(0, 2.25/n) + global-norm clip",
    ],
)
def test_measure_is_deterministic_given_the_seed(name):
    config = next(c for c in experiments.CONFIGS if c.name == name)
    first = experiments.measure(config, _TINY, seed=5)
    second = experiments.measure(config, _TINY, seed=5)
    assert first.metric.shape == (2,)
    np.testing.assert_array_equal(first.loss, second.loss)
    np.testing.assert_array_equal(first.metric, second.metric)
    assert first.ratio == second.ratio and first.diagnosis == second.diagnosis
    other = experiments.measure(config, _TINY, seed=6)
    assert not np.array_equal(first.loss, other.loss)


@pytest.mark.parametrize(
    ("residual", "batch_norm"), [(False, False), (True, False), (False, True)]
)
def test_cnn_has_depth_convolutions_and_a_head_seen_by_signal_propagation(
    residual, batch_norm
):
    model = models.CNN(depth=5, channels=4, residual=residual, batch_norm=batch_norm)
    x = jax.random.normal(jax.random.key(0), (16, 64))
    variables = model.init(jax.random.key(1), x)
    report = jstab.signal_propagation(model, variables, x, model_kwargs={"train": True})
    assert report.layers == tuple(f"Conv_{i}" for i in range(5)) + ("Dense_0",)
    assert variables["params"]["Conv_1"]["kernel"].shape == (3, 3, 4, 4)
    assert model.apply(variables, x).shape == (16, 10)


def test_cnn_signal_vanishes_with_small_init_and_not_with_delta_orthogonal():
    x = jnp.asarray(data.digits().x_train[:128])

    def report(kernel_init) -> jstab.SignalReport:
        model = models.CNN(depth=12, channels=8, kernel_init=kernel_init)
        return jstab.signal_propagation(model, model.init(jax.random.key(1), x[:2]), x)

    small = report(jstab.small_normal(0.01))
    # The gradient is equally tiny at every layer: only the activations tell.
    assert small.verdict == "ok" and np.all(small.grad_norm < 1e-20)
    assert experiments.diagnose(small) == "vanishing"
    isometric = report(jstab.delta_orthogonal(math.sqrt(2)))
    assert experiments.diagnose(isometric) == "ok"
    assert 1e-2 < isometric.grad_norm[0] / isometric.grad_norm[-1] < 1e2


def test_fit_one_seed_and_one_step_at_a_time_trains_the_same_models():
    sample, loss_fn = _linear_regression()
    params = {"w": jnp.tile(jnp.arange(3.0)[:, None], (1, 3))}
    keys = jax.random.split(jax.random.key(0), 3)
    tx = optax.chain(jstab.clip_by_global_norm(1.0), optax.adam(0.05))
    runs = [
        train.fit(
            loss_fn, tx, params, {}, sample, keys, steps=30, chunk=20, vectorize=v
        )
        for v in (True, False)
    ]
    np.testing.assert_allclose(runs[0].loss, runs[1].loss, rtol=1e-5)
    np.testing.assert_allclose(runs[0].params["w"], runs[1].params["w"], rtol=1e-5)
    assert not np.allclose(runs[1].params["w"][0], runs[1].params["w"][1])


def _spectral_norm_effective_kernels(variables) -> dict[str, jax.Array]:
    """What Flax's SpectralNorm applies at evaluation: the kernel over the
    estimate of its largest singular value from one power-iteration step
    from the stored ``u``."""

    def unit(a):
        return a / jnp.linalg.norm(a)

    kernels = {}
    for stats in variables["batch_stats"].values():
        ((key, u),) = ((k, v) for k, v in stats.items() if k.endswith("/u"))
        layer = key.split("/")[0]
        w = variables["params"][layer]["kernel"]
        v = unit(u @ w.T)
        u = unit(v @ w)
        kernels[layer] = w / (v @ w @ u.T)[0, 0]
    return kernels


def test_spectral_norm_keeps_every_trained_kernel_at_largest_singular_value_one():
    config = next(c for c in experiments.CONFIGS if c.name.endswith("spectral norm"))
    budget = dataclasses.replace(experiments.QUICK, seeds=2, steps=300)
    result = experiments.measure(config, budget)
    assert np.all(np.isfinite(result.train_loss))
    for seed in range(2):
        variables = jax.tree.map(lambda a, i=seed: a[i], result.variables)
        kernels = _spectral_norm_effective_kernels(variables)
        assert len(kernels) == budget.depth
        for layer, kernel in kernels.items():
            sigma = float(jnp.linalg.svd(kernel, compute_uv=False)[0])
            assert abs(sigma - 1) < 0.1, (layer, sigma)
        # The stored kernels are not normalized themselves (Flax's init
        # stores N(0, 1) kernels already divided by a first, rough estimate).
        raw = [
            float(jnp.linalg.svd(variables["params"][layer]["kernel"])[1][0])
            for layer in kernels
        ]
        assert max(abs(s - 1) for s in raw) > 0.1, raw


def test_fit_with_loss_scaling_records_the_unscaled_loss_and_gradient():
    # The same float32 run with and without dynamic_loss_scale: a scale of
    # 2**10 that never changes unscales exactly, so losses, gradient norms
    # and parameters agree; the scale is recorded at every step.
    sample, loss_fn = _linear_regression()
    params = {"w": jnp.zeros((2, 3))}
    keys = jax.random.split(jax.random.key(0), 2)
    plain = train.fit(loss_fn, optax.sgd(0.05), params, {}, sample, keys, steps=30)
    tx = jstab.dynamic_loss_scale(optax.sgd(0.05), init_scale=2.0**10)
    scaled = train.fit(loss_fn, tx, params, {}, sample, keys, steps=30, scale_loss=True)
    np.testing.assert_array_equal(plain.loss_scale, np.ones((2, 30)))
    np.testing.assert_array_equal(scaled.loss_scale, np.full((2, 30), 2.0**10))
    np.testing.assert_allclose(scaled.loss, plain.loss, rtol=1e-6)
    np.testing.assert_allclose(scaled.grad_norm, plain.grad_norm, rtol=1e-6)
    np.testing.assert_allclose(scaled.params["w"], plain.params["w"], rtol=1e-6)


def test_flushed_counts_the_gradient_that_float16_loses_per_layer():
    # Two linear layers fed inputs of 1e-9: both kernels' gradients (the
    # input, and the hidden layer's 2e-9) are below float16's range, not
    # below bfloat16's; inputs of 1e-5 are float16 subnormals, kept.
    params = {
        "Dense_0": {"kernel": jnp.ones((4, 4)) * 0.5},
        "Dense_1": {"kernel": jnp.ones((4, 1))},
    }

    def loss_fn(p, x):
        h = x.astype(p["Dense_0"]["kernel"].dtype) @ p["Dense_0"]["kernel"]
        return jnp.sum(h @ p["Dense_1"]["kernel"]).astype(jnp.float32)

    x = jnp.full((1, 4), 1e-9)
    lost = experiments.flushed(loss_fn, params, x, jnp.float16)
    np.testing.assert_array_equal(lost, [1.0, 1.0])
    lost = experiments.flushed(loss_fn, params, x * 1e4, jnp.float16)
    np.testing.assert_array_equal(lost, [0.0, 0.0])
    lost = experiments.flushed(loss_fn, params, x, jnp.bfloat16)
    np.testing.assert_array_equal(lost, [0.0, 0.0])
