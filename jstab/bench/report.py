"""The benchmark's output: a table to read and a JSON record to keep."""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
from collections.abc import Sequence

from jstab.bench.timing import Timing


@dataclasses.dataclass(frozen=True)
class Table:
    """One timed step on one parameter tree: the baseline and each variant.

    Attributes:
      name: the tree (``"resnet"``, ``"transformer"``, ``"tiny"``, ``"mlp"``
        or the name given to :func:`jstab.bench.optimizer_step`).
      step: ``"optimizer"`` (update and apply, on a given gradient) or
        ``"training"`` (forward, backward, update and apply).
      optimizer: the baseline's name.
      leaves, parameters: the size of the parameter tree.
      traffic_mb: megabytes the baseline optimizer must move per step
        (reads and writes of gradient-sized arrays).
      repeats: timed pairs per variant.
      timings: the baseline's row first, then one per variant.
    """

    name: str
    step: str
    optimizer: str
    leaves: int
    parameters: int
    traffic_mb: float
    repeats: int
    timings: tuple[Timing, ...]
    rules: tuple[str, ...] = ()


def _cell(value: float | int | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_table(table: Table) -> str:
    """``table`` as aligned text, a title line and one row per variant."""
    title = (
        f"{table.name}: {table.step} step, {table.optimizer}, "
        f"{table.leaves} leaves, {table.parameters / 1e6:.2f}M parameters, "
        f"{table.traffic_mb:.0f} MB moved by the optimizer, {table.repeats} pairs"
    )
    fusions = any(t.fusions is not None for t in table.timings)
    faults = any(t.faults is not None for t in table.timings)
    head = (
        f"{'variant':<28}{'rule':<23}{'ms':>9}{'ratio':>7}  {'[min, max]':<13}"
        f"{'floor':>6}{'compile s':>10}{'×':>6}"
    )
    if faults:
        head += f"{'faults':>8}"
    if fusions:
        head += f"{'fusions':>9}"
    lines = [title, head]
    rules = table.rules or ("",) * len(table.timings)
    for t, rule in zip(table.timings, rules, strict=True):
        spread = f"[{t.ratio_min:.2f}, {t.ratio_max:.2f}]"
        line = (
            f"{t.variant:<28}{rule:<23}{t.median_ms:>9.2f}{t.ratio:>7.2f}  "
            f"{spread:<13}{_cell(t.floor, '.2f'):>6}{t.compile_s:>10.2f}"
            f"{t.compile_ratio:>6.2f}"
        )
        if faults:
            line += f"{_cell(t.faults, '.0f'):>8}"
        if fusions:
            line += f"{_cell(t.fusions, 'd'):>9}"
        lines.append(line)
    return "\n".join(lines)


def machine() -> dict[str, object]:
    """Versions and hardware: what the figures were measured on."""
    import flax
    import jax
    import jaxlib
    import optax

    import jstab

    device = jax.devices()[0]
    return {
        "jstab": jstab.__version__,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "flax": flax.__version__,
        "python": sys.version.split()[0],
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "devices": jax.device_count(),
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        # Set, compile times of the steps found in it are load times.
        "compilation_cache": (
            jax.config.jax_compilation_cache_dir
            if jax.config.jax_enable_compilation_cache
            else None
        ),
    }


def record(tables: Sequence[Table]) -> dict[str, object]:
    """The JSON-ready record of a run: the machine, then every table."""
    return {
        "machine": machine(),
        "tables": [dataclasses.asdict(t) for t in tables],
    }
