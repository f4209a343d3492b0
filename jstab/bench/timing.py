"""Timing compiled steps: compile apart, warm-up, then interleaved pairs.

A step is timed as training runs it: jit-compiled with its parameters and
optimizer state donated (the outputs of one call are the inputs of the
next), each call waited for with ``jax.block_until_ready``. A variant is
always timed beside the baseline, the two alternating (A B, then B A, and so
on), and its cost is the ratio of the two times of each pair: drift in the
machine's speed (other processes, clock scaling) moves both alike.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

try:
    import resource
except ImportError:  # Windows: no page-fault counter
    resource = None

_FUSION = re.compile(r"\bfusion\(")


def _minor_faults() -> int | None:
    """The process's minor page faults so far, or ``None`` if not counted.

    A minor fault is a first touch of a page the process was given but had
    not used: on XLA's CPU backend, every temporary array a step writes is
    fresh memory, so this counts what a step's temporaries cost the kernel.
    """
    return (
        None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    )


class Compiled:
    """A compiled step and the buffers it owns.

    ``step(*args)`` returns new values for the first ``len(output)`` of
    ``args`` (the donated ones); the rest (a gradient, a batch) are reused.
    """

    def __init__(self, step: Callable, args: Sequence, donate: Sequence[int]):
        self.args = list(jax.tree.map(lambda x: x.copy(), list(args)))
        start = time.perf_counter()
        jitted = jax.jit(step, donate_argnums=tuple(donate))
        self.executable = jitted.lower(*self.args).compile()
        self.compile_s = time.perf_counter() - start
        self.times: list[float] = []
        self.faults: list[int] = []
        self.last_faults: int | None = None

    def __call__(self) -> float:
        """Runs one step and returns its wall time in seconds.

        ``last_faults`` is then the call's minor page faults, or ``None``
        where the system does not count them.
        """
        faults = _minor_faults()
        start = time.perf_counter()
        out = self.executable(*self.args)
        jax.block_until_ready(out)
        elapsed = time.perf_counter() - start
        if faults is not None:
            self.last_faults = _minor_faults() - faults
        self.args[: len(out)] = out
        return elapsed

    def fusions(self) -> int:
        """The number of fusions (kernels) in the compiled program."""
        return len(_FUSION.findall(self.executable.as_text()))


@dataclasses.dataclass(frozen=True)
class Timing:
    """The figures of one variant of one table.

    Attributes:
      variant: the name of the variant.
      median_ms, min_ms, max_ms: its step time over the timed calls.
      ratio, ratio_min, ratio_max: the median, min and max over pairs of its
        time over the baseline's time in the same pair. For the baseline
        itself, consecutive baseline calls against each other: the noise.
      compile_s: seconds to trace, lower and compile its step.
      compile_ratio: ``compile_s`` over the baseline's.
      floor: the ratio a memory-bound step cannot beat (see
        :func:`~jstab.bench.variants.traffic_floor`), or ``None`` where it
        is not known.
      fusions: the number of fusions in its compiled step, if asked for.
      faults: the median number of minor page faults of its timed calls
        (the fresh memory its temporaries touch), or ``None`` where they
        are not counted.
    """

    variant: str
    median_ms: float
    min_ms: float
    max_ms: float
    ratio: float
    ratio_min: float
    ratio_max: float
    compile_s: float
    compile_ratio: float
    floor: float | None = None
    fusions: int | None = None
    faults: float | None = None


def paired(base: Compiled, other: Compiled, repeats: int, warmup: int) -> list[float]:
    """Times ``base`` and ``other`` alternately; the ratio of each pair.

    ``warmup`` calls of each come first, untimed. Odd rounds run ``other``
    first, so neither always runs on the cache or clock the other left.
    """
    for _ in range(warmup):
        base(), other()
    ratios = []
    for round_ in range(repeats):
        if round_ % 2:
            t, t_base = other(), base()
        else:
            t_base, t = base(), other()
        for run, elapsed in ((base, t_base), (other, t)):
            run.times.append(elapsed)
            if run.last_faults is not None:
                run.faults.append(run.last_faults)
        ratios.append(t / t_base)
    return ratios


def summarize(
    name: str,
    run: Compiled,
    ratios: Sequence[float],
    base_compile_s: float,
    floor: float | None,
    fusions: bool,
) -> Timing:
    """The :class:`Timing` of ``run`` from its times and paired ratios."""
    ms = 1e3 * np.asarray(run.times)
    return Timing(
        variant=name,
        median_ms=float(np.median(ms)),
        min_ms=float(ms.min()),
        max_ms=float(ms.max()),
        ratio=float(np.median(ratios)),
        ratio_min=float(min(ratios)),
        ratio_max=float(max(ratios)),
        compile_s=run.compile_s,
        compile_ratio=run.compile_s / base_compile_s,
        floor=floor,
        fusions=run.fusions() if fusions else None,
        faults=float(np.median(run.faults)) if run.faults else None,
    )


def noise(base: Compiled) -> list[float]:
    """Ratios of consecutive baseline times: what "no difference" looks like."""
    t = base.times
    return [b / a for a, b in zip(t[:-1], t[1:], strict=True)] or [1.0]
