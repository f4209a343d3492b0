"""Clipping as Optax gradient transformations whose state records what they did."""

from jstab.clipping._agc import adaptive_grad_clip
from jstab.clipping._global_norm import clip_by_global_norm
from jstab.clipping._layer_norm import clip_by_layer_norm
from jstab.clipping._state import ClipState
from jstab.clipping._value import clip_by_range, clip_by_value

__all__ = [
    "ClipState",
    "adaptive_grad_clip",
    "clip_by_global_norm",
    "clip_by_layer_norm",
    "clip_by_range",
    "clip_by_value",
]
