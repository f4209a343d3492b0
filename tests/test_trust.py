"""Misuse is named, wrappers take any Optax-like transformation, states go by name."""

import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jstab


def _params():
    return {
        "Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
        "Dense_1": {"kernel": jnp.ones((2, 1))},
    }


PER_LEAF = {
    "clip_by_layer_norm": lambda: jstab.clip_by_layer_norm(1.0),
    "clip_by_layer_norm module": lambda: jstab.clip_by_layer_norm(1.0, per="module"),
    "adaptive_grad_clip": lambda: jstab.adaptive_grad_clip(0.1),
    "clip_by_block_rms": lambda: jstab.clip_by_block_rms(1.0),
    "adagc": lambda: jstab.adagc(),
    "scale_by_spam": lambda: jstab.scale_by_spam(),
    "monitor_gradients": lambda: jstab.monitor_gradients(),
    "monitor_updates": lambda: jstab.monitor_updates(),
}


@pytest.mark.parametrize("name", list(PER_LEAF))
def test_a_gradient_tree_other_than_inits_is_an_error_at_trace_time(name):
    tx = PER_LEAF[name]()
    state = tx.init(_params())
    other = _params()
    other["Dense_2"] = {"kernel": jnp.ones((1, 1))}
    with pytest.raises(ValueError, match=r"another tree.*unexpected: \['Dense_2'\]"):
        jax.jit(tx.update)(other, state, other)
    fewer = _params()
    del fewer["Dense_1"]
    with pytest.raises(ValueError, match=r"missing: \['Dense_1'\]"):
        jax.jit(tx.update)(fewer, state, fewer)


@pytest.mark.parametrize(
    "build", [lambda: jstab.adaptive_grad_clip(0.1), jstab.monitor_updates]
)
def test_the_rules_that_read_params_check_them_against_the_updates(build):
    tx = build()
    state = tx.init(_params())
    params = _params()
    params["Dense_1"]["kernel"] = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"\['Dense_1'\]\['kernel'\] has shape"):
        jax.jit(tx.update)(_params(), state, params)
    del params["Dense_1"]
    with pytest.raises(
        ValueError, match=r"`params` passed to update .* \(missing: \['Dense_1'\]"
    ):
        jax.jit(tx.update)(_params(), state, params)
    with pytest.raises(ValueError, match="needs the parameters"):
        jax.jit(tx.update)(_params(), state)


def test_the_same_tree_passes_in_a_chain_under_jit():
    tx = optax.chain(jstab.monitor_gradients(), jstab.clip_by_layer_norm(1.0))
    state = tx.init(_params())
    _, state = jax.jit(tx.update)(_params(), state)
    _, state = jax.jit(tx.update)(_params(), state)


# ----------------------------------------------------------------- wrappers


def test_skip_on_spike_takes_multisteps_and_drops_a_nan_micro_batch():
    # SGD with rate 1 over 3 accumulated micro-batches: the update is minus
    # the mean of the 3 accepted ones; the NaN one in between is dropped.
    tx = jstab.skip_on_spike(optax.MultiSteps(optax.sgd(1.0), every_k_schedule=3))
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    stream = [[1.0, 2.0], [np.nan, 0.0], [3.0, 4.0], [5.0, 0.0], [1.0, 1.0]]
    step = jax.jit(tx.update)
    outs = []
    for g in stream:
        out, state = step({"w": jnp.asarray(g)}, state, params)
        outs.append(np.asarray(out["w"]))
    np.testing.assert_array_equal(outs[0], [0.0, 0.0])
    np.testing.assert_array_equal(outs[1], [0.0, 0.0])  # skipped
    np.testing.assert_array_equal(outs[2], [0.0, 0.0])  # 2 of 3 accumulated
    np.testing.assert_allclose(outs[3], [-3.0, -2.0])  # mean of 1, 3, 5 / 2, 4, 0
    np.testing.assert_array_equal(outs[4], [0.0, 0.0])  # accumulation restarts
    assert int(state.skip_count) == 1
    assert int(optax.tree.get(state, "mini_step")) == 1


def test_the_other_order_jams_after_a_nan_micro_batch():
    # What the docstring warns of: Optax resets its accumulator by * 0.
    tx = optax.MultiSteps(jstab.skip_on_spike(optax.sgd(1.0)), every_k_schedule=2)
    params = {"w": jnp.zeros(1)}
    state = tx.init(params)
    stream = [[np.nan], [1.0]] + [[1.0]] * 6
    outs = []
    for g in stream:
        out, state = jax.jit(tx.update)({"w": jnp.asarray(g)}, state, params)
        outs.append(float(out["w"][0]))
    assert all(o == 0.0 for o in outs)  # never an update again


