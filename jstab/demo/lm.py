"""Part F of ``jstab demo``: loss spikes in a small language model.

A small GPT (:mod:`jstab.demo.gpt`) learns the characters of CPython's own
documentation, ``pydoc_data.topics`` (about 465 KB of English that ships
with every Python), split 90/10 into training and validation text. Each
rule of ``RULES`` trains it with AdamW, at each setting of the budget.

Organic loss spikes are rare in a model this small: a prototype with two
layers of width 64 met at most a few in 1000 steps at learning rates up to
0.3, and every rule was within noise of none. So the spikes are triggered,
with the two triggers the literature names for small scale:

- a learning rate past the stability edge, without QK-normalisation and
  without z-loss (Wortsman et al., 2023: attention-logit growth and
  output-logit divergence);
- data outliers: a few corrupted minibatches at known steps
  (``Setting.corrupt_at``), as real pipelines produce them; AdaGC (Wang et
  al., 2025) names data outliers first among spike triggers. A corrupted
  minibatch is either uniform random tokens (``"random"``) or every window
  one token repeated (``"repeat"``).

What triggered spikes here (2 layers of width 64, context 64, batches of
16): at learning rate 3e-2 without QK-norm or z-loss, the clean steps
spiked no more often than the counter's noise floor; a single corrupted
minibatch, random or repeated, raised the next steps' loss by about 0.3
(from 2.7) for a few steps, mostly below the threshold; a burst of three
consecutive minibatches of random tokens raised the clean steps after it
to 3.5 to 4.5, a spike of several steps that took about 10 steps to
recover. So the aggressive setting is learning rate 3e-2 with two such
bursts (``_corrupt``), and the stable one learning rate 3e-3 without
corruption. Pure Gaussian noise makes the counter find about 1.5 spikes
per 1000 steps: its noise floor.

The spike counter is :func:`count_spikes`, defined once: a step is a spike
when its training loss exceeds the median of the previous ``WINDOW``
losses by more than ``K`` of their median absolute deviations. The
corrupted steps are left out, both as candidates (their own loss is high
whatever the rule) and from the windows of later steps, so the count is of
the clean steps around them: the damage a corrupted batch did to the model.
:func:`recovery` counts the steps after each burst of corrupted steps
until the training loss is back at or below the median of the ``WINDOW``
steps before it.

Times on 2 CPU cores (AMD EPYC, jax 0.10.2), compilation included:
``DEFAULT`` 84 s (five rows of two seeds and 200 steps, 15 to 20 s a
row), ``QUICK`` 20 s (two rows of a 1-layer GPT of width 32), ``FULL``
1668 s (16 rows of three seeds and 600 steps, 52 to 216 s a row, measured
while another job kept one of the two cores busy).

References:
  Wortsman et al., 2023, "Small-scale proxies for large-scale Transformer
  training instabilities", arXiv 2309.14322; Kumar et al., 2025, "ZClip:
  adaptive spike mitigation for LLM pre-training", arXiv 2504.02507; Wang
  et al., 2025, "AdaGC: improving training stability for large language
  model pretraining", arXiv 2502.11034; Huang et al., 2025, "SPAM:
  spike-aware Adam with momentum reset for stable LLM training", arXiv
  2501.06842; Shazeer & Stern, 2018, "Adafactor".
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jstab
from jstab.demo import data, gpt, report

WINDOW = 50  # the spike counter's reference window, in steps
K = 5.0  # a spike exceeds the window's median by K median absolute deviations

RULES = (
    "none",
    "clip_by_global_norm(1)",
    "autoclip",
    "zclip",
    "adagc",
    "skip_on_spike",
    "AdamW → clip_by_block_rms(1)",
    "spam",
)


@dataclasses.dataclass(frozen=True)
class Setting:
    """A learning rate and a trigger, and the rules trained there.

    Attributes:
      name: the setting's name in the table.
      learning_rate: AdamW's peak learning rate (after a linear warm-up).
      rules: the names of ``RULES`` to train.
      corrupt_at: the steps whose minibatch is corrupted (0-based).
      corruption: ``"random"`` (uniform random tokens) or ``"repeat"``
        (each window one random token, repeated).
      qk_norm: whether the GPT normalizes queries and keys.
      z_coef: the z-loss coefficient (0: none).
    """

    name: str
    learning_rate: float
    rules: tuple[str, ...]
    corrupt_at: tuple[int, ...] = ()
    corruption: str = "random"
    qk_norm: bool = False
    z_coef: float = 0.0


@dataclasses.dataclass(frozen=True)
class Budget:
    """What part F may spend.

    Attributes:
      settings: the learning rates and triggers, each with its rules.
      steps: optimizer steps per run.
      seeds: runs per rule and setting, one after another.
      layers, width, heads, context: the GPT's sizes (:class:`~jstab.demo.gpt.Shape`).
      batch: windows per minibatch.
      warmup: steps of the learning rate's linear warm-up.
      weight_decay: AdamW's decoupled weight decay.
      eval_windows: validation windows of the final validation loss.
    """

    settings: tuple[Setting, ...]
    steps: int = 200
    seeds: int = 2
    layers: int = 2
    width: int = 64
    heads: int = 4
    context: int = 64
    batch: int = 16
    warmup: int = 20
    weight_decay: float = 0.1
    eval_windows: int = 256


STABLE_LR = 3e-3
AGGRESSIVE_LR = 3e-2


def _corrupt(steps: int, bursts: Sequence[float] = (0.4, 0.7)) -> tuple[int, ...]:
    """Bursts of 3 consecutive corrupted steps, from each fraction of ``steps``."""
    return tuple(int(steps * f) + i for f in bursts for i in range(3))


DEFAULT = Budget(
    settings=(
        Setting(
            "aggressive + corrupted",
            AGGRESSIVE_LR,
            ("none", "clip_by_global_norm(1)", "zclip", "skip_on_spike"),
            corrupt_at=_corrupt(200),
        ),
        Setting("stable", STABLE_LR, ("none",)),
    ),
    steps=200,
)
QUICK = Budget(
    settings=(
        Setting(
            "aggressive + corrupted",
            AGGRESSIVE_LR,
            ("none", "clip_by_global_norm(1)"),
            corrupt_at=_corrupt(150),
        ),
    ),
    steps=150,
    layers=1,
    width=32,
    context=32,
    eval_windows=64,
)
FULL = Budget(
    settings=(
        Setting("aggressive + corrupted", AGGRESSIVE_LR, RULES, _corrupt(600)),
        Setting("stable", STABLE_LR, RULES),
    ),
    steps=600,
    seeds=3,
)


def resize(
    budget: Budget, *, steps: int | None = None, seeds: int | None = None
) -> Budget:
    """``budget`` with other ``steps`` or ``seeds``; corrupted bursts move with
    the steps (each burst's first step keeps its fraction of the run, and
    the burst its length).

    Args:
      budget: the budget to change.
      steps: the new number of steps, or ``None`` to keep it.
      seeds: the new number of seeds, or ``None`` to keep it.

    Returns:
      The new budget.
    """
    if seeds is not None:
        budget = dataclasses.replace(budget, seeds=seeds)
    if steps is None or steps == budget.steps:
        return budget

    def moved(at: tuple[int, ...]) -> tuple[int, ...]:
        found = set()
        for first, last in _bursts(at):
            start = first * steps // budget.steps
            found |= {c for c in range(start, start + last - first + 1) if c < steps}
        return tuple(sorted(found))

    settings = tuple(
        dataclasses.replace(s, corrupt_at=moved(s.corrupt_at)) for s in budget.settings
    )
    return dataclasses.replace(budget, settings=settings, steps=steps)


def spike_steps(
    loss: np.ndarray,
    window: int = WINDOW,
    k: float = K,
    exclude: Sequence[int] = (),
) -> np.ndarray:
    """The steps of one run's loss spikes: part F's definition.

    Step ``t`` is a spike when ``loss[t] > median + k * MAD`` of the
    previous ``window`` steps' losses (MAD: their median absolute
    deviation from the median). Steps of ``exclude`` (the corrupted ones)
    are neither counted nor part of any window; the first ``window``
    other steps only fill the window. Counting stops at the first
    non-finite loss (a divergence, reported on its own).

    Args:
      loss: the training loss at every step, ``(steps,)``.
      window: the number of previous (non-excluded) steps compared with.
      k: the threshold, in median absolute deviations.
      exclude: steps left out.

    Returns:
      The spikes' steps (indices into ``loss``), int, ascending.
    """
    loss = np.asarray(loss, np.float64)
    keep = np.ones(loss.size, bool)
    keep[[s for s in exclude if 0 <= s < loss.size]] = False
    steps = np.flatnonzero(keep)
    values = loss[steps]
    bad = np.flatnonzero(~np.isfinite(values))
    end = bad[0] if bad.size else values.size
    found = []
    for t in range(window, end):
        past = values[t - window : t]
        median = np.median(past)
        mad = np.median(np.abs(past - median))
        if values[t] > median + k * mad:
            found.append(steps[t])
    return np.array(found, int)


def count_spikes(
    loss: np.ndarray,
    window: int = WINDOW,
    k: float = K,
    exclude: Sequence[int] = (),
) -> int:
    """The number of loss spikes of one run (:func:`spike_steps`).

    Args:
      loss: the training loss at every step, ``(steps,)``.
      window: the number of previous (non-excluded) steps compared with.
      k: the threshold, in median absolute deviations.
      exclude: steps left out: neither counted nor in any window.

    Returns:
      The number of steps whose loss exceeds the median of the previous
      ``window`` ones by more than ``k`` of their median absolute deviations.
    """
    return int(spike_steps(loss, window, k, exclude).size)


def _bursts(at: Sequence[int]) -> list[tuple[int, int]]:
    """The maximal runs of consecutive steps in ``at``, as (first, last)."""
    runs: list[tuple[int, int]] = []
    for step in sorted(set(at)):
        if runs and step == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], step)
        else:
            runs.append((step, step))
    return runs


def recovery(loss: np.ndarray, at: Sequence[int], window: int = WINDOW) -> float:
    """The mean steps, after each burst of corrupted steps, until the loss
    recovers.

    A burst is a run of consecutive steps of ``at`` (often one step). It is
    recovered at the first step after its last whose training loss is at
    most the median of the ``window`` steps before its first; a run that
    never recovers (or diverges) counts the steps left.

    Args:
      loss: the training loss at every step, ``(steps,)``.
      at: the corrupted steps.
      window: the steps before each burst that set its level.

    Returns:
      The mean over the bursts of the steps to recover (NaN if ``at`` is
      empty).
    """
    loss = np.asarray(loss, np.float64)
    found = []
    for first, last in _bursts(at):
        level = np.median(loss[max(0, first - window) : first])
        after = loss[last + 1 :]
        ok = np.flatnonzero(after <= level)
        found.append(ok[0] + 1 if ok.size else after.size)
    return float(np.mean(found)) if found else float("nan")


def _matrices(params: Any) -> Any:
    """The weight-decay mask: kernels and embeddings, not biases or scales."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def optimizer(
    rule: str, learning_rate: float, budget: Budget
) -> optax.GradientTransformationExtraArgs:
    """AdamW (β = 0.9, 0.95) with ``rule``, one of ``RULES``.

    The learning rate warms up linearly over ``budget.warmup`` steps, then
    stays constant; weight decay applies to matrices only. Clipping rules
    of the gradient come before AdamW; ``clip_by_block_rms`` comes after
    Adam's scaling, before the weight decay and the learning rate
    (Adafactor's update clipping, d = 1); ``skip_on_spike`` wraps the whole
    optimizer and tests both the gradient norm (z > 6) and the loss
    (z > 6): ``update`` then takes ``loss=``. SPAM replaces Adam's scaling.

    Args:
      rule: a name from ``RULES``.
      learning_rate: the peak learning rate.
      budget: the warm-up and the weight decay.

    Returns:
      The transformation; every rule's ``update`` accepts ``loss=``.
    """
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, budget.warmup)],
        [budget.warmup],
    )

    def adamw(*after_adam: optax.GradientTransformation) -> Any:
        return optax.chain(
            optax.scale_by_adam(b1=0.9, b2=0.95),
            *after_adam,
            optax.add_decayed_weights(budget.weight_decay, _matrices),
            optax.scale_by_learning_rate(schedule),
        )

    before = {
        "clip_by_global_norm(1)": lambda: jstab.clip_by_global_norm(1.0),
        "autoclip": lambda: jstab.autoclip(10.0),
        "zclip": jstab.zclip,
        "adagc": jstab.adagc,
    }
    if rule == "none":
        tx = adamw()
    elif rule in before:
        tx = optax.chain(before[rule](), adamw())
    elif rule == "skip_on_spike":
        return jstab.skip_on_spike(adamw(), z_thresh=6.0, loss_z_thresh=6.0)
    elif rule == "AdamW → clip_by_block_rms(1)":
        tx = adamw(jstab.clip_by_block_rms(1.0))
    elif rule == "spam":
        tx = jstab.spam(
            schedule,
            b1=0.9,
            b2=0.95,
            weight_decay=budget.weight_decay,
            mask=_matrices,
        )
    else:
        raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")
    return optax.with_extra_args_support(tx)


