"""Part G of ``jstab demo``: residual MLPs without normalization, at depth.

A residual block adds its branch to the stream, ``h ← h + f(h)``. Without
normalization, each block adds its branch's variance to the stream's, and
a deep enough stack explodes at initialization; scaling the branches with
the depth (:func:`jstab.depth_scaled`), starting them at zero (Fixup), or
gating them with a learned scalar that starts at zero
(:class:`jstab.nn.ResidualGate`) keeps the stream bounded at any depth.
Batch normalization in the branches is the usual alternative: each branch
then adds about one unit of variance, and the stream's standard deviation
grows as the square root of the depth.

The network (:class:`ResidualMLP`) is an input projection to ``width``
units (He), ``depth`` residual blocks whose branch is ``f(h) = W2
relu(W1 h)`` (two layers, ``branch_layers=2``), and a Dense head on the
final stream. The blocks' parameters are stacked and run with
``flax.linen.scan``, so compilation takes as long at 1000 blocks as at 16.
The variants (``VARIANTS``):

- ``"He, unscaled"``: ``W1`` and ``W2`` from :func:`jstab.he_normal`. The
  branch has a variance gain of 2 (He's ``2/fan_in`` doubles the variance
  at each of its two layers, ``relu`` halves it once), so each block
  multiplies the stream's variance by 3: its standard deviation grows as
  ``3^(depth/2)``.
- ``"gpt2"``: ``W2`` times ``1/√(2 depth)``, GPT-2's rule
  (``depth_scaled(he_normal(), depth, scheme="gpt2")``): each block
  multiplies the variance by ``1 + 1/depth``, at most ``e`` in all.
- ``"fixup"``: ``W1`` times ``depth^(-1/2)`` (Fixup's ``L^(-1/(2m-2))``
  with ``m = 2`` layers per branch) and ``W2`` zero, so every block starts
  as the identity. Fixup's scalar biases and multiplier are left out: this
  is its initialization alone.
- ``"ResidualGate"``: He for both, the branch entering through
  :class:`jstab.nn.ResidualGate`, ``h + alpha f(h)`` with ``alpha = 0`` at
  first (ReZero, SkipInit).
- ``"batch norm"``: He for both, with pre-activation batch normalization in
  the branch (``BN → relu → Dense → BN → relu → Dense``, as in ResNet v2),
  batch statistics in training and running averages at test.

The first three have the same apply function (only their initial
parameters differ): they train together, vmapped over variants and seeds,
in one program. The gate and the batch-norm networks are programs of their
own, vmapped over seeds. Training is :func:`jstab.demo.train.fit`: Adam,
minibatches of the digits, the same minibatch keys for every variant and
depth.

Measured at initialization, on 256 training images (:func:`at_init`): the
standard deviation of the final stream (the last block's output), and the
norm of the loss's gradient with respect to the stream entering the first
block over the one entering the last. Both are taken in a single backward
pass by adding a zero tensor to the stream at the start of every block and
differentiating with respect to those zeros. (The kernels' gradient norms
would not do: a kernel's gradient is the gradient reaching its block times
the stream entering it, which grow in opposite directions, so their
first/last ratio stays of order one while an unscaled stack explodes; and
it is NaN when a gate at zero leaves the kernels without gradient.)

Times on 2 CPU cores (AMD EPYC, jax 0.10.2), compilation included:
``FULL`` 531 s, of which the 1000 blocks take 388 s (vmapped over six
models, a block runs more slowly per model than alone); ``DEFAULT`` (16
and 64 blocks) 53 to 56 s; ``QUICK`` (the three variants that share one
program, at 32 blocks) 9 to 10 s. Compiling takes most of the smaller
budgets: about 8 s for each of a depth's three programs, whatever the
depth, most of it the training loop's (the initialization, the
measurements at initialization and the test run once and are compiled
with ``_run_once``'s options).

References:
  He et al., 2016, "Identity mappings in deep residual networks"; Radford
  et al., 2019, "Language models are unsupervised multitask learners";
  Zhang, Dauphin & Ma, 2019, "Fixup initialization: residual learning
  without normalization"; Bachlechner et al., 2020, "ReZero is all you
  need"; De & Smith, 2020, "Batch normalization biases residual blocks
  towards the identity function in deep networks".
"""

from __future__ import annotations

import dataclasses
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
from flax import linen as nn

import jstab
from jstab.demo import data, report, train