def test_skip_on_spike_takes_any_optax_like_transformation():
    params = {"w": jnp.zeros(2)}
    g = {"w": jnp.array([1.0, 2.0])}
    extra = optax.with_extra_args_support(optax.sgd(1.0))

    class Custom(typing.NamedTuple):
        init: typing.Callable
        update: typing.Callable

    plain = optax.sgd(1.0)
    for inner in (extra, Custom(plain.init, plain.update)):
        tx = jstab.skip_on_spike(inner)
        out, _ = tx.update(g, tx.init(params), params)
        np.testing.assert_array_equal(out["w"], [-1.0, -2.0])
    for bad in (optax.sgd, 3, "adam"):
        with pytest.raises(TypeError, match="gradient_transformation"):
            jstab.skip_on_spike(bad)


# -------------------------------------------------------------------- states

FIELDS = {
    jstab.ClipState: ("norm", "clipped", "clip_count", "count"),
    jstab.AutoClipState: (
        "norm",
        "clipped",
        "clip_count",
        "count",
        "threshold",
        "history",
        "filled",
        "position",
    ),
    jstab.ZClipState: (
        "norm",
        "clipped",
        "clip_count",
        "count",
        "threshold",
        "applied_threshold",
        "spike",
        "mean",
        "var",
        "samples",
    ),
    jstab.SkipState: (
        "inner_state",
        "skipped",
        "skip_count",
        "count",
        "norm",
        "mean",
        "var",
        "samples",
        "loss",
        "loss_mean",
        "loss_var",
        "history",
        "loss_history",
        "consecutive",
        "forced_count",
    ),
    jstab.DynamicLossScaleState: (
        "inner_state",
        "scale",
        "good_steps",
        "skipped",
        "skip_count",
    ),
    jstab.UpcastState: ("inner_state",),
    jstab.AdaGCState: ("norm", "clipped", "clip_count", "count", "gamma"),
    jstab.ScaleBySpamState: ("count", "mu", "nu", "spikes", "reset_count"),
    jstab.MonitorState: (
        "layer_norms",
        "global_norm",
        "nonfinite",
        "vanishing",
        "exploding",
    ),
    jstab.MonitorUpdatesState: (
        "update_norms",
        "param_norms",
        "update_ratio",
        "global_update_norm",
        "global_param_norm",
    ),
}
# Each rule's own state class: a ClipState with its fields.
for _rule_state in (
    jstab.ClipByValueState,
    jstab.ClipByRangeState,
    jstab.ClipByGlobalNormState,
    jstab.ClipByLayerNormState,
    jstab.ClipByBlockRmsState,
    jstab.AdaptiveGradClipState,
):
    FIELDS[_rule_state] = FIELDS[jstab.ClipState]


@pytest.mark.parametrize("cls", list(FIELDS), ids=lambda c: c.__name__)
def test_state_field_names(cls):
    assert cls._fields == FIELDS[cls]


@pytest.mark.parametrize(
    "build, cls",
    [
        (lambda: jstab.clip_by_value(1.0), jstab.ClipByValueState),
        (lambda: jstab.clip_by_range(-1.0, 1.0), jstab.ClipByRangeState),
        (lambda: jstab.clip_by_global_norm(1.0), jstab.ClipByGlobalNormState),
        (lambda: jstab.clip_by_layer_norm(1.0), jstab.ClipByLayerNormState),
        (lambda: jstab.adaptive_grad_clip(0.1), jstab.AdaptiveGradClipState),
        (lambda: jstab.clip_by_block_rms(1.0), jstab.ClipByBlockRmsState),
    ],
)
def test_each_clipping_rule_keeps_its_own_state_class(build, cls):
    """So that ``statistics`` names each rule's keys after the rule."""
    tx, params = build(), _params()
    state = tx.init(params)
    _, new = jax.jit(tx.update)(params, state, params)
    assert type(state) is type(new) is cls
    assert isinstance(new, jstab.ClipState)


@pytest.mark.parametrize(
    "build",
    [lambda: jstab.autoclip(history=3), lambda: jstab.zclip(warmup_steps=1)],
    ids=["autoclip", "zclip"],
)
def test_adaptive_states_are_written_by_name(build):
    # Each field keeps its own dtype and shape after steps: nothing shifted.
    tx = build()
    state = tx.init(_params())
    before = {k: (v.dtype, v.shape) for k, v in state._asdict().items()}
    for scale in (1.0, 2.0, 50.0):
        g = jax.tree.map(lambda x, s=scale: x * s, _params())
        _, state = jax.jit(tx.update)(g, state)
    after = {k: (v.dtype, v.shape) for k, v in state._asdict().items()}
    assert after == before
    assert float(state.norm) == pytest.approx(50 * np.sqrt(8), rel=1e-6)
    assert int(state.count) == 3


def test_monitor_gradients_under_x64():
    with jax.enable_x64(True):
        tx = jstab.monitor_gradients()
        g = {"w": jnp.array([[1.0, np.nan]]), "b": jnp.ones(2, jnp.float32)}
        _, state = jax.jit(tx.update)(g, tx.init(g))
        assert int(state.nonfinite) == 1 and state.nonfinite.dtype == jnp.int32
        assert bool(state.exploding)