def shape(setting: Setting, budget: Budget) -> gpt.Shape:
    """The GPT of ``budget``'s sizes with ``setting``'s QK-norm switch."""
    return gpt.Shape(
        vocab=len(data.corpus().chars),
        context=budget.context,
        layers=budget.layers,
        width=budget.width,
        heads=budget.heads,
        qk_norm=setting.qk_norm,
    )


def program(setting: Setting, rule: str, budget: Budget) -> Callable:
    """One compiled training run: ``run(params, key) -> (params, opt_state,
    loss)`` of ``budget.steps`` steps in a ``jax.lax.scan``.

    ``params`` is the ``nnx.State`` of a :class:`~jstab.demo.gpt.GPT` of
    :func:`shape`; ``loss`` is the training loss at every step, before the
    step's update. Step ``i`` draws its minibatch from ``fold_in(key, i)``
    (corrupted at ``setting.corrupt_at``).

    Args:
      setting: the learning rate, trigger and model switches.
      rule: a name from ``RULES``.
      budget: the sizes and the training budget.

    Returns:
      The jit-compiled ``run``; it compiles at its first call and is reused
      for every seed.
    """
    text = data.corpus()
    graphdef, _ = nnx.split(
        nnx.eval_shape(lambda: gpt.GPT(shape(setting, budget), rngs=nnx.Rngs(0)))
    )
    sample = data.sampler(
        text.train,
        batch=budget.batch,
        context=budget.context,
        vocab=len(text.chars),
        corrupt_at=setting.corrupt_at,
        corruption=setting.corruption,
    )
    tx = optimizer(rule, setting.learning_rate, budget)

    def objective(params, windows):
        return gpt.loss(nnx.merge(graphdef, params), windows, setting.z_coef)

    def step(carry, i):
        params, opt_state, key = carry
        windows = sample(jax.random.fold_in(key, i), i)
        loss, grads = jax.value_and_grad(objective)(params, windows)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return (optax.apply_updates(params, updates), opt_state, key), loss

    def run(params, key):
        carry = (params, tx.init(params), key)
        (params, opt_state, _), loss = jax.lax.scan(
            step, carry, jnp.arange(budget.steps)
        )
        return params, opt_state, loss

    return jax.jit(run)


