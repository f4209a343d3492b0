"""jstab.statistics: stable keys, prefixes, numbering and Optax's moment norms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _models import nnx_training
from flax import nnx

import jstab

enable_x64 = getattr(jax, "enable_x64", None)
if enable_x64 is None:  # JAX before 0.8
    from jax.experimental import enable_x64


def _params():
    return {
        "Dense_0": {"kernel": jnp.ones((64, 64)), "bias": jnp.zeros(64)},
        "Dense_1": {"kernel": jnp.ones((64, 63)), "bias": jnp.zeros(63)},
    }


# A gradient stream that does not depend on the params: a rule sees the
# same input in two chains exactly when what runs before it does the same.
# Every element is at most 0.05 * 8 = 0.4 in magnitude, under the 0.5 of
# clip_by_value; the global norm is about 2.6, 21 at the spike (step 3).
SCALES = (1.0, 1.2, 0.8, 8.0, 1.0, 1.1)


def _base_grads():
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda x: jnp.asarray(rng.uniform(-0.05, 0.05, x.shape), jnp.float32),
        _params(),
    )


def _norm64(tree):
    leaves = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
    return np.linalg.norm(np.concatenate(leaves)) if leaves else 0.0


def _run(tx, scales=SCALES, moments=False):
    """The statistics after each step of ``tx`` on the stream, in their order."""
    params, g = _params(), _base_grads()

    @jax.jit
    def step(state, scale):
        grads = jax.tree.map(lambda x: x * scale, g)
        return tx.update(grads, state, params)[1]

    state, out = tx.init(params), []
    for scale in scales:
        state = step(state, jnp.float32(scale))
        # Outside jit: a dict returned from jit comes back in sorted order.
        out.append(jstab.statistics(state, moments=moments))
    return out


def _assert_same(want, got, keys):
    """Counts and flags equal; norms to rounding: fused with another rule
    before it (JSTAB_TEST_XLA_OPT=1), XLA may sum the squares in another order.
    """
    for key in keys:
        assert got[key].dtype == want[key].dtype, key
        if jnp.issubdtype(want[key].dtype, jnp.floating):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _clip():
    return jstab.clip_by_global_norm(10.0)


def _zclip():
    return jstab.zclip(warmup_steps=2)


def _adam():
    return optax.adam(1e-3)


@pytest.fixture(scope="module")
def base():
    return _run(optax.chain(_clip(), _zclip(), _adam()), moments=True)


def _owned_by(keys, rules):
    return [k for k in keys if k.split("/")[0] in rules]


def test_the_base_chain_clips_and_spikes(base):
    # The premise of the comparisons below: both rules act on the stream.
    assert list(base[0]) == (
        ["clip_by_global_norm/norm", "clip_by_global_norm/clipped"]
        + ["clip_by_global_norm/clip_count"]
        + ["zclip/norm", "zclip/clipped", "zclip/clip_count", "zclip/threshold"]
        + ["zclip/spike", "zclip/mean", "zclip/std"]
        + ["adam/mu_norm", "adam/nu_norm"]
    )
    last = base[-1]
    assert int(last["clip_by_global_norm/clip_count"]) == 1  # the spike only
    assert int(last["zclip/clip_count"]) >= 1
    norms = [float(s["clip_by_global_norm/norm"]) for s in base]
    want = [_norm64(_base_grads()) * s for s in SCALES]
    np.testing.assert_allclose(norms, want, rtol=1e-6)


def test_a_rule_added_in_front_renames_nothing(base):
    variant = _run(
        optax.chain(jstab.clip_by_value(0.5), _clip(), _zclip(), _adam()),
        moments=True,
    )
    assert all(float(s["clip_by_value/clipped"]) == 0 for s in variant)  # no-op
    for want, got in zip(base, variant, strict=True):
        assert list(got)[:3] == ["clip_by_value/norm", "clip_by_value/clipped"] + [
            "clip_by_value/clip_count"
        ]
        assert list(got)[3:] == list(want)
        _assert_same(want, got, want)


def test_a_rule_removed_renames_nothing(base):
    variant = _run(optax.chain(_clip(), _adam()), moments=True)
    for want, got in zip(base, variant, strict=True):
        kept = _owned_by(want, ("clip_by_global_norm", "adam"))
        assert list(got) == kept
        _assert_same(want, got, _owned_by(want, ("clip_by_global_norm",)))


def test_rules_reordered_keep_their_keys_and_their_own_values(base):
    variant = _run(optax.chain(_zclip(), _clip(), _adam()), moments=True)
    raw = [_norm64(_base_grads()) * s for s in SCALES]
    for want, got, norm in zip(base, variant, raw, strict=True):
        assert set(got) == set(want)
        assert list(got)[:7] == _owned_by(want, ("zclip",))
        # zclip is first now: it measures the raw gradient.
        np.testing.assert_allclose(float(got["zclip/norm"]), norm, rtol=1e-6)
    # At the spike zclip clips first, so clip_by_global_norm (at 10) sees
    # less than the raw norm, and less than 10: in the base chain it clipped.
    spike = variant[3]
    assert bool(spike["zclip/spike"]) and float(spike["zclip/clipped"]) == 1.0
    assert float(spike["clip_by_global_norm/norm"]) < 10.0 < raw[3]
    assert float(spike["clip_by_global_norm/clipped"]) == 0.0
    assert float(base[3]["clip_by_global_norm/clipped"]) == 1.0


def test_monitors_added_rename_nothing(base):
    variant = _run(
        optax.chain(
            jstab.monitor_gradients(),
            _clip(),
            _zclip(),
            _adam(),
            jstab.monitor_updates(),
        ),
        moments=True,
    )
    for want, got in zip(base, variant, strict=True):
        assert [k for k in got if not k.startswith("monitor_")] == list(want)
        _assert_same(want, got, want)
        np.testing.assert_allclose(
            got["monitor_gradients/global_norm"],
            got["clip_by_global_norm/norm"],
            rtol=1e-6,
        )
        assert "monitor_updates/update_ratio/Dense_1/kernel" in got


def test_moments_add_keys_and_change_none(base):
    plain = _run(optax.chain(_clip(), _zclip(), _adam()))
    for want, got in zip(base, plain, strict=True):
        assert list(got) == [k for k in want if not k.startswith("adam/")]
        _assert_same(want, got, got)


# ----------------------------------------------------------------- numbering


def _one_step(tx, grads, moments=False):
    params = jax.tree.map(jnp.zeros_like, grads)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    return jstab.statistics(state, moments=moments)


_G = {"a": jnp.full((3,), 2.0), "b": jnp.full((2, 2), -3.0)}  # norm sqrt(48)


def test_two_rules_of_one_name_are_numbered_in_chain_order():
    tx = optax.chain(
        jstab.clip_by_global_norm(5.0),
        jstab.clip_by_global_norm(2.0),
        jstab.clip_by_global_norm(1.0),
        optax.sgd(0.1),
    )
    stats = _one_step(tx, _G)
    assert list(stats) == [
        f"{rule}/{field}"
        for rule in ("clip_by_global_norm", "clip_by_global_norm_1")
        + ("clip_by_global_norm_2",)
        for field in ("norm", "clipped", "clip_count")
    ]
    np.testing.assert_allclose(stats["clip_by_global_norm/norm"], np.sqrt(48), 1e-6)
    np.testing.assert_allclose(stats["clip_by_global_norm_1/norm"], 5.0, 1e-6)
    np.testing.assert_allclose(stats["clip_by_global_norm_2/norm"], 2.0, 1e-6)


def test_a_rule_inside_a_wrapper_is_numbered_after_the_one_before_it():
    inner = optax.chain(jstab.clip_by_global_norm(2.0), optax.sgd(0.1))
    tx = optax.chain(jstab.clip_by_global_norm(5.0), jstab.skip_on_spike(inner))
    stats = _one_step(tx, _G)
    assert list(stats) == (
        ["clip_by_global_norm/norm", "clip_by_global_norm/clipped"]
        + ["clip_by_global_norm/clip_count"]
        + ["skip_on_spike/skipped", "skip_on_spike/skip_count", "skip_on_spike/norm"]
        + ["skip_on_spike/mean", "skip_on_spike/std"]
        + ["clip_by_global_norm_1/norm", "clip_by_global_norm_1/clipped"]
        + ["clip_by_global_norm_1/clip_count"]
    )
    np.testing.assert_allclose(stats["clip_by_global_norm/norm"], np.sqrt(48), 1e-6)
    np.testing.assert_allclose(stats["skip_on_spike/norm"], 5.0, 1e-6)
    np.testing.assert_allclose(stats["clip_by_global_norm_1/norm"], 5.0, 1e-6)


# ------------------------------------------------------------------ prefixes


def test_named_chain_names_prefix_the_keys():
    tx = optax.named_chain(
        ("clip", jstab.clip_by_global_norm(1.0)), ("opt", optax.adam(1e-3))
    )
    stats = _one_step(tx, _G, moments=True)
    assert list(stats) == [
        "clip/clip_by_global_norm/norm",
        "clip/clip_by_global_norm/clipped",
        "clip/clip_by_global_norm/clip_count",
        "opt/adam/mu_norm",
        "opt/adam/nu_norm",
    ]
    np.testing.assert_allclose(
        stats["clip/clip_by_global_norm/norm"], np.sqrt(48), rtol=1e-6
    )


def test_one_name_under_two_prefixes_is_not_numbered():
    tx = optax.named_chain(
        ("first", jstab.clip_by_global_norm(5.0)),
        ("second", optax.chain(jstab.clip_by_global_norm(2.0), optax.sgd(0.1))),
    )
    stats = _one_step(tx, _G)
    assert list(stats) == [
        f"{name}/clip_by_global_norm/{field}"
        for name in ("first", "second")
        for field in ("norm", "clipped", "clip_count")
    ]
    np.testing.assert_allclose(
        stats["first/clip_by_global_norm/norm"], np.sqrt(48), rtol=1e-6
    )
    np.testing.assert_allclose(stats["second/clip_by_global_norm/norm"], 5.0, 1e-6)


def test_multi_transform_labels_prefix_the_keys():
    tx = optax.multi_transform(
        {
            "x": jstab.clip_by_global_norm(1.0),
            "y": optax.chain(
                jstab.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9)
            ),
        },
        {"a": "x", "b": "y"},
    )
    stats = _one_step(tx, _G, moments=True)
    assert list(stats) == [
        f"{label}/clip_by_global_norm/{field}"
        for label in ("x", "y")
        for field in ("norm", "clipped", "clip_count")
    ] + ["y/trace/trace_norm"]
    # Each sees only the leaves of its label.
    np.testing.assert_allclose(stats["x/clip_by_global_norm/norm"], np.sqrt(12), 1e-6)
    np.testing.assert_allclose(stats["y/clip_by_global_norm/norm"], 6.0, rtol=1e-6)
    np.testing.assert_allclose(stats["y/trace/trace_norm"], 1.0, rtol=1e-6)


def test_wrappers_add_no_prefix():
    def build(learning_rate):
        return optax.chain(jstab.clip_by_global_norm(1.0), optax.adam(learning_rate))

    want = [
        "clip_by_global_norm/norm",
        "clip_by_global_norm/clipped",
        "clip_by_global_norm/clip_count",
        "adam/mu_norm",
        "adam/nu_norm",
    ]
    injected = optax.inject_hyperparams(build)(learning_rate=1e-3)
    multi = optax.MultiSteps(build(1e-3), every_k_schedule=2)
    skip = jstab.skip_on_spike(optax.MultiSteps(build(1e-3), every_k_schedule=2))
    injected_multi = optax.MultiSteps(injected, every_k_schedule=2)
    assert list(_one_step(injected, _G, moments=True)) == want
    assert list(_one_step(multi, _G, moments=True)) == want
    assert list(_one_step(injected_multi, _G, moments=True)) == want
    skip_keys = ["skip_on_spike/skipped", "skip_on_spike/skip_count"]
    skip_keys += ["skip_on_spike/norm", "skip_on_spike/mean", "skip_on_spike/std"]
    assert list(_one_step(skip, _G, moments=True)) == skip_keys + want


# ------------------------------------------------------------------- moments


def _f64_norm(tree):
    """optax.tree.norm of ``tree``'s arrays, computed in float64."""

    def to64(x):
        x = x[...] if isinstance(x, nnx.Variable) else x
        return jnp.asarray(np.asarray(x), jnp.float64)

    with enable_x64(True):
        tree = jax.tree.map(to64, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
        return float(optax.tree.norm(tree))


def _moment_tree(state, kind, field):
    found = optax.tree.get_all_with_path(
        state, field, filtering=lambda path, _: path[-1].tuple_name == kind
    )
    assert len(found) == 1, (kind, field, found)
    return found[0][1]


def _moment_params():
    rng = np.random.default_rng(1)
    return {
        "big": jnp.asarray(rng.normal(size=(128, 130)), jnp.float32),
        "small": jnp.asarray(rng.normal(size=(7,)) * 1e-3, jnp.float32),
        "bias": jnp.zeros((130,), jnp.float32),
    }


MOMENTS = {
    "adam": (lambda: optax.adam(1e-2), "ScaleByAdamState", ("mu", "nu")),
    "trace": (
        lambda: optax.sgd(1e-2, momentum=0.9),
        "TraceState",
        ("trace",),
    ),
    "lion": (lambda: optax.lion(1e-3), "ScaleByLionState", ("mu",)),
    "amsgrad": (
        lambda: optax.amsgrad(1e-2),
        "ScaleByAmsgradState",
        ("mu", "nu", "nu_max"),
    ),
    "rms": (lambda: optax.rmsprop(1e-2), "ScaleByRmsState", ("nu",)),
    "rss": (lambda: optax.adagrad(1e-2), "ScaleByRssState", ("sum_of_squares",)),
    "factored_rms": (
        lambda: optax.adafactor(1e-2),
        "FactoredState",
        ("v_row", "v_col", "v"),
    ),
}


def _moment_state(tx, steps=3):
    params = _moment_params()
    rng = np.random.default_rng(2)
    step = jax.jit(tx.update)
    state = tx.init(params)
    for k in range(steps):
        grads = jax.tree.map(
            lambda x, k=k: jnp.asarray(rng.normal(size=x.shape) * (k + 1), jnp.float32),
            params,
        )
        grads["small"] = grads["small"] * 1e-4
        _, state = step(grads, state, params)
    return state


@pytest.mark.parametrize("rule", list(MOMENTS))
def test_moment_norms_equal_float64(rule):
    make, kind, fields = MOMENTS[rule]
    state = _moment_state(make())
    stats = jstab.statistics(state, moments=True)
    assert list(stats) == [f"{rule}/{field}_norm" for field in fields]
    for field in fields:
        got = stats[f"{rule}/{field}_norm"]
        assert got.shape == () and got.dtype == jnp.float32
        want = _f64_norm(_moment_tree(state, kind, field))
        assert want > 0, field  # a moment the optimizer filled
        np.testing.assert_allclose(float(got), want, rtol=1e-6)
    assert jstab.statistics(state) == {}  # moments=False: none


def test_no_moment_keys_by_default():
    tx = optax.chain(jstab.clip_by_global_norm(1.0), optax.adam(1e-3))
    stats = _one_step(tx, _G)
    assert list(stats) == [
        "clip_by_global_norm/norm",
        "clip_by_global_norm/clipped",
        "clip_by_global_norm/clip_count",
    ]
    assert not any(k.endswith("_norm") for k in stats)


def test_half_precision_moments_have_float32_norms():
    # 100 elements of 300: the sum of squares overflows float16.
    tx = optax.sgd(1e-3, momentum=0.9)
    params = {"w": jnp.ones((10, 10), jnp.float16)}
    _, state = tx.update({"w": jnp.full((10, 10), 300.0, jnp.float16)}, tx.init(params))
    (norm,) = jstab.statistics(state, moments=True).values()
    assert norm.dtype == jnp.float32
    np.testing.assert_allclose(norm, 3000.0, rtol=1e-6)


def test_moments_in_an_nnx_optimizer():
    tx = optax.chain(jstab.clip_by_global_norm(1.0), optax.adam(1e-2))
    _, optimizer, step = nnx_training(tx, moments=True)
    step()
    stats = step()
    assert sorted(stats) == sorted(
        ["clip_by_global_norm/norm", "clip_by_global_norm/clipped"]
        + ["clip_by_global_norm/clip_count", "adam/mu_norm", "adam/nu_norm"]
    )
    eager = jstab.statistics(optimizer.opt_state, moments=True)
    for field in ("mu", "nu"):
        want = _f64_norm(_moment_tree(optimizer.opt_state, "ScaleByAdamState", field))
        assert want > 0
        assert stats[f"adam/{field}_norm"].dtype == jnp.float32
        np.testing.assert_allclose(float(stats[f"adam/{field}_norm"]), want, 1e-6)
        np.testing.assert_allclose(float(eager[f"adam/{field}_norm"]), want, 1e-6)


def test_under_jit_equals_eager():
    tx = optax.chain(
        jstab.monitor_gradients(),
        jstab.clip_by_global_norm(1.0),
        optax.named_chain(("opt", optax.adam(1e-2))),
        optax.sgd(1e-2, momentum=0.9),
        jstab.monitor_updates(),
    )
    state = _moment_state(tx)
    for moments in (False, True):
        want = jstab.statistics(state, moments=moments)
        got = jax.jit(lambda s, m=moments: jstab.statistics(s, moments=m))(state)
        assert set(got) == set(want)
        assert any(k.endswith("mu_norm") for k in want) == moments
        for key, value in want.items():
            assert got[key].dtype == value.dtype, key
            np.testing.assert_array_equal(got[key], value, err_msg=key)
