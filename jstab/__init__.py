"""jstab: a JAX library against vanishing and exploding gradients.

Initializers with the ``jax.nn.initializers`` signature, Optax gradient
transformations for clipping whose state records what they did, and
diagnostics that tell which of the two problems a model has.
"""

from jstab.clipping import (
    AutoClipState,
    ClipState,
    SkipState,
    ZClipState,
    adaptive_grad_clip,
    autoclip,
    clip_by_global_norm,
    clip_by_layer_norm,
    clip_by_range,
    clip_by_value,
    skip_on_spike,
    zclip,
)
from jstab.diagnostics import (
    MonitorState,
    SignalReport,
    lsuv,
    monitor_gradients,
    signal_propagation,
)
from jstab.init import (
    Initializer,
    calculate_gain,
    compute_fans,
    delta_orthogonal,
    glorot_normal,
    glorot_uniform,
    he_normal,
    he_uniform,
    kaiming_normal,
    kaiming_uniform,
    lecun_normal,
    lecun_uniform,
    orthogonal,
    small_normal,
    small_uniform,
    truncated_normal,
    variance_scaling,
    xavier_normal,
    xavier_uniform,
)

__version__ = "0.1.0"

__all__ = [
    "AutoClipState",
    "ClipState",
    "Initializer",
    "MonitorState",
    "SignalReport",
    "SkipState",
    "ZClipState",
    "__version__",
    "adaptive_grad_clip",
    "autoclip",
    "calculate_gain",
    "clip_by_global_norm",
    "clip_by_layer_norm",
    "clip_by_range",
    "clip_by_value",
    "compute_fans",
    "delta_orthogonal",
    "glorot_normal",
    "glorot_uniform",
    "he_normal",
    "he_uniform",
    "kaiming_normal",
    "kaiming_uniform",
    "lecun_normal",
    "lecun_uniform",
    "lsuv",
    "monitor_gradients",
    "orthogonal",
    "signal_propagation",
    "skip_on_spike",
    "small_normal",
    "small_uniform",
    "truncated_normal",
    "variance_scaling",
    "xavier_normal",
    "xavier_uniform",
    "zclip",
]