VARIANTS = ("He, unscaled", "gpt2", "fixup", "ResidualGate", "batch norm")
# Variants trained in one program: the first group shares an apply function.
GROUPS = (VARIANTS[:3], VARIANTS[3:4], VARIANTS[4:])


@dataclasses.dataclass(frozen=True)
class Budget:
    """What part G may spend.

    Attributes:
      depths: the numbers of residual blocks, one network each.
      variants: the variants trained at every depth, from ``VARIANTS``.
      steps: Adam steps per model.
      seeds: models trained per variant and depth, side by side.
      width: the units of the stream and of every branch layer.
      batch: minibatch size.
      learning_rate: Adam's learning rate.
    """

    depths: tuple[int, ...] = (16, 64)
    variants: tuple[str, ...] = VARIANTS
    steps: int = 100
    seeds: int = 2
    width: int = 64
    batch: int = 64
    learning_rate: float = 1e-3


DEFAULT = Budget()
QUICK = Budget(depths=(32,), variants=GROUPS[0], steps=50)
FULL = Budget(depths=(16, 64, 256, 1000))

PROBE = 256  # training images of the measurements at initialization


class Block(nn.Module):
    """One residual block, ``h ← h + f(h)``, as a ``flax.linen.scan`` body.

    Attributes:
      width: the units of the stream and of both branch layers.
      inner_init: the initializer of the branch's first kernel, ``W1``.
      outer_init: the initializer of its second kernel, ``W2``.
      gate: whether the branch enters through :class:`jstab.nn.ResidualGate`.
      batch_norm: whether each branch layer's input is batch-normalized and
        passed through ``relu`` (pre-activation).
      train: whether batch normalization uses the batch's statistics (and
        updates its running averages) or the running averages.
    """

    width: int
    inner_init: jstab.Initializer
    outer_init: jstab.Initializer
    gate: bool = False
    batch_norm: bool = False
    train: bool = False

    @nn.compact
    def __call__(
        self, h: chex.Array, perturbation: chex.Array | None
    ) -> tuple[chex.Array, None]:
        """The stream after the block; ``perturbation`` is added to it first.

        Args:
          h: the stream entering the block, ``(batch, width)``.
          perturbation: ``None``, or an array of ``h``'s shape added to the
            stream at the block's entrance: zeros whose gradient is the
            loss's gradient with respect to that stream.
        """
        if perturbation is not None:
            h = h + perturbation
        branch = h
        if self.batch_norm:  # pre-activation: BN and relu before each layer
            branch = nn.relu(self._norm(branch, "inner_norm"))
        branch = nn.Dense(self.width, kernel_init=self.inner_init, name="inner")(branch)
        branch = nn.relu(self._norm(branch, "outer_norm"))
        branch = nn.Dense(self.width, kernel_init=self.outer_init, name="outer")(branch)
        if self.gate:
            return jstab.nn.ResidualGate(name="gate")(h, branch), None
        return h + branch, None

    def _norm(self, x: chex.Array, name: str) -> chex.Array:
        """``x`` batch-normalized with ``batch_norm``; else ``x`` itself."""
        if not self.batch_norm:
            return x
        return nn.BatchNorm(
            use_running_average=not self.train, momentum=0.9, name=name
        )(x)


class ResidualMLP(nn.Module):
    """Input projection, ``depth`` scanned residual :class:`Block` s, head.

    The final stream (the last block's output) is sown as
    ``intermediates/stream``.

    Attributes:
      depth: the number of residual blocks.
      width: the units of the stream.
      classes: the outputs of the head.
      inner_init, outer_init, gate, batch_norm: every block's (:class:`Block`).
    """

    depth: int
    width: int = 64
    classes: int = 10
    inner_init: jstab.Initializer = jstab.he_normal()
    outer_init: jstab.Initializer = jstab.he_normal()
    gate: bool = False
    batch_norm: bool = False

    @nn.compact
    def __call__(
        self,
        x: chex.Array,
        perturbation: chex.Array | None = None,
        train: bool = False,
    ) -> chex.Array:
        """The logits of ``x``, ``(batch, features)``.

        Args:
          x: the inputs.
          perturbation: ``None``, or ``(depth, batch, width)``: row ``l`` is
            added to the stream entering block ``l``.
          train: whether batch normalization uses the batch's statistics.
        """
        h = nn.Dense(self.width, kernel_init=jstab.he_normal(), name="embed")(x)
        blocks = nn.scan(
            Block,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            length=self.depth,
        )
        h, _ = blocks(
            width=self.width,
            inner_init=self.inner_init,
            outer_init=self.outer_init,
            gate=self.gate,
            batch_norm=self.batch_norm,
            train=train,
            name="blocks",
        )(h, perturbation)
        self.sow("intermediates", "stream", h)
        return nn.Dense(self.classes, kernel_init=jstab.lecun_normal(), name="head")(h)


