"""Diagnostics: see vanishing and exploding gradients, and fix init with LSUV."""

from jstab.diagnostics._lsuv import lsuv
from jstab.diagnostics._monitor import MonitorState, monitor_gradients
from jstab.diagnostics._signal import SignalReport, signal_propagation
from jstab.diagnostics._statistics import statistics

__all__ = [
    "MonitorState",
    "SignalReport",
    "lsuv",
    "monitor_gradients",
    "signal_propagation",
    "statistics",
]
