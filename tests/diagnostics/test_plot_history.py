"""plot_history draws a logged history of jstab.statistics, one panel per rule."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("matplotlib")

from _figures import PNG_SIGNATURE, legend_texts, png  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import jstab  # noqa: E402
from jstab import plots  # noqa: E402
from jstab.plots import plot_history  # noqa: E402


def panels(fig: Figure) -> dict[str, list[str]]:
    """``{title: labels of its data lines}``, in panel order."""
    return {
        ax.get_title(): [
            line.get_label() for line in ax.get_lines() if line.get_marker() != "x"
        ]
        for ax in fig.axes
    }


def line(fig: Figure, title: str, label: str):
    (ax,) = [ax for ax in fig.axes if ax.get_title() == title]
    (found,) = [line for line in ax.get_lines() if line.get_label() == label]
    return found


def clip_marks(ax):
    marks = [line for line in ax.get_lines() if line.get_marker() == "x"]
    assert len(marks) <= 1
    return marks[0] if marks else None


def skip_lines(ax) -> np.ndarray:
    """The x values of the vertical lines of skipped steps in ``ax``."""
    (lines,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert lines.get_transform() == ax.get_xaxis_transform()  # full height
    return np.array([segment[0, 0] for segment in lines.get_segments()])


# Five steps of a chain of named clips, zclip and Adam, plus the user's loss.
NORM = [1.0, 2.0, 40.0, 3.0, 50.0]
STEPS = [
    {
        "clip/clip_by_global_norm/norm": NORM[i],
        "clip/clip_by_global_norm/clipped": [0.0, 0.0, 0.5, 0.0, 1.0][i],
        "clip/clip_by_global_norm/clip_count": [0, 0, 1, 1, 2][i],
        "clip_by_global_norm_1/norm": 1.0,
        "clip_by_global_norm_1/clipped": 0.0,
        "zclip/norm": NORM[i],
        "zclip/threshold": [np.inf, np.inf, 10.0, 11.0, 12.0][i],
        "zclip/mean": 2.0,
        "zclip/spike": [False, False, True, False, True][i],
        "adam/mu_norm": 0.1 * (i + 1),
        "loss": [1.0, 0.5, -0.25, 0.0, 0.125][i],
    }
    for i in range(5)
]


def test_both_shapes_of_a_history_draw_the_same_lines():
    as_jax = [{k: jnp.asarray(v) for k, v in s.items()} for s in STEPS]
    stacked = jax.tree.map(lambda *v: jnp.stack(v), *as_jax)
    stacked = {k: stacked[k] for k in STEPS[0]}  # tree.map sorts the keys
    as_lists = {k: [s[k] for s in STEPS] for k in STEPS[0]}
    figures = [plot_history(h) for h in (STEPS, as_jax, stacked, as_lists)]
    expected = panels(figures[0])
    assert png(figures[2]).startswith(PNG_SIGNATURE)
    for fig in figures:
        assert panels(fig) == expected
        for ax, first in zip(fig.axes, figures[0].axes, strict=True):
            assert legend_texts(ax) == legend_texts(first)
            for got, want in zip(ax.get_lines(), first.get_lines(), strict=True):
                np.testing.assert_array_equal(got.get_xdata(), want.get_xdata())
                np.testing.assert_allclose(got.get_ydata(), want.get_ydata())
    np.testing.assert_array_equal(line(figures[2], "zclip", "norm").get_ydata(), NORM)


def test_keys_share_a_panel_per_rule_in_the_order_they_appear():
    fig = plot_history(STEPS)
    # The user's own keys first, then the rules' in the order they appear.
    assert [ax.get_title() for ax in fig.axes] == [
        "loss",
        "clip/clip_by_global_norm",
        "clip_by_global_norm_1",
        "zclip",
        "adam",
    ]
    assert panels(fig) == {
        "clip/clip_by_global_norm": ["norm"],
        "clip_by_global_norm_1": ["norm"],
        "zclip": ["norm", "threshold", "mean"],
        "adam": ["mu_norm"],
        "loss": ["loss"],
    }
    assert line(fig, "zclip", "threshold").get_linestyle() == "--"
    mean, norm = line(fig, "zclip", "mean"), line(fig, "zclip", "norm")
    assert mean.get_linewidth() < norm.get_linewidth()
    assert norm.get_linestyle() == "-"
    assert [ax.get_xlabel() for ax in fig.axes] == ["", "", "", "", "step"]
    assert fig.get_size_inches()[1] > plot_history(STEPS, ["loss"]).get_size_inches()[1]


LAYERED = {
    "monitor_gradients/global_norm": [1.0, 2.0],
    "monitor_gradients/nonfinite": [False, False],
    "monitor_gradients/vanishing": [False, True],
    "monitor_gradients/exploding": [False, False],
    "monitor_gradients/layer_norms/Dense_0/kernel": [0.5, 0.25],
    "monitor_gradients/layer_norms/Dense_0/bias": [0.1, 0.2],
    "clip_by_layer_norm/norm/w": [3.0, 4.0],
    "clip_by_layer_norm/clipped": [1.0, 0.0],
    "clip_by_layer_norm/clip_count": [1, 1],
    "monitor_updates/global_update_norm": [0.01, 0.02],
    "monitor_updates/update_ratio/Dense_0/kernel": [1e-3, 2e-3],
    "skip_on_spike/skipped": [False, False],
    "skip_on_spike/skip_count": [0, 0],
    "skip_on_spike/norm": [1.0, 2.0],
    "accuracy": [0.5, 0.75],
}


def test_by_default_per_layer_keys_and_markers_are_left_out():
    fig = plot_history(LAYERED)
    assert panels(fig) == {
        "monitor_gradients": ["global_norm"],
        # A rule with only per-layer norms and markers draws its norms.
        "clip_by_layer_norm/norm": ["w"],
        "monitor_updates": ["global_update_norm"],
        "skip_on_spike": ["norm"],
        "accuracy": ["accuracy"],
    }
    only_markers = plot_history({"zclip/clipped": [0.0, 1.0], "step": [5, 6]})
    assert panels(only_markers) == {"zclip": ["clipped"]}  # rather than nothing


def test_keys_draw_exactly_those_per_layer_ones_one_line_per_layer():
    keys = [
        "monitor_gradients/layer_norms/Dense_0/kernel",
        "clip_by_layer_norm/norm/w",
        "monitor_gradients/layer_norms/Dense_0/bias",
        "monitor_gradients/vanishing",
        "monitor_updates/update_ratio/Dense_0/kernel",
    ]
    fig = plot_history(LAYERED, keys)
    assert panels(fig) == {
        "monitor_gradients/layer_norms": ["Dense_0/kernel", "Dense_0/bias"],
        "clip_by_layer_norm/norm": ["w"],
        "monitor_gradients": ["vanishing"],
        "monitor_updates/update_ratio": ["Dense_0/kernel"],
    }
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "log", "linear", "log"]
    np.testing.assert_array_equal(
        line(fig, "monitor_gradients", "vanishing").get_ydata(), [0.0, 1.0]
    )
    assert panels(plot_history(LAYERED, "accuracy")) == {"accuracy": ["accuracy"]}


def test_clipped_steps_are_marked_on_the_norm_of_their_rule():
    fig = plot_history(STEPS)
    axes = {ax.get_title(): ax for ax in fig.axes}
    marks = clip_marks(axes["clip/clip_by_global_norm"])
    np.testing.assert_array_equal(marks.get_xdata(), [2, 4])
    np.testing.assert_array_equal(marks.get_ydata(), [40.0, 50.0])
    assert "clipped (2)" in legend_texts(axes["clip/clip_by_global_norm"])
    for title in ("clip_by_global_norm_1", "zclip", "adam", "loss"):
        assert clip_marks(axes[title]) is None  # never clipped, or no `clipped`
        assert not any(t.startswith("clipped") for t in legend_texts(axes[title]))
    # The marker keys are used though not drawn; a monitor's global_norm too.
    history = {
        "watch/global_norm": [5.0, 6.0, 7.0],
        "watch/clipped": [np.nan, 0.25, 0.0],
    }
    (ax,) = plot_history(history, ["watch/global_norm"]).axes
    np.testing.assert_array_equal(clip_marks(ax).get_xdata(), [1])
    np.testing.assert_array_equal(clip_marks(ax).get_ydata(), [6.0])
    assert legend_texts(ax) == ["global_norm", "clipped (1)"]


def test_skipped_steps_are_red_lines_in_every_panel():
    history = [
        {
            "skip_on_spike/skipped": i in (3, 7),
            "skip_on_spike_1/skipped": jnp.asarray(i in (7, 9)),
            "skip_on_spike/norm": float(i + 1),
            "loss": 1.0 / (i + 1),
        }
        for i in range(10)
    ]
    fig = plot_history(history, steps=np.arange(10) * 10)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "skip_on_spike"]
    for ax in fig.axes:
        np.testing.assert_array_equal(skip_lines(ax), [30, 70, 90])
    assert legend_texts(fig.axes[0]) == ["loss", "skipped (3)"]
    assert legend_texts(fig.axes[1]) == ["norm"]  # once, in the first panel
    never = plot_history([{"skip_on_spike/skipped": False, "loss": 1.0}])
    assert not never.axes[0].collections


def test_norm_panels_are_logarithmic_masking_what_they_cannot_draw():
    fig = plot_history(STEPS)
    scales = {ax.get_title(): ax.get_yscale() for ax in fig.axes}
    assert scales == {
        "clip/clip_by_global_norm": "log",
        "clip_by_global_norm_1": "log",
        "zclip": "log",
        "adam": "log",
        "loss": "linear",
    }
    threshold = line(fig, "zclip", "threshold").get_ydata()
    np.testing.assert_array_equal(threshold, [np.nan, np.nan, 10.0, 11.0, 12.0])
    loss = line(fig, "loss", "loss").get_ydata()
    np.testing.assert_array_equal(loss, [1.0, 0.5, -0.25, 0.0, 0.125])
    history = {"a/std": [0.0, -1.0, np.nan, 2.0], "b/gain": [0.0, -1.0, np.inf, 2.0]}
    fig = plot_history(history)
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "linear"]
    np.testing.assert_array_equal(
        line(fig, "a", "std").get_ydata(), [np.nan, np.nan, np.nan, 2.0]
    )
    np.testing.assert_array_equal(
        line(fig, "b", "gain").get_ydata(), [0.0, -1.0, np.nan, 2.0]
    )
    nothing = plot_history({"a/norm": [0.0, np.nan]})
    assert png(nothing).startswith(PNG_SIGNATURE)


def test_steps_or_a_step_key_give_the_x_values():
    history = [{"step": 100 * (i + 1), "loss": 1.0 / (i + 1)} for i in range(4)]
    fig = plot_history(history)
    assert panels(fig) == {"loss": ["loss"]}  # `step` is not drawn
    np.testing.assert_array_equal(
        fig.axes[0].get_lines()[0].get_xdata(), [100, 200, 300, 400]
    )
    fig = plot_history(history, steps=jnp.array([1, 2, 3, 4]))
    np.testing.assert_array_equal(fig.axes[0].get_lines()[0].get_xdata(), [1, 2, 3, 4])
    fig = plot_history({"loss": [3.0, 2.0, 1.0]})
    np.testing.assert_array_equal(fig.axes[0].get_lines()[0].get_xdata(), [0, 1, 2])


def test_a_key_missing_at_a_step_is_a_gap():
    history = [
        {"loss": 1.0},
        {"loss": 0.5, "zclip/norm": 2.0},
        {"loss": np.nan, "zclip/norm": 3.0},
        {"loss": 0.25},
    ]
    fig = plot_history(history)
    assert panels(fig) == {"loss": ["loss"], "zclip": ["norm"]}
    np.testing.assert_array_equal(
        line(fig, "zclip", "norm").get_ydata(), [np.nan, 2.0, 3.0, np.nan]
    )
    np.testing.assert_array_equal(
        line(fig, "loss", "loss").get_ydata(), [1.0, 0.5, np.nan, 0.25]
    )
    assert png(fig).startswith(PNG_SIGNATURE)


def test_bad_arguments_raise_naming_them():
    with pytest.raises(TypeError, match=r"`history` must be .*got ndarray"):
        plot_history(np.ones(3))
    with pytest.raises(TypeError, match=r"`history` must be .*got str"):
        plot_history("loss")
    with pytest.raises(ValueError, match="`history` must hold at least one step"):
        plot_history([])
    with pytest.raises(ValueError, match="`history` must hold at least one step"):
        plot_history({})
    with pytest.raises(ValueError, match="`history` must hold at least one step"):
        plot_history({"loss": []})
    with pytest.raises(ValueError, match=r"`history` .*as many.*'a': 2, 'b': 3"):
        plot_history({"a": [1.0, 2.0], "b": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match=r"`history\['a'\]` must be 1-D"):
        plot_history({"a": np.ones((2, 2))})
    with pytest.raises(TypeError, match=r"`history\[1\]` must be a .*got float"):
        plot_history([{"loss": 1.0}, 2.0])
    with pytest.raises(ValueError, match=r"`history\[1\]\['loss'\]` .*scalar.*\(2,\)"):
        plot_history([{"loss": 1.0}, {"loss": jnp.ones(2)}])
    with pytest.raises(TypeError, match=r"`history\[0\]\['loss'\]` .*number.*str"):
        plot_history([{"loss": "high"}])
    with pytest.raises(ValueError, match=r"`keys` must name keys.*got \['lr', 'x'\]"):
        plot_history(STEPS, ["loss", "lr", "x"])
    with pytest.raises(ValueError, match=r"`keys` must name keys.*loss.*got none"):
        plot_history(STEPS, [])
    with pytest.raises(
        ValueError, match=r"`steps` must hold one value per step.*\(5\), got 4"
    ):
        plot_history(STEPS, steps=range(4))
    with pytest.raises(ValueError, match="`history` must hold a key other than `step`"):
        plot_history({"step": [1, 2]})


def test_docstring_example():
    result = doctest.testmod(plots, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


SPIKES = (20, 40)  # the gradient is multiplied by 100: zclip clips it
NAN_STEP = 52  # the gradient is NaN: skip_on_spike skips the step


def test_a_real_run_marks_its_spikes_and_its_skipped_step():
    x = jax.random.normal(jax.random.key(0), (64, 4))
    y = x @ jnp.array([1.0, -2.0, 0.5, 3.0]) + 0.3
    params = {"w": jnp.zeros(4), "b": jnp.zeros(())}
    tx = optax.chain(
        jstab.zclip(warmup_steps=5),
        jstab.skip_on_spike(optax.adam(1e-1), z_thresh=3.0, warmup_steps=5),
    )

    def loss_fn(params):
        return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

    @jax.jit
    def train_step(params, state, scale):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        grads = jax.tree.map(lambda g: g * scale, grads)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return params, state, jstab.statistics(state) | {"loss": loss}

    state = tx.init(params)
    history = []
    for i in range(60):
        scale = 100.0 if i in SPIKES else np.nan if i == NAN_STEP else 1.0
        params, state, stats = train_step(params, state, scale)
        history.append(stats)

    fig = plot_history(history)
    fig.savefig("/tmp/plot_history.png", dpi=100)
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert set(axes) == {"loss", "zclip", "skip_on_spike"}
    assert axes["loss"].get_yscale() == "linear"
    assert axes["zclip"].get_yscale() == axes["skip_on_spike"].get_yscale() == "log"
    assert set(panels(fig)["zclip"]) == {"norm", "threshold", "mean", "std"}
    np.testing.assert_array_equal(clip_marks(axes["zclip"]).get_xdata(), SPIKES)
    assert "clipped (2)" in legend_texts(axes["zclip"])
    for ax in fig.axes:
        np.testing.assert_array_equal(skip_lines(ax), [NAN_STEP])
    assert "skipped (1)" in legend_texts(fig.axes[0])