def validation_loss(setting: Setting, budget: Budget, params: Any) -> chex.Array:
    """The mean next-token loss (z-loss left out) of ``budget.eval_windows``
    evenly spaced windows of the validation text.

    Args:
      setting: the setting the parameters were trained at (its GPT's shape).
      budget: the sizes and the number of windows.
      params: the ``nnx.State`` of a trained :class:`~jstab.demo.gpt.GPT`.

    Returns:
      The loss, a float32 scalar.
    """
    text = data.corpus()
    graphdef, _ = nnx.split(
        nnx.eval_shape(lambda: gpt.GPT(shape(setting, budget), rngs=nnx.Rngs(0)))
    )
    length = budget.context + 1
    starts = np.linspace(0, text.valid.size - length, budget.eval_windows)
    windows = text.valid[starts.astype(int)[:, None] + np.arange(length)]
    return gpt.loss(nnx.merge(graphdef, params), jnp.asarray(windows))


def initialize(setting: Setting, budget: Budget, key: chex.PRNGKey) -> Any:
    """A fresh GPT's parameters (an ``nnx.State``) from ``key``.

    Args:
      setting: the setting (its QK-norm switch).
      budget: the sizes.
      key: the initializers' key.

    Returns:
      The state of a :class:`~jstab.demo.gpt.GPT` of :func:`shape`.
    """
    model = gpt.GPT(shape(setting, budget), rngs=nnx.Rngs(params=key))
    return nnx.split(model)[1]


