"""Clipping as Optax gradient transformations whose state records what they did."""

from jstab._numerics import ClipState
from jstab.clipping._adagc import AdaGCState, adagc
from jstab.clipping._agc import AdaptiveGradClipState, adaptive_grad_clip
from jstab.clipping._autoclip import AutoClipState, autoclip
from jstab.clipping._block_rms import ClipByBlockRmsState, clip_by_block_rms
from jstab.clipping._global_norm import (
    ClipByGlobalNormState,
    clip_by_global_norm,
    clip_grad_norm,
    global_norm,
)
from jstab.clipping._layer_norm import ClipByLayerNormState, clip_by_layer_norm
from jstab.clipping._skip import SkipState, skip_on_spike
from jstab.clipping._value import (
    ClipByRangeState,
    ClipByValueState,
    clip_by_range,
    clip_by_value,
)
from jstab.clipping._zclip import ZClipState, zclip

__all__ = [
    "AdaGCState",
    "AdaptiveGradClipState",
    "AutoClipState",
    "ClipByBlockRmsState",
    "ClipByGlobalNormState",
    "ClipByLayerNormState",
    "ClipByRangeState",
    "ClipByValueState",
    "ClipState",
    "SkipState",
    "ZClipState",
    "adagc",
    "adaptive_grad_clip",
    "autoclip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_layer_norm",
    "clip_by_range",
    "clip_by_value",
    "clip_grad_norm",
    "global_norm",
    "skip_on_spike",
    "zclip",
]
