"""What clipping costs in a jit-compiled step: ``jstab bench`` and its API.

:func:`optimizer_step` times ``tx.update`` plus ``optax.apply_updates`` on any
parameter tree, for each clipping rule chained before an optimizer, against
the optimizer alone; :func:`training_step` times a whole step (forward,
backward, clip, update) of a deep MLP; :func:`run` does both on the built-in
trees of :mod:`jstab.bench.trees`. The method is in
:mod:`jstab.bench.timing`; the output, a :class:`~jstab.bench.report.Table`
per step and tree, in :mod:`jstab.bench.report`.

Example:
  >>> import jax.numpy as jnp, jstab.bench as bench
  >>> table = bench.optimizer_step(
  ...     {"w": jnp.ones((64, 64))}, variants=["jstab.clip_by_global_norm"],
  ...     repeats=3, warmup=1)
  >>> [t.variant for t in table.timings]
  ['optax.adam', 'jstab.clip_by_global_norm']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from jstab.bench import timing
from jstab.bench import trees as _trees
from jstab.bench import variants as _variants
from jstab.bench.report import Table, format_table, machine, record
from jstab.bench.timing import Timing
from jstab.bench.variants import Variant

__all__ = [
    "Table",
    "Timing",
    "Variant",
    "format_table",
    "machine",
    "optimizer_step",
    "record",
    "run",
    "training_step",
    "trees",
    "variants",
]

Progress = Callable[[str], None] | None
Chosen = Sequence[str] | Mapping[str, Variant | optax.GradientTransformation] | None


def _choose(chosen: Chosen) -> dict[str, Variant]:
    """The variants to time: names from :func:`variants.default`, or given."""
    table = _variants.default()
    if chosen is None:
        return table
    if isinstance(chosen, Mapping):
        return {
            name: v if isinstance(v, Variant) else Variant(lambda _, v=v: v, None, "")
            for name, v in chosen.items()
        }
    unknown = [name for name in chosen if name not in table]
    if unknown:
        raise ValueError(
            f"`variants` has unknown names {unknown}; known: {sorted(table)}."
        )
    return {name: table[name] for name in chosen}


def _baseline(optimizer: str | optax.GradientTransformation):
    if isinstance(optimizer, str):
        return f"optax.{optimizer}", _variants.optimizer(optimizer)
    return "optimizer", optimizer


def _time(
    name: str,
    step: str,
    optimizer: str | optax.GradientTransformation,
    params: optax.Params,
    chosen: Chosen,
    build: Callable[[optax.GradientTransformation], tuple[Callable, tuple]],
    repeats: int,
    warmup: int,
    fusions: bool,
    progress: Progress,
) -> Table:
    """Compiles and times the baseline and each variant, pair by pair."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats ≥ 1 and warmup ≥ 0, got {repeats}, {warmup}.")
    base_name, base_tx = _baseline(optimizer)
    chosen = _choose(chosen)
    base_passes = _variants.passes(base_tx, params)
    if progress:
        progress(f"{name}: {base_name}")
    jax.clear_caches()
    base = timing.Compiled(*build(base_tx), donate=(0, 1))
    rows, rules = [], ["(baseline)"]
    for variant_name, variant in chosen.items():
        if progress:
            progress(f"{name}: {variant_name}")
        # Each variant compiles from scratch (a fair compile time), and the
        # executables of the variants before it are not kept alive.
        jax.clear_caches()
        run = timing.Compiled(*build(variant.build(base_tx)), donate=(0, 1))
        ratios = timing.paired(base, run, repeats, warmup)
        floor = _variants.traffic_floor(base_passes, variant.reads)
        rows.append(
            timing.summarize(variant_name, run, ratios, base.compile_s, floor, fusions)
        )
        rules.append(variant.rule)
        del run  # its buffers: only the baseline and one variant are alive
    first = timing.summarize(
        base_name, base, timing.noise(base), base.compile_s, 1.0, fusions
    )
    leaves = jax.tree.leaves(params)
    return Table(
        name=name,
        step=step,
        optimizer=base_name,
        leaves=len(leaves),
        parameters=int(sum(x.size for x in leaves)),
        traffic_mb=base_passes * sum(x.nbytes for x in leaves) / 1e6,
        repeats=repeats,
        timings=(first, *rows),
        rules=tuple(rules),
    )