def network(variant: str, depth: int, width: int = 64) -> ResidualMLP:
    """The :class:`ResidualMLP` of ``variant`` (one of ``VARIANTS``)."""
    he = jstab.he_normal()
    options = {
        "He, unscaled": {},
        "gpt2": {"outer_init": jstab.depth_scaled(he, depth, scheme="gpt2")},
        "fixup": {
            "inner_init": jstab.depth_scaled(he, depth, scheme="fixup"),
            "outer_init": nn.initializers.zeros,
        },
        "ResidualGate": {"gate": True},
        "batch norm": {"batch_norm": True},
    }
    return ResidualMLP(depth, width, **options[variant])


@dataclasses.dataclass(frozen=True)
class Row:
    """What :func:`measure` found for one variant at one depth.

    Attributes:
      variant: one of ``VARIANTS``.
      depth: the number of residual blocks.
      stream_std: the standard deviation of the final stream at
        initialization, per seed (in float64, so that a stream near
        float32's largest value still has one; inf where it overflowed).
      ratio: ``‖∂L/∂h_1‖ / ‖∂L/∂h_L‖`` at initialization, per seed: the
        gradient of the loss with respect to the stream entering the first
        block over the one entering the last.
      train_loss: the mean minibatch loss of the last 50 steps, per seed.
      accuracy: the test accuracy, per seed.
      diverged: the seeds whose training loss was not finite at some step.
      seconds: wall time of the program that trained the row,
        compilation included.
      shared: whether ``seconds`` is shared with the other variants of its
        program (``GROUPS``).
    """

    variant: str
    depth: int
    stream_std: np.ndarray
    ratio: np.ndarray
    train_loss: np.ndarray
    accuracy: np.ndarray
    diverged: int
    seconds: float
    shared: bool