@dataclasses.dataclass(frozen=True)
class Row:
    """What :func:`measure` found for one rule at one setting.

    Attributes:
      setting: the setting's name.
      rule: the rule's name (``RULES``).
      spikes: the steps of every seed's loss spikes (:func:`spike_steps`,
        corrupted steps excluded), one tuple per seed.
      diverged: per seed, whether a training loss was not finite or the
        final validation loss was not finite or above the first step's
        training loss.
      valid_loss: the final validation loss, per seed.
      recovery: the mean steps to recover from a corrupted burst
        (:func:`recovery`), per seed; NaN without corruption.
      clipped: the steps clipped per seed, or ``None`` if nothing clips.
      skipped: the steps skipped per seed, or ``None`` if nothing skips.
      seconds: wall time of the row, compilation included.
      loss: the training loss at every step, mean over the seeds.
      corrupt_at: the corrupted steps.
    """

    setting: str
    rule: str
    spikes: tuple[tuple[int, ...], ...]
    diverged: np.ndarray
    valid_loss: np.ndarray
    recovery: np.ndarray
    clipped: np.ndarray | None
    skipped: np.ndarray | None
    seconds: float
    loss: np.ndarray
    corrupt_at: tuple[int, ...]


def _counts(opt_state: Any, suffix: str) -> int | None:
    """The sum of ``jstab.statistics``' values whose keys end with ``suffix``."""
    found = [v for k, v in jstab.statistics(opt_state).items() if k.endswith(suffix)]
    return int(sum(found)) if found else None


