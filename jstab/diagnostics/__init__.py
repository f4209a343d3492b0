"""Diagnostics: see vanishing and exploding gradients, and fix init with LSUV."""

from jstab.diagnostics._lsuv import lsuv
from jstab.diagnostics._monitor import MonitorState, monitor_gradients
from jstab.diagnostics._signal import SignalReport, signal_propagation
from jstab.diagnostics._statistics import statistics
from jstab.diagnostics._updates import MonitorUpdatesState, monitor_updates

__all__ = [
    "MonitorState",
    "MonitorUpdatesState",
    "SignalReport",
    "lsuv",
    "monitor_gradients",
    "monitor_updates",
    "signal_propagation",
    "statistics",
]
