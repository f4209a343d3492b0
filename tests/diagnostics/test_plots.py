"""The plots draw reports and training curves without a display or warnings."""

import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from _figures import PNG_SIGNATURE, legend_texts, png  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from jstab import plots  # noqa: E402


def fake_report(grad_norm, activation_std=None, *, vanishing=False, exploding=False):
    grad_norm = np.asarray(grad_norm, dtype=np.float64)
    n = grad_norm.size
    if activation_std is None:
        activation_std = np.ones(n)
    return types.SimpleNamespace(
        layers=tuple(f"Block_{i}/Dense_0" for i in range(n)),
        activation_mean=np.zeros(n),
        activation_std=np.asarray(activation_std, dtype=np.float64),
        dead_fraction=np.zeros(n),
        grad_norm=grad_norm,
        vanishing=vanishing,
        exploding=exploding,
    )


PER_LAYER = [
    pytest.param(plots.plot_grad_norms, "grad_norm", id="grad_norms"),
    pytest.param(plots.plot_activation_std, "activation_std", id="activation_std"),
]


@pytest.mark.parametrize("plot, field", PER_LAYER)
def test_a_single_report_draws_one_line_of_its_values_on_a_log_axis(plot, field):
    report = fake_report([1e-3, 1e-2, 1e-1, 1.0], [4.0, 2.0, 1.0, 0.5])
    fig = plot(report)
    assert isinstance(fig, Figure)
    assert png(fig).startswith(PNG_SIGNATURE)
    (ax,) = fig.axes
    (line,) = ax.get_lines()
    assert ax.get_yscale() == "log"
    np.testing.assert_array_equal(line.get_xdata(), np.arange(4))
    np.testing.assert_array_equal(line.get_ydata(), getattr(report, field))
    assert ax.get_legend() is None
    assert [t.get_text() for t in ax.get_xticklabels()] == list(report.layers)


@pytest.mark.parametrize("plot, field", PER_LAYER)
def test_a_mapping_of_runs_draws_one_line_each_with_a_legend(plot, field):
    runs = {
        "relu": fake_report(np.ones(3)),
        "sigmoid": fake_report([1e-6, 1e-3, 1.0], vanishing=True),
        "deep": fake_report(np.arange(1.0, 41.0), exploding=True),
    }
    fig = plot(runs)
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert len(lines) == 3
    assert legend_texts(ax) == ["relu", "sigmoid (vanishing)", "deep (exploding)"]
    for line, run in zip(lines, runs.values(), strict=True):
        np.testing.assert_array_equal(line.get_ydata(), getattr(run, field))
        np.testing.assert_array_equal(line.get_xdata(), np.arange(len(run.layers)))
    assert ax.get_xlabel() == "layer (forward order)"  # the runs' layers differ


def test_the_verdict_of_a_single_report_is_in_the_title():
    fig = plots.plot_grad_norms(fake_report([1e-9, 1.0], vanishing=True))
    assert "vanishing" in fig.axes[0].get_title()
    fig = plots.plot_grad_norms(fake_report([1.0]), title="mine")
    assert fig.axes[0].get_title() == "mine"


def test_many_layers_are_labelled_by_index():
    fig = plots.plot_grad_norms(fake_report(np.ones(100)))
    assert fig.axes[0].get_xlabel() == "layer (forward order)"


def test_runs_of_the_same_layers_are_labelled_by_name():
    runs = {"a": fake_report([1.0, 2.0]), "b": fake_report([3.0, 4.0])}
    ax = plots.plot_grad_norms(runs).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(runs["a"].layers)


@pytest.mark.parametrize("plot, field", PER_LAYER)
def test_values_a_log_axis_cannot_draw_are_masked_without_a_warning(plot, field):
    bad = [1.0, 0.0, -2.0, np.nan, np.inf, -np.inf, 3.0]
    fig = plot(fake_report(bad, bad))
    assert png(fig).startswith(PNG_SIGNATURE)
    (line,) = fig.axes[0].get_lines()
    expected = [1.0, np.nan, np.nan, np.nan, np.nan, np.nan, 3.0]
    np.testing.assert_array_equal(line.get_ydata(), expected)
    nothing = plot(fake_report(np.zeros(3), np.zeros(3)))
    assert png(nothing).startswith(PNG_SIGNATURE)


def test_training_curves_draw_one_line_per_run_masking_divergence():
    histories = {
        "list": [3.0, 2.0, 1.0],
        "numpy": np.array([4.0, 2.0, np.inf, np.nan]),
        "jax": jnp.array([5.0, 1.0], dtype=jnp.bfloat16),
    }
    fig = plots.plot_training_curves(histories)
    assert png(fig).startswith(PNG_SIGNATURE)
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert len(lines) == 3
    assert legend_texts(ax) == ["list", "numpy", "jax"]
    assert ax.get_yscale() == "log"
    np.testing.assert_array_equal(lines[1].get_ydata(), [4.0, 2.0, np.nan, np.nan])
    np.testing.assert_array_equal(lines[2].get_xdata(), [0, 1])


def test_training_curves_use_a_linear_axis_for_nonpositive_losses():
    fig = plots.plot_training_curves({"a": [1.0, 0.0, -1.0, np.nan]})
    assert png(fig).startswith(PNG_SIGNATURE)
    (line,) = fig.axes[0].get_lines()
    assert fig.axes[0].get_yscale() == "linear"
    np.testing.assert_array_equal(line.get_ydata(), [1.0, 0.0, -1.0, np.nan])
    all_nan = plots.plot_training_curves({"a": [np.nan, np.inf], "b": []})
    assert png(all_nan).startswith(PNG_SIGNATURE)


def test_plots_draw_into_given_axes():
    fig = Figure()
    left, middle, right = fig.subplots(1, 3)
    assert plots.plot_grad_norms(fake_report([1.0, 2.0]), ax=left) is fig
    assert plots.plot_activation_std({"a": fake_report([1.0])}, ax=middle) is fig
    assert plots.plot_training_curves({"a": [1.0]}, ax=right) is fig
    assert [len(ax.get_lines()) for ax in fig.axes] == [1, 1, 1]
    assert png(fig).startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("plot, field", PER_LAYER)
def test_bad_reports_raise_naming_the_argument(plot, field):
    with pytest.raises(TypeError, match=r"`report`.*got list"):
        plot([1.0, 2.0])
    incomplete = types.SimpleNamespace(layers=("a",))
    with pytest.raises(TypeError, match=rf"`report\['x'\]`.*`{field}`.*Namespace"):
        plot({"x": incomplete})
    with pytest.raises(ValueError, match="`report` .*empty mapping"):
        plot({})
    wrong_length = fake_report([1.0, 2.0])
    setattr(wrong_length, field, np.ones(3))
    with pytest.raises(ValueError, match=rf"`report.{field}`.*\(2\).*\(3,\)"):
        plot(wrong_length)


def test_bad_histories_raise_naming_the_argument():
    with pytest.raises(TypeError, match=r"`histories`.*mapping.*got list"):
        plots.plot_training_curves([1.0, 2.0])
    with pytest.raises(ValueError, match="`histories` .*empty mapping"):
        plots.plot_training_curves({})
    with pytest.raises(ValueError, match=r"`histories\['a'\]` must be 1-D"):
        plots.plot_training_curves({"a": np.ones((2, 2))})
    with pytest.raises(TypeError, match=r"`histories\['a'\]`.*numbers.*got list"):
        plots.plot_training_curves({"a": ["x", "y"]})


def test_importing_jstab_does_not_import_matplotlib():
    code = "import jstab, sys; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
