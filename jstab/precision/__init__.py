"""Mixed precision: dynamic loss scaling, and optimizers run in float32."""

from jstab.precision._loss_scale import (
    DynamicLossScaleState,
    dynamic_loss_scale,
    loss_scale,
    scale_loss,
)
from jstab.precision._upcast import UpcastState, upcast

__all__ = [
    "DynamicLossScaleState",
    "UpcastState",
    "dynamic_loss_scale",
    "loss_scale",
    "scale_loss",
    "upcast",
]