def optimizer_step(
    params: optax.Params,
    grads: optax.Updates | None = None,
    *,
    optimizer: str | optax.GradientTransformation = "adam",
    variants: Chosen = None,
    repeats: int = 30,
    warmup: int = 2,
    fusions: bool = False,
    name: str = "params",
    progress: Progress = None,
) -> Table:
    """Times ``tx.update`` + ``optax.apply_updates`` for each clipping rule.

    Each variant's step is jit-compiled with the parameters and optimizer
    state donated, compiled apart (its time is reported, not counted), run
    ``warmup`` times, then timed ``repeats`` times alternating with the bare
    optimizer's step (see :mod:`jstab.bench.timing`). With JAX's persistent
    compilation cache on, a step found in it is loaded, not compiled, and
    its compile time is the load's: ``jstab bench`` turns the cache off, and
    :func:`~jstab.bench.report.machine` records the cache's directory.

    Args:
      params: any tree of float arrays, on any device or sharding.
      grads: the gradient to apply at every step; by default normal noise
        shaped like ``params`` with a global norm of 10, which every
        built-in variant clips.
      optimizer: ``"adam"`` (``optax.adam(1e-3)``), ``"sgd"`` or any
        ``optax.GradientTransformation``: the baseline.
      variants: names from :func:`jstab.bench.variants.default` (all of
        them by default), or a mapping of names to
        :class:`~jstab.bench.variants.Variant` or to whole transformations
        to time against the baseline.
      repeats: timed pairs per variant.
      warmup: untimed calls of each before timing.
      fusions: also count the fusions of each compiled step.
      name: the tree's name in the table.
      progress: called with a short label before each variant is compiled.

    Returns:
      A :class:`~jstab.bench.report.Table`: the baseline's row, then one per variant.
    """
    if grads is None:
        grads = _trees.gradient_like(params)

    def build(tx):
        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return step, (params, tx.init(params), grads)

    return _time(
        name, "optimizer", optimizer, params, variants, build, repeats, warmup,
        fusions, progress,
    )  # fmt: skip


def training_step(
    *,
    depth: int = 16,
    width: int = 512,
    batch: int = 256,
    optimizer: str | optax.GradientTransformation = "adam",
    variants: Chosen = None,
    repeats: int = 30,
    warmup: int = 2,
    fusions: bool = False,
    progress: Progress = None,
) -> Table:
    """Times a whole training step of a deep ReLU MLP, with each clipping rule.

    Forward, backward (``jax.grad`` of a softmax cross-entropy on a fixed
    batch of ``batch`` normal inputs of ``width`` features and 10 classes),
    clipping, the optimizer's update and ``optax.apply_updates``, in one
    jit-compiled step with parameters and optimizer state donated, timed as
    :func:`optimizer_step` times. What clipping costs where it matters: as a
    fraction of the whole step.

    Args:
      depth: Dense layers (``depth - 1`` hidden, He-initialized, ReLU).
      width: their width (and the input's).
      batch: examples per step.
      optimizer, variants, repeats, warmup, fusions, progress: as in
        :func:`optimizer_step`.

    Returns:
      A :class:`~jstab.bench.report.Table` named ``"mlp"``.
    """
    import flax.linen as nn

    from jstab import he_normal

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(depth - 1):
                x = nn.relu(nn.Dense(width, kernel_init=he_normal())(x))
            return nn.Dense(10)(x)

    model = MLP()
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch, width), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, 10)
    params = model.init(kp, x)["params"]

    def loss(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def build(tx):
        def step(params, state, x, y):
            grads = jax.grad(loss)(params, x, y)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return step, (params, tx.init(params), x, y)

    return _time(
        "mlp", "training", optimizer, params, variants, build, repeats, warmup,
        fusions, progress,
    )  # fmt: skip


#: Timed pairs and warm-up calls: full and ``quick`` runs.
REPEATS, QUICK_REPEATS = 30, 3


def run(
    trees: Sequence[str] = ("resnet", "transformer", "tiny"),
    *,
    optimizer: str = "adam",
    quick: bool = False,
    repeats: int | None = None,
    training: bool = True,
    variants: Chosen = None,
    fusions: bool = False,
    progress: Progress = None,
) -> list[Table]:
    """The benchmark of ``jstab bench``: optimizer steps on built-in trees.

    Args:
      trees: names from ``jstab.bench.trees.TREES``.
      optimizer: ``"adam"`` or ``"sgd"``.
      quick: small trees of the same kinds (fewer leaves, a few hundred
        thousand parameters), a small MLP and 3 pairs: for CI, not figures.
      repeats: timed pairs per variant (30, or 3 with ``quick``).
      training: also time the MLP's whole training step.
      variants, fusions, progress: as in :func:`optimizer_step`.

    Returns:
      One :class:`~jstab.bench.report.Table` per tree, then the MLP's.
    """
    unknown = [t for t in trees if t not in _trees.TREES]
    if unknown:
        raise ValueError(
            f"unknown trees {unknown}; expected some of {sorted(_trees.TREES)}."
        )
    _variants.optimizer(optimizer)  # unknown names raise here, before any work
    _choose(variants)
    if repeats is None:
        repeats = QUICK_REPEATS if quick else REPEATS
    common = {
        "optimizer": optimizer,
        "variants": variants,
        "repeats": repeats,
        "warmup": 1 if quick else 2,
        "fusions": fusions,
        "progress": progress,
    }
    tables = []
    for name in trees:
        full, small = _trees.TREES[name]
        params, grads = _trees.make(small() if quick else full())
        tables.append(optimizer_step(params, grads, name=name, **common))
        del params, grads
    if training:
        size = {"depth": 4, "width": 64, "batch": 32} if quick else {}
        tables.append(training_step(**size, **common))
    return tables