def measure(
    setting: Setting,
    rule: str,
    budget: Budget,
    *,
    seed: int = 0,
    progress: Callable[[int], Any] | None = None,
) -> Row:
    """Trains ``budget.seeds`` GPTs with ``rule`` at ``setting``, one by one.

    Seed ``i`` starts from the same parameters and sees the same minibatches
    for every rule and setting (its keys derive from ``seed`` and ``i``):
    the runs differ in their rule, learning rate and trigger only. A run is
    deterministic given ``seed`` (on one machine and JAX version).

    Args:
      setting: the learning rate, trigger and model switches.
      rule: a name from ``RULES``.
      budget: the sizes and the training budget.
      seed: the seed of every key.
      progress: called with the number of steps done, after each seed.

    Returns:
      The :class:`Row`.
    """
    start = time.perf_counter()
    run = program(setting, rule, budget)
    evaluate = jax.jit(functools.partial(validation_loss, setting, budget))
    root = jax.random.key(seed)
    losses, spikes, diverged, valid, rec, clipped, skipped = ([] for _ in range(7))
    for i in range(budget.seeds):
        init_key, data_key = jax.random.split(jax.random.fold_in(root, i))
        params, opt_state, loss = run(initialize(setting, budget, init_key), data_key)
        loss = np.asarray(loss)
        final = float(evaluate(params))
        losses.append(loss)
        spikes.append(
            tuple(int(s) for s in spike_steps(loss, exclude=setting.corrupt_at))
        )
        diverged.append(
            not (np.isfinite(loss).all() and np.isfinite(final) and final <= loss[0])
        )
        valid.append(final)
        rec.append(recovery(loss, setting.corrupt_at))
        clipped.append(_counts(opt_state, "/clip_count"))
        skipped.append(_counts(opt_state, "/skip_count"))
        if progress is not None:
            progress((i + 1) * budget.steps)

    def counts(values: list) -> np.ndarray | None:
        return None if values[0] is None else np.array(values)

    return Row(
        setting=setting.name,
        rule=rule,
        spikes=tuple(spikes),
        diverged=np.array(diverged),
        valid_loss=np.array(valid),
        recovery=np.array(rec),
        clipped=counts(clipped),
        skipped=counts(skipped),
        seconds=time.perf_counter() - start,
        loss=np.mean(losses, axis=0),
        corrupt_at=setting.corrupt_at,
    )


def runs(budget: Budget) -> int:
    """The number of rows (setting, rule) of ``budget``."""
    return sum(len(s.rules) for s in budget.settings)


def sweep(
    budget: Budget = DEFAULT,
    *,
    seed: int = 0,
    progress: Callable[[int], Any] | None = None,
) -> list[Row]:
    """Part F: every rule of every setting of ``budget``.

    Args:
      budget: the settings, sizes and training budget.
      seed: the seed of every key (:func:`measure`).
      progress: called with the number of steps done over the whole sweep,
        out of ``runs(budget) * budget.seeds * budget.steps``.

    Returns:
      One :class:`Row` per setting and rule, in the budget's order.
    """
    rows = []
    per_row = budget.seeds * budget.steps
    for setting in budget.settings:
        for rule in setting.rules:
            advance = None
            if progress is not None:
                done = len(rows) * per_row
                advance = lambda steps, done=done: progress(done + steps)  # noqa: E731
            rows.append(measure(setting, rule, budget, seed=seed, progress=advance))
    return rows


TITLE = (
    "F. Loss spikes in a small language model (character-level GPT on "
    "pydoc_data.topics; spikes: steps whose training loss exceeds the median "
    f"of the previous {WINDOW} by more than {K:g} median absolute deviations, "
    "corrupted steps left out; means over the seeds)"
)
_HEAD = (
    "setting",
    "rule",
    "spikes",
    "diverged",
    "valid loss",
    "recovery (steps)",
    "clipped",
    "skipped",
    "time (s)",
)


