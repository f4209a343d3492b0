"""jstab.statistics: every jstab state in a nested Optax state, as one dict."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _models import LinenMLP, batch, nnx_training

import jstab
from jstab.diagnostics import _statistics


def _linen_problem(depth=3):
    model = LinenMLP(depth=depth, width=8)
    x = batch((16, 4))
    params = model.init(jax.random.key(0), x)["params"]

    def grads(params, scale):
        def loss(p):
            return jnp.mean(model.apply({"params": p}, x) ** 2) * scale

        return jax.grad(loss)(params)

    return params, grads


def _nested(warmup=2):
    """MultiSteps(inject_hyperparams(chain(masked, clip, skip(chain(...)))))."""

    def build(learning_rate):
        inner = optax.chain(
            jstab.monitor_gradients(),
            jstab.zclip(warmup_steps=warmup),
            optax.adam(learning_rate),
        )
        mask = {"Dense_0": {"kernel": True, "bias": False}, "Dense_1": False}
        mask["Dense_2"] = {"kernel": True, "bias": False}
        return optax.chain(
            optax.masked(jstab.clip_by_layer_norm(10.0), mask),
            jstab.autoclip(90.0, history=8),
            jstab.skip_on_spike(inner, z_thresh=3.0, warmup_steps=warmup),
            jstab.clip_by_value(1e-3),
        )

    return optax.MultiSteps(
        optax.inject_hyperparams(build)(learning_rate=1e-2), every_k_schedule=2
    )


_LAYERS = ("Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel")
_LAYERS += ("Dense_2/bias", "Dense_2/kernel")
EXPECTED = (
    ["clip_by_layer_norm/norm/Dense_0/kernel", "clip_by_layer_norm/norm/Dense_2/kernel"]
    + ["clip_by_layer_norm/clipped", "clip_by_layer_norm/clip_count"]
    + ["autoclip/norm", "autoclip/clipped", "autoclip/clip_count"]
    + ["autoclip/threshold"]
    + ["skip_on_spike/skipped", "skip_on_spike/skip_count", "skip_on_spike/norm"]
    + ["skip_on_spike/mean", "skip_on_spike/std"]
    + ["monitor_gradients/global_norm", "monitor_gradients/nonfinite"]
    + ["monitor_gradients/vanishing", "monitor_gradients/exploding"]
    + [f"monitor_gradients/layer_norms/{name}" for name in _LAYERS]
    + ["zclip/norm", "zclip/clipped", "zclip/clip_count", "zclip/threshold"]
    + ["zclip/spike", "zclip/mean", "zclip/std"]
    + ["clip_by_value/norm", "clip_by_value/clipped", "clip_by_value/clip_count"]
)


def _get(state, field, kind, index=0):
    """``field`` of the ``index``-th state named ``kind``, found by Optax."""
    found = optax.tree.get_all_with_path(
        state, field, filtering=lambda path, _: path[-1].tuple_name == kind
    )
    return found[index][1]


def _run(tx, params, grads, scales):
    state = tx.init(params)
    step = jax.jit(tx.update)
    for scale in scales:
        _, state = step(grads(params, scale), state, params)
    return state


@pytest.fixture(scope="module")
def nested_state():
    params, grads = _linen_problem()
    # Eight micro-steps, four optimizer steps; the last one is a spike.
    return _run(_nested(), params, grads, [1, 1, 1.2, 1.2, 0.9, 0.9, 50, 50])


def test_keys_of_a_nested_state(nested_state):
    stats = jstab.statistics(nested_state)
    assert list(stats) == EXPECTED
    assert all(v.shape == () for v in stats.values())


def test_values_are_the_fields(nested_state):
    s, stats = nested_state, jstab.statistics(nested_state)
    assert bool(stats["skip_on_spike/skipped"])  # the spike was seen
    assert int(stats["skip_on_spike/skip_count"]) == 1
    for kind, name, fields in [
        ("AutoClipState", "autoclip", ("norm", "clipped", "clip_count", "threshold")),
        ("ZClipState", "zclip", ("norm", "clipped", "threshold", "spike", "mean")),
        ("SkipState", "skip_on_spike", ("skipped", "skip_count", "norm", "mean")),
        (
            "MonitorState",
            "monitor_gradients",
            ("global_norm", "nonfinite", "exploding"),
        ),
        ("ClipByValueState", "clip_by_value", ("norm", "clipped", "clip_count")),
    ]:
        for field in fields:
            want = _get(s, field, kind)
            assert stats[f"{name}/{field}"].dtype == want.dtype
            np.testing.assert_array_equal(stats[f"{name}/{field}"], want)
    for kind, name in [("ZClipState", "zclip"), ("SkipState", "skip_on_spike")]:
        np.testing.assert_array_equal(
            stats[f"{name}/std"], jnp.sqrt(_get(s, "var", kind))
        )
    layer_norms = optax.tree.get(s, "layer_norms")
    clip_norms = _get(s, "norm", "ClipByLayerNormState")
    for layer in _LAYERS:
        module, leaf = layer.split("/")
        want = layer_norms[module][leaf]
        assert stats[f"monitor_gradients/layer_norms/{layer}"] == want
        if layer.endswith("kernel") and module != "Dense_1":
            assert stats[f"clip_by_layer_norm/norm/{layer}"] == clip_norms[module][leaf]


def test_under_jit(nested_state):
    want = jstab.statistics(nested_state)
    got = jax.jit(jstab.statistics)(nested_state)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype
        np.testing.assert_array_equal(got[key], value)


def test_returned_from_a_jitted_step():
    params, grads = _linen_problem(depth=2)
    tx = optax.chain(jstab.monitor_gradients(), jstab.clip_by_global_norm(0.1))
    tx = optax.chain(tx, optax.sgd(0.1))

    @jax.jit
    def step(params, state):
        updates, state = tx.update(grads(params, 3.0), state, params)
        return optax.apply_updates(params, updates), state, jstab.statistics(state)

    params, state, stats = step(params, tx.init(params))
    norm = stats["clip_by_global_norm/norm"]
    assert float(norm) == float(stats["monitor_gradients/global_norm"])
    assert float(stats["clip_by_global_norm/clipped"]) == 1.0
    host = jax.device_get(stats)
    assert all(np.ndim(v) == 0 for v in host.values())


def test_keys_are_the_rules_names_in_chain_order():
    tx = optax.chain(
        jstab.clip_by_value(0.5), jstab.clip_by_global_norm(1.0), optax.sgd(0.1)
    )
    g = {"w": jnp.array([3.0, -4.0])}
    _, state = tx.update(g, tx.init(g))
    stats = jstab.statistics(state)
    assert list(stats) == [
        "clip_by_value/norm",
        "clip_by_value/clipped",
        "clip_by_value/clip_count",
        "clip_by_global_norm/norm",
        "clip_by_global_norm/clipped",
        "clip_by_global_norm/clip_count",
    ]
    assert float(stats["clip_by_value/norm"]) == 4.0  # the largest |g|
    np.testing.assert_allclose(stats["clip_by_global_norm/norm"], np.sqrt(0.5))


def test_nnx_optimizer_state():
    tx = optax.chain(jstab.monitor_gradients(), jstab.zclip(), optax.adam(1e-3))
    _, optimizer, step = nnx_training(tx)
    stats = step()
    layers = ["head/bias", "head/kernel", "layers/0/bias", "layers/0/kernel"]
    assert sorted(k for k in stats if "layer_norms" in k) == [
        f"monitor_gradients/layer_norms/{name}" for name in layers
    ]
    assert all(isinstance(v, jax.Array) for v in stats.values())
    eager = jstab.statistics(optimizer.opt_state)
    assert all(isinstance(v, jax.Array) for v in eager.values())
    # The monitor combines per-leaf norms: the same norm to within rounding.
    assert float(eager["zclip/norm"]) == pytest.approx(
        float(stats["monitor_gradients/global_norm"]), rel=1e-6
    )
    assert float(eager["zclip/norm"]) == float(stats["zclip/norm"])


def test_no_jstab_state_gives_an_empty_dict():
    params = {"w": jnp.ones(3)}
    assert jstab.statistics(optax.adam(1e-3).init(params)) == {}
    assert jstab.statistics(None) == {}


def test_docstring_example():
    result = doctest.testmod(_statistics, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_reading_the_statistics_adds_no_computation_to_a_step():
    """Without moments, ``statistics`` reads the state: only ``std`` is computed."""
    params, _ = _linen_problem(depth=2)
    tx = optax.chain(
        jstab.monitor_gradients(),
        jstab.clip_by_layer_norm(1.0),
        jstab.zclip(),
        jstab.skip_on_spike(optax.adam(1e-3), z_thresh=3.0),
        jstab.monitor_updates(),
    )
    state = tx.init(params)
    jaxpr = jax.make_jaxpr(jstab.statistics)(state)
    assert {eqn.primitive.name for eqn in jaxpr.eqns} == {"sqrt"}
    assert len(jaxpr.eqns) == 2  # zclip's and the skip's std
    # The moments' norms are computed: reductions over Adam's mu and nu.
    moments = jax.make_jaxpr(lambda s: jstab.statistics(s, moments=True))(state)
    assert len(moments.eqns) > len(jaxpr.eqns)