def at_init(
    model: ResidualMLP, variables: Any, x: chex.Array, y: chex.Array
) -> tuple[chex.Array, chex.Array]:
    """The final stream, and the loss's gradient norm at every block's entrance.

    The loss is the mean cross-entropy of ``model`` on ``x`` and the labels
    ``y``, with batch statistics for batch normalization. The gradients
    with respect to the streams ``h_1 … h_L`` entering the blocks come from
    one backward pass: a zero perturbation is added to each of them
    (:class:`Block`) and the loss is differentiated with respect to the
    zeros.

    Returns:
      ``(stream, norms)``: the last block's output, ``(batch, width)``, and
      ``‖∂L/∂h_l‖`` over the batch and the units for each block ``l``,
      ``(depth,)``.
    """

    def loss(perturbation):
        logits, state = model.apply(
            variables,
            x,
            perturbation,
            train=True,
            mutable=["batch_stats", "intermediates"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, state["intermediates"]["stream"][0]

    zeros = jnp.zeros((model.depth, x.shape[0], model.width))
    grads, stream = jax.grad(loss, has_aux=True)(zeros)
    return stream, jnp.linalg.norm(grads, axis=(1, 2))


def _std(stream: jax.Array) -> np.ndarray:
    """Each model's standard deviation in float64; inf where the stream
    overflowed float32 (and so holds infinities or NaNs)."""
    stream = np.asarray(stream, np.float64)
    finite = np.isfinite(stream).all(axis=(-2, -1))
    with np.errstate(invalid="ignore"):
        return np.where(finite, np.std(stream, axis=(-2, -1)), np.inf)


def _ratio(norms: jax.Array) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        norms = np.asarray(norms, np.float64)
        return norms[:, 0] / norms[:, -1]


def _run_once() -> dict[str, Any]:
    """Compiler options for a program that runs once, such as an initialization.

    XLA's CPU backend spends seconds optimizing the threefry rounds of an
    initialization: at optimization level 0, :func:`measure`'s compiles in
    a fifth of the time (1.5 s instead of 8 on 2 cores), and runs in
    milliseconds either way.
    """
    if jax.default_backend() == "cpu":
        return {"xla_backend_optimization_level": 0}
    return {}


def _initialize(models: Sequence[ResidualMLP], keys: jax.Array, x: jax.Array) -> Any:
    """Every model's variables for each of ``keys``, stacked model by model."""
    variables = jax.jit(
        lambda keys: [jax.vmap(m.init, (0, None))(keys, x) for m in models],
        compiler_options=_run_once(),
    )(keys)
    return jax.tree.map(lambda *a: jnp.concatenate(a), *variables)


def measure(
    variants: Sequence[str],
    depth: int,
    budget: Budget = DEFAULT,
    *,
    seed: int = 0,
    split: data.Split | None = None,
    progress: Callable[[int], Any] | None = None,
) -> list[Row]:
    """Initializes, measures and trains ``variants`` at ``depth``, in one program.

    Every variant has ``budget.seeds`` models, trained side by side
    (``jax.vmap`` over variants and seeds); so the variants must differ in
    their initializers alone. Seed ``i`` of every variant starts from the
    same key, and sees the same minibatches, at every depth. A run is
    deterministic given ``seed`` (on one machine and JAX version).

    Args:
      variants: names from ``VARIANTS`` with one apply function, such
        as a group of ``GROUPS``.
      depth: the number of residual blocks.
      budget: the sizes and the training budget.
      seed: the seed of the initializations and the minibatches.
      split: the digits data (:func:`~jstab.demo.data.digits`); loaded if
        ``None``.
      progress: called with the number of steps done, as training goes.

    Returns:
      One :class:`Row` per variant, in ``variants``' order.

    Raises:
      ValueError: the variants' networks differ in more than their
        initializers.
    """
    start = time.perf_counter()
    models = [network(v, depth, budget.width) for v in variants]
    if len({(m.gate, m.batch_norm) for m in models}) > 1:
        raise ValueError(f"{variants} do not share one apply function.")
    model = models[0]
    split = data.digits() if split is None else split
    x, y = jnp.asarray(split.x_train), jnp.asarray(split.y_train)
    key_init, key_data = jax.random.split(jax.random.key(seed))
    variables = _initialize(models, jax.random.split(key_init, budget.seeds), x[:2])
    stream, norms = jax.jit(
        jax.vmap(lambda v: at_init(model, v, x[:PROBE], y[:PROBE])),
        compiler_options=_run_once(),
    )(variables)

    def sample(key):
        i = jax.random.randint(key, (budget.batch,), 0, x.shape[0])
        return x[i], y[i]

    def loss_fn(params, state, batch):
        logits, state = model.apply(
            {"params": params, **state}, batch[0], train=True, mutable=list(state)
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[1])
        return loss.mean(), state

    def evaluate(params, state):
        logits = model.apply({"params": params, **state}, jnp.asarray(split.x_test))
        return jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(split.y_test))

    state = dict(variables)
    params = state.pop("params")
    run = train.fit(
        loss_fn,
        optax.adam(budget.learning_rate),
        params,
        state,
        sample,
        jnp.tile(jax.random.split(key_data, budget.seeds), len(variants)),
        steps=budget.steps,
        progress=progress,
    )
    test = jax.jit(jax.vmap(evaluate), compiler_options=_run_once())
    accuracy = np.asarray(test(run.params, run.model_state))
    loss = np.asarray(run.loss)
    seconds = time.perf_counter() - start

    def per_variant(values: np.ndarray) -> np.ndarray:
        return values.reshape(len(variants), budget.seeds, *values.shape[1:])

    found = zip(
        variants,
        per_variant(_std(stream)),
        per_variant(_ratio(norms)),
        per_variant(loss[:, -50:].mean(axis=1)),
        per_variant(accuracy),
        per_variant(~np.isfinite(loss).all(axis=1)),
        strict=True,
    )
    return [
        Row(
            variant=variant,
            depth=depth,
            stream_std=std,
            ratio=ratio,
            train_loss=train_loss,
            accuracy=acc,
            diverged=int(diverged.sum()),
            seconds=seconds,
            shared=len(variants) > 1,
        )
        for variant, std, ratio, train_loss, acc, diverged in found
    ]


def groups(budget: Budget) -> list[tuple[str, ...]]:
    """The programs of one depth: ``GROUPS`` restricted to ``budget.variants``."""
    found = [tuple(v for v in g if v in budget.variants) for g in GROUPS]
    return [g for g in found if g]


def sweep(
    budget: Budget = DEFAULT,
    *,
    seed: int = 0,
    split: data.Split | None = None,
    progress: Callable[[int], Any] | None = None,
) -> list[Row]:
    """Part G: the budget's variants at every depth of it, group by group.

    Args:
      budget: the depths, sizes and training budget.
      seed: the seed of every key (:func:`measure`).
      split: the digits data; loaded if ``None``.
      progress: called with the number of steps done over the whole sweep,
        out of ``len(budget.depths) * len(groups(budget)) * budget.steps``.

    Returns:
      One :class:`Row` per depth and variant of ``budget``, by depth, in
      ``VARIANTS``' order.
    """
    split = data.digits() if split is None else split
    rows = []
    programs = groups(budget)
    for i, depth in enumerate(budget.depths):
        for j, group in enumerate(programs):
            done = (i * len(programs) + j) * budget.steps
            advance = None
            if progress is not None:
                advance = lambda steps, done=done: progress(done + steps)  # noqa: E731
            rows += measure(
                group, depth, budget, seed=seed, split=split, progress=advance
            )
    return rows


TITLE = (
    "G. Residual MLPs without normalization, at depth (final stream's std "
    "and gradient ratio ‖∂L/∂h₁‖/‖∂L/∂h_L‖ at initialization, medians over "
    "the seeds; test accuracy; the first three variants of a depth train "
    "in one program and share its time)"
)
_HEAD = (
    "depth",
    "variant",
    "stream std at init",
    "grad ratio h₁/h_L",
    "train loss",
    "test",
    "diverged",
    "time (s)",
)


def row(r: Row) -> tuple[str, ...]:
    """The table's cells for ``r``: medians at initialization, means after."""
    seeds = r.accuracy.size
    return (
        str(r.depth),
        r.variant,
        report._number(float(np.median(r.stream_std))),
        report._number(float(np.median(r.ratio))),
        report._number(float(np.mean(r.train_loss))),
        report._spread(r.accuracy),
        f"{r.diverged}/{seeds}",
        f"{r.seconds:.1f}" + (" (shared)" if r.shared else ""),
    )


def table(rows: Sequence[Row]) -> str:
    """Part G's Markdown table, under its title, rows by depth."""
    return f"{TITLE}\n\n{report.markdown(_HEAD, [row(r) for r in rows])}"


def record(rows: Sequence[Row], budget: Budget, **about: Any) -> dict:
    """A JSON-ready record: the budget, ``about`` and every seed's numbers."""

    def listed(values: np.ndarray) -> list[float]:
        return [float(v) for v in np.ravel(values)]

    return {
        "budget": vars(budget),
        **about,
        "rows": [
            {
                "variant": r.variant,
                "depth": r.depth,
                "stream_std": listed(r.stream_std),
                "ratio": listed(r.ratio),
                "train_loss": listed(r.train_loss),
                "accuracy": listed(r.accuracy),
                "diverged": r.diverged,
                "seconds": r.seconds,
                "shared": r.shared,
            }
            for r in rows
        ],
    }


def plot(rows: Sequence[Row], path: Path) -> Path:
    """Writes ``path`` (PNG): test accuracy and the stream's std against depth.

    One line per variant; the accuracy's error bars are its standard
    deviation over the seeds, the stream's std at initialization is the
    median over the seeds (a stream that overflowed has no point).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    for variant in VARIANTS:
        found = [r for r in rows if r.variant == variant]
        if not found:
            continue
        depths = [r.depth for r in found]
        left.errorbar(
            depths,
            [np.mean(r.accuracy) for r in found],
            yerr=[np.std(r.accuracy) for r in found],
            marker="o",
            capsize=3,
            label=variant,
        )
        std = np.array([np.median(r.stream_std) for r in found])
        finite = np.isfinite(std)
        right.plot(np.array(depths)[finite], std[finite], marker="o", label=variant)
    left.set_xscale("log")
    left.set_ylim(0, 1)
    left.set_xlabel("residual blocks")
    left.set_ylabel("test accuracy (mean ± std over seeds)")
    left.set_title("Residual MLP without normalization: test accuracy")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("residual blocks")
    right.set_ylabel("std of the final stream")
    right.set_title("The final stream at initialization")
    depths = sorted({r.depth for r in rows})
    for ax in (left, right):
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_xticks([], minor=True)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return report._save(fig, path, plt)


def write(rows: Sequence[Row], budget: Budget, out: Path, **about: Any) -> None:
    """Writes ``depth.md``, ``depth.json`` and ``depth.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "depth.md").write_text(table(rows) + "\n")
    (out / "depth.json").write_text(
        json.dumps(record(rows, budget, **about), indent=1) + "\n"
    )
    plot(rows, out / "depth.png")