def row(r: Row, steps: int) -> tuple[str, ...]:
    """The table's cells for ``r``."""
    seeds = r.valid_loss.size
    recovered = "—" if np.isnan(r.recovery).all() else f"{np.mean(r.recovery):.1f}"
    return (
        r.setting,
        r.rule,
        f"{np.mean([len(s) for s in r.spikes]):.1f}",
        f"{int(r.diverged.sum())}/{seeds}",
        report._spread(r.valid_loss),
        recovered,
        report._count(r.clipped, steps),
        report._count(r.skipped, steps),
        f"{r.seconds:.1f}",
    )


def table(rows: Sequence[Row], budget: Budget) -> str:
    """Part F's Markdown table, under its title."""
    cells = [row(r, budget.steps) for r in rows]
    return f"{TITLE}\n\n{report.markdown(_HEAD, cells)}"


def record(rows: Sequence[Row], budget: Budget, **about: Any) -> dict:
    """A JSON-ready record: the budget, ``about`` and every seed's numbers."""

    def listed(values: np.ndarray | None) -> list[float] | None:
        return None if values is None else [float(v) for v in np.ravel(values)]

    return {
        "budget": dataclasses.asdict(budget),
        "spike": {"window": WINDOW, "k": K},
        **about,
        "rows": [
            {
                "setting": r.setting,
                "rule": r.rule,
                "spikes": [list(s) for s in r.spikes],
                "diverged": [bool(d) for d in r.diverged],
                "valid_loss": listed(r.valid_loss),
                "recovery": listed(r.recovery),
                "clipped": listed(r.clipped),
                "skipped": listed(r.skipped),
                "seconds": r.seconds,
                "corrupt_at": list(r.corrupt_at),
                "loss": listed(r.loss),
            }
            for r in rows
        ],
    }


def _smooth(loss: np.ndarray, skip: Sequence[int], width: int = 10) -> np.ndarray:
    """The mean of ``loss`` over each step's last ``width`` steps, the steps of
    ``skip`` left out (NaN where all of them are)."""
    loss = np.array(loss, np.float64)
    loss[[s for s in skip if s < loss.size]] = np.nan
    ok = np.isfinite(loss)
    window = np.ones(width)
    total = np.convolve(np.where(ok, loss, 0.0), window)[: loss.size]
    count = np.convolve(ok.astype(float), window)[: loss.size]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def plot(rows: Sequence[Row], path: Path) -> Path:
    """Writes ``path`` (PNG): the training loss of every rule, per setting.

    One panel per setting, one line per rule (the mean over the seeds of
    the training loss, averaged over the last 10 steps, corrupted steps
    left out); every seed's spikes are marked with an ``x`` on its rule's
    line, the corrupted steps with dotted vertical lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r.setting for r in rows))
    fig, axes = plt.subplots(
        1, len(settings), figsize=(7 * len(settings), 5), layout="constrained"
    )
    axes = np.atleast_1d(axes)
    for ax, setting in zip(axes, settings, strict=True):
        found = [r for r in rows if r.setting == setting]
        for r in found:
            smooth = _smooth(r.loss, r.corrupt_at)
            (line,) = ax.plot(smooth, lw=1, label=r.rule)
            marks = sorted({s for seed in r.spikes for s in seed})
            ax.plot(marks, smooth[marks], "x", color=line.get_color(), ms=7)
        for step in found[0].corrupt_at:
            ax.axvline(step, color="gray", ls=":", lw=1)
        finite = np.concatenate([_smooth(r.loss, r.corrupt_at) for r in found])
        finite = finite[np.isfinite(finite)]
        if finite.size:
            ax.set_ylim(0.9 * finite.min(), min(finite.max(), 2 * np.median(finite)))
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (mean over seeds, last 10 steps)")
        ax.set_title(f"{setting}: x = spike, dotted = corrupted batch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return report._save(fig, path, plt)


def write(rows: Sequence[Row], budget: Budget, out: Path, **about: Any) -> None:
    """Writes ``lm.md``, ``lm.json`` and ``lm.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm.md").write_text(table(rows, budget) + "\n")
    (out / "lm.json").write_text(
        json.dumps(record(rows, budget, **about), indent=1) + "\n"
    )
    plot(rows, out / "lm.png")
